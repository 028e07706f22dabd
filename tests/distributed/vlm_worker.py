"""Worker for test_vlm_layouts.py and test_resharding.py: the tiny VLM (fp32, dropout 0, dropless
MoE) on the identical padded packed multimodal batch (``vlm_cases.py``) in several layouts.

``python vlm_worker.py OUT reference`` (one process): builds the model, saves its initial weights
(``OUT/init``), then runs the reference case from them with the DistributedOptimizer and saves
its step-3 checkpoint (``OUT/ckpt/ref``, dp=1) and the step-4 parameters.

``torchrun --nproc-per-node=2 vlm_worker.py OUT layouts``: one process start for every 2-rank
case. megatron's groups are rebuilt per layout in the same processes (``destroy_model_parallel``
then ``initialize_model_parallel``). Each layout case loads the initial checkpoint (resharded)
and records, for one global batch of 4 micro-batches:

* step 1: the routing map of every MoE layer and micro-batch, the loss, every gradient (whole,
  globally named) and the encoder's item log (which media items each rank encoded);
* steps 2-3: the grad norms, then the parameters after three optimizer steps and the loss of a
  forward pass on the batch.

The resharding cases then load step-3 checkpoints of one layout strictly into a model of another
layout initialised from a different seed (loss must not change; one more optimizer step checks
the optimizer state), resume the reference's dp=1 DistributedOptimizer checkpoint at dp=2, and
record the refusal to load that state across a PP or EP change. Rank 0 writes ``OUT/<role>.pt``.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch
from megatron.core import parallel_state as ps

sys.path.insert(0, str(Path(__file__).resolve().parent))
from vlm_cases import (  # noqa: E402
    PAD_TO,
    SEQ,
    VOCAB,
    RoutingRecorder,
    all_batches,
    gather_dp_sharded_grads,
    gather_item_logs,
    my_batches,
    save_results,
    whole,
)

from megatron_vlm.checkpoint import CheckpointError, load_checkpoint, save_checkpoint  # noqa: E402
from megatron_vlm.config import apply_overrides  # noqa: E402
from megatron_vlm.optim.builder import build_optimizer  # noqa: E402
from megatron_vlm.optim.schedules import build_scheduler  # noqa: E402
from megatron_vlm.parallel.init import init_distributed  # noqa: E402
from megatron_vlm.recipes import get_recipe  # noqa: E402
from megatron_vlm.training.model_setup import build_model_chunks, unwrap  # noqa: E402
from megatron_vlm.training.trainer import run_forward_backward  # noqa: E402

COMMON = ["model.llm.num_layers=4", f"model.llm.vocab_size={VOCAB}", f"data.seq_length={SEQ}",
          f"data.pad_to_multiple={PAD_TO}", "data.global_batch_size=4",
          "optim.schedule=constant", "optim.warmup_steps=0", "train.steps=10"]
TP2 = ["parallel.tp=2", "parallel.sequence_parallel=true"]
DISTOPT = ["parallel.use_distributed_optimizer=true"]
LAYOUTS = {  # name -> (overrides, save a step-3 checkpoint)
    "tp2_sp": (TP2, True),
    "tp2_sp_vit_tp": ([*TP2, "model.vision.parallel_mode=tp"], False),
    "pp2": (["parallel.pp=2"], True),
    "ep2": (["parallel.ep=2"], True),
    "dp2_distopt": (DISTOPT, False),
    "tp2_ep2": ([*TP2, "parallel.ep=2", "parallel.etp=1"], False),
}
RESHARD = {  # name -> (checkpoint, target layout overrides, load the optimizer state)
    "tp2_to_tp1": ("tp2_sp", [], True),
    "vit_split_to_vit_tp": ("tp2_sp", [*TP2, "model.vision.parallel_mode=tp"], True),
    "pp2_to_pp1": ("pp2", [], True),
    "ep2_to_ep1": ("ep2", [], False),  # optimizer state refused across ep=1 <-> ep>1 (below)
    "ep2_to_tp2_ep2": ("ep2", [*TP2, "parallel.ep=2", "parallel.etp=1"], True),
    "dp1_to_dp2_distopt": ("ref", DISTOPT, True),
}
REFUSE = {  # name -> (checkpoint, target layout overrides)
    "pp1_to_pp2_distopt": ("ref", ["parallel.pp=2", *DISTOPT]),
    "ep1_to_ep2_distopt": ("ref", ["parallel.ep=2", *DISTOPT]),
    "ep2_to_ep1_adam": ("ep2", []),
}
OTHER_SEED = 4321


def log(msg: str) -> None:
    if os.environ.get("RANK", "0") == "0":
        print(f"[vlm_worker {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def setup(overrides: list[str], out: Path, seed: int | None = None):
    """(Re)build megatron's groups for this layout; the model, optimizer and scheduler."""
    job = apply_overrides(get_recipe("tiny_vlm_cpu"),
                          [*COMMON, f"train.output_dir={out}", *overrides])
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    init_distributed(job.parallel, job.train.seed if seed is None else seed)
    chunks = build_model_chunks(job)
    optimizer = build_optimizer(job.optim, chunks, job.model.params_dtype,
                                job.parallel.use_distributed_optimizer)
    scheduler = build_scheduler(job.optim, optimizer, job.train.steps)
    return job, chunks, optimizer, scheduler


def step(chunks, optimizer, scheduler, batches, probe=None):
    """One optimizer step; ``probe()`` runs between the gradients and the update."""
    for c in chunks:
        c.zero_grad_buffer()
    optimizer.zero_grad()
    total = run_forward_backward(chunks, batches, SEQ, forward_only=False)
    extra = probe() if probe is not None else None
    _, grad_norm, _ = optimizer.step()
    scheduler.step(increment=1)
    return (total[0] / total[1]).item(), float(grad_norm), extra


@torch.no_grad()
def forward_loss(chunks, batches) -> float:
    total = run_forward_backward(chunks, batches, SEQ, forward_only=True)
    return (total[0] / total[1]).item()


def run_layout(overrides: list[str], out: Path, init: Path, save_as: str | None,
               extra_steps: int = 0) -> dict:
    job, chunks, optimizer, scheduler = setup(overrides, out)
    load_checkpoint(init, chunks, None, None, load_optimizer=False)  # strict, resharded
    distopt = job.parallel.use_distributed_optimizer
    ids, batches = my_batches(all_batches())
    vit = unwrap(chunks[0]).vision_tower if unwrap(chunks[0]).pre_process else None
    if vit is not None:
        vit.encoded_item_log = []
    params0 = whole(chunks, "param")
    recorder = RoutingRecorder(chunks)

    def probe():
        if distopt:
            gather_dp_sharded_grads(chunks)
        return whole(chunks, "grad")

    loss, norm, grads = step(chunks, optimizer, scheduler, batches, probe)
    recorder.remove()
    logs = gather_item_logs(vit, batches, job.model.vision.parallel_mode)
    norms = [norm] + [step(chunks, optimizer, scheduler, batches)[1] for _ in range(2)]
    result = {"routing": recorder.gathered(ids), "loss": loss, "grad_norms": norms,
              "grads": grads, "params0": params0, "params3": whole(chunks, "param"),
              "loss3": forward_loss(chunks, batches), "items": logs}
    if save_as is not None:
        save_checkpoint(out / "ckpt" / save_as, 3, chunks, optimizer, scheduler, {},
                        job.to_yaml())
    for _ in range(extra_steps):
        step(chunks, optimizer, scheduler, batches)
    if extra_steps:
        result["params4"] = whole(chunks, "param")
    return result


def run_reshard(source: Path, overrides: list[str], out: Path, with_optimizer: bool) -> dict:
    """Load a step-3 checkpoint strictly into another layout built from another seed; with its
    optimizer state, take step 4 too."""
    _, chunks, optimizer, scheduler = setup(overrides, out, seed=OTHER_SEED)
    fresh = whole(chunks, "param")
    load_checkpoint(source, chunks, optimizer, scheduler, strict=True,
                    load_optimizer=with_optimizer)
    _, batches = my_batches(all_batches())
    loaded = whole(chunks, "param")
    result = {"loss3": forward_loss(chunks, batches),
              "moved_by_load": max((loaded[k] - fresh[k]).abs().max().item() for k in fresh)}
    if with_optimizer:
        step(chunks, optimizer, scheduler, batches)
        result["params4"] = whole(chunks, "param")
    return result


def run_refusal(source: Path, overrides: list[str], out: Path) -> str:
    _, chunks, optimizer, scheduler = setup(overrides, out, seed=OTHER_SEED)
    try:
        load_checkpoint(source, chunks, optimizer, scheduler, strict=True)
    except CheckpointError as e:
        return str(e)
    return ""


def main() -> None:
    out, role = Path(sys.argv[1]), sys.argv[2]
    init = out / "init" / "step_0000000"
    results: dict = {}
    t0 = time.perf_counter()
    if role == "reference":
        job, chunks, _, _ = setup([], out)
        save_checkpoint(init.parent, 0, chunks, None, None, {}, job.to_yaml())
        results["ref"] = run_layout(DISTOPT, out, init, save_as="ref", extra_steps=1)
    else:
        for name, (overrides, save) in LAYOUTS.items():
            log(f"layout {name}")
            results[name] = run_layout(overrides, out, init, save_as=name if save else None,
                                       extra_steps=int(save))
        for name, (source, overrides, with_optimizer) in RESHARD.items():
            log(f"reshard {name}")
            results[name] = run_reshard(out / "ckpt" / source / "step_0000003", overrides, out,
                                        with_optimizer)
        for name, (source, overrides) in REFUSE.items():
            log(f"refusal {name}")
            results[name] = run_refusal(out / "ckpt" / source / "step_0000003", overrides, out)
    log(f"done in {save_results(results, out / f'{role}.pt', t0):.1f} s")


if __name__ == "__main__":
    main()
