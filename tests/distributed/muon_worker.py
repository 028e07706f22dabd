"""Worker for test_muon_layouts.py: MuonClip training steps through the trainer's ``train_step``
under several layouts, every parameter (and optimizer state) gathered to full shape, saved by
rank 0 as ``OUT/<case>.pt``.

``python -m torch.distributed.run --nproc-per-node=N muon_worker.py OUT CASE...``; each case
re-initialises megatron's process groups in the same processes (start-up is the expensive part).
The first case run saves the initial weights (``OUT/init``); every fp32 case loads them, so all
layouts start from identical weights (expert init draws per-EP-rank RNG). Cases:

* ``dp2`` (2 ranks): DP=2, layer-wise sharded Muon; 3 steps; checkpoint at step 3; step 4; then
  a fresh model + optimizer load the checkpoint and redo step 4 (same DP size: must be exact).
* ``tp2`` (2 ranks): TP=2 + SP, Muon on gathered TP shards (no DP sharding).
* ``ep2`` (2 ranks): EP=2 (DP=2 all-to-all), megatron DDP, experts in their own optimizers.
* ``bf16_clip`` (2 ranks): bf16 params, DP=2 layer-wise: QK-Clip's action on the fp32 masters
  and the bf16 copies (values saved for the test to check).
* ``single`` (1 rank): the reference, 3 steps.
* ``dp2_to_dp1`` (1 rank): the ``dp2`` step-3 checkpoint loaded at DP=1, optimizer state
  gathered, step 4 (or the refusal's message).

QK-Clip is on in every case, with tau = the median of the first batch's per-head max logits
(chosen per run from a forward pass; clipping is continuous in the logit, so tiny layout
differences in tau or logits cannot switch a head from unclipped to strongly clipped).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from grads_worker import global_name  # same folder
from megatron.core import parallel_state

from megatron_vlm.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from megatron_vlm.config import apply_overrides
from megatron_vlm.optim.builder import build_optimizer
from megatron_vlm.optim.qk_clip import mla_attentions, reset_max_logits
from megatron_vlm.optim.schedules import build_scheduler
from megatron_vlm.parallel.init import init_distributed
from megatron_vlm.recipes import get_recipe
from megatron_vlm.training import telemetry
from megatron_vlm.training.data_setup import build_data
from megatron_vlm.training.model_setup import build_model_chunks, unwrap
from megatron_vlm.training.state import StopSignal
from megatron_vlm.training.trainer import run_forward_backward, train_step

COMMON = ["data.pad_to_multiple=4", "data.global_batch_size=4", "optim.optimizer=muon",
          "optim.warmup_steps=0", "optim.schedule=constant", "train.steps=10",
          "model.llm.qk_clip=true", "optim.muon_ns_dtype=fp32"]
STEPS = 3
LAYOUTS = {  # case -> (overrides, layer-wise sharded)
    "single": ([], False),
    "single_nsbf16": (["optim.muon_ns_dtype=bf16"], False),
    "dp2": ([], True),
    "tp2": (["parallel.tp=2", "parallel.sequence_parallel=true"], False),
    "tp2_nsbf16": (["parallel.tp=2", "parallel.sequence_parallel=true",
                    "optim.muon_ns_dtype=bf16"], False),
    "ep2": (["parallel.ep=2"], False),
    "bf16_clip": (["model.params_dtype=bf16", "optim.muon_ns_dtype=bf16"], True),
    "dp2_to_dp1": ([], True),
}


@dataclass
class Run:
    job: object
    chunks: list
    optimizer: object
    scheduler: object
    data: object
    routers: list
    heads_clipped: list = field(default_factory=list)

    def step(self, batches=None, tau: float | None = None) -> float:
        batches = batches or self.data.loader.next_global_batch()
        loss, _, _, skipped, _, metrics = train_step(
            self.chunks, self.optimizer, self.scheduler, batches, self.job.data.seq_length,
            self.routers, StopSignal(), tau)
        assert not skipped
        self.heads_clipped.append(metrics["qk_clip/heads_clipped"])
        return loss


def start(out: Path, case: str) -> Run:
    """Fresh process groups, data, model, optimizer for ``case`` (the trainer's wiring)."""
    overrides, layer_wise = LAYOUTS[case]
    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    job = apply_overrides(get_recipe("tiny_text_cpu"),
                          [f"train.output_dir={out}", *COMMON, *overrides])
    runtime = init_distributed(job.parallel, job.train.seed)
    data = build_data(job, dp_rank=runtime.dp_rank, dp_size=runtime.dp_size,
                      run_dir=out)
    chunks = build_model_chunks(job)  # DDP all-reduces (parallel.use_distributed_optimizer=false)
    finalize = telemetry.FinalizeWithTelemetry(chunks)
    for c in chunks:
        c.config.finalize_model_grads_func = finalize
    optimizer = build_optimizer(job.optim, chunks, job.model.params_dtype, layer_wise)
    scheduler = build_scheduler(job.optim, optimizer, job.train.steps)
    return Run(job, chunks, optimizer, scheduler, data, telemetry.routers_of(chunks))


def load_init(out: Path, run: Run) -> None:
    init = out / "init" / "step_0000000"
    if (init / "manifest.json").exists():
        load_checkpoint(init, run.chunks, None, None, load_optimizer=False)
    else:
        save_checkpoint(init.parent, 0, run.chunks, None, None, {}, run.job.to_yaml())


def median_tau(run: Run, batches) -> float:
    """Median over all heads of the per-head max logit on ``batches`` (weights unchanged)."""
    run_forward_backward(run.chunks, batches, run.job.data.seq_length, forward_only=True)
    local = torch.cat([a.core_attention.current_max_attn_logits.float()
                       for a in mla_attentions(run.chunks)])
    dist.all_reduce(local, op=dist.ReduceOp.MAX,
                    group=parallel_state.get_data_parallel_group(with_context_parallel=True))
    tp = parallel_state.get_tensor_model_parallel_group()
    parts = [torch.empty_like(local) for _ in range(dist.get_world_size(tp))]
    dist.all_gather(parts, local, group=tp)
    reset_max_logits(run.chunks)
    return torch.cat(parts).median().item()


def _names(run: Run) -> dict[int, str]:
    """id(param) -> global name (local experts renumbered under EP)."""
    chunk = unwrap(run.chunks[0])
    num_local = run.job.model.llm.num_experts // run.job.parallel.ep
    offset = parallel_state.get_expert_model_parallel_rank() * num_local
    return {id(p): global_name(n, offset, 0) for n, p in chunk.named_parameters()}


def full(name: str, t: torch.Tensor, like: torch.nn.Parameter) -> torch.Tensor:
    """``t`` (shaped like ``like``) gathered over its TP group, in HF row order."""
    t = t.detach().clone()
    if not getattr(like, "tensor_model_parallel", False):
        return t
    routed = ".experts." in name and "shared_experts" not in name
    group = (parallel_state.get_expert_tensor_parallel_group() if routed
             else parallel_state.get_tensor_model_parallel_group())
    if dist.get_world_size(group) == 1:
        return t
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t.contiguous(), group=group)
    if name.endswith("linear_fc1.weight"):  # each rank holds [gate_r; up_r]
        halves = [p.chunk(2, dim=0) for p in parts]
        parts = [h[0] for h in halves] + [h[1] for h in halves]
    return torch.cat(parts, dim=like.partition_dim)


def _merge(local: dict) -> dict:
    parts = [None] * dist.get_world_size()
    dist.all_gather_object(parts, local)
    return {k: v for part in parts for k, v in part.items()}


def full_params(run: Run) -> dict[str, torch.Tensor]:
    names = _names(run)
    chunk = unwrap(run.chunks[0])
    return _merge({names[id(p)]: full(names[id(p)], p, p) for p in chunk.parameters()})


def optimizer_state(run: Run) -> dict[str, dict[str, torch.Tensor]]:
    """Every parameter's optimizer state (and fp32 master, if any) by global name, merged over
    ranks (the layer-wise optimizer holds each parameter's state on its owner only)."""
    names = _names(run)
    chunk = unwrap(run.chunks[0])
    model_of = {id(getattr(p, "main_param", None)): p for p in chunk.parameters()
                if getattr(p, "main_param", None) is not None}
    local = {}
    for opt in run.optimizer.chained_optimizers:
        for p, state in opt.optimizer.state.items():
            model = model_of.get(id(p), p)
            name = names[id(model)]
            local[name] = {k: full(name, v, model) for k, v in state.items() if k != "step"}
            local[name]["step"] = torch.as_tensor(state.get("step", -1.0)).clone()
            if model is not p:
                local[name]["master"] = full(name, p, model)
    return _merge(local)


def save(out: Path, case: str, result: dict) -> None:
    if dist.get_rank() == 0:
        torch.save(result, out / f"{case}.pt")
    dist.barrier()


def three_steps(out: Path, case: str) -> tuple[Run, dict]:
    run = start(out, case)
    load_init(out, run)
    params_0 = full_params(run)
    batches = run.data.loader.next_global_batch()
    tau = median_tau(run, batches)
    losses = [run.step(batches, tau)] + [run.step(tau=tau) for _ in range(STEPS - 1)]
    return run, {"tau": tau, "losses": losses, "params": full_params(run), "params_0": params_0,
                 "heads_clipped": list(run.heads_clipped)}


def case_layout(out: Path, case: str) -> None:
    _, result = three_steps(out, case)
    save(out, case, result)


def case_dp2(out: Path, case: str) -> None:
    run, result = three_steps(out, case)
    tau = result["tau"]
    ckpt = save_checkpoint(out / "ckpt_dp2", STEPS, run.chunks, run.optimizer, run.scheduler,
                           {"loader": run.data.loader.state_dict()}, run.job.to_yaml())
    result["state"] = optimizer_state(run)
    result["loss_4"] = run.step(tau=tau)
    result["params_4"] = full_params(run)
    # Same DP size: a fresh model and optimizer resume from the checkpoint.
    run = start(out, case)
    extra = load_checkpoint(ckpt, run.chunks, run.optimizer, run.scheduler)
    run.data.loader.load_state_dict(extra["loader"])
    result["resumed_state"] = optimizer_state(run)
    result["resumed_loss_4"] = run.step(tau=tau)
    result["resumed_params_4"] = full_params(run)
    save(out, case, result)


def case_dp2_to_dp1(out: Path, case: str) -> None:
    """The DP=2 layer-wise checkpoint resumed by one process."""
    tau = torch.load(out / "dp2.pt", weights_only=True)["tau"]
    run = start(out, case)
    try:
        extra = load_checkpoint(out / "ckpt_dp2" / f"step_{STEPS:07d}", run.chunks,
                                run.optimizer, run.scheduler)
    except CheckpointError as e:
        save(out, case, {"refused": str(e)})
        return
    run.data.loader.load_state_dict(extra["loader"])
    result = {"state": optimizer_state(run), "loss_4": run.step(tau=tau),
              "params_4": full_params(run)}
    save(out, case, result)


def case_bf16_clip(out: Path, case: str) -> None:
    """Step 1 at lr=0 (the optimizer leaves every weight as it was) and QK-Clip at the median
    logit: snapshot the fp32 masters and bf16 weights of the clipped projections right after
    the optimizer step (before the clip) and after the clip; step 2 on the same batch, lr=0,
    no clip (tau = inf): its recorded logits and weights; step 3 a real step."""
    run = start(out, case)
    batches = run.data.loader.next_global_batch()
    tau = median_tau(run, batches)
    attention = mla_attentions(run.chunks)[0]  # layer 1: its input does not depend on the clip
    weights = {"q": attention.linear_q_up_proj.weight, "kv": attention.linear_kv_up_proj.weight,
               "kv_down": attention.linear_kv_down_proj.weight}
    snaps: dict = {}

    def snapshot(tag: str) -> None:
        for key, w in weights.items():
            main = getattr(w, "main_param", None)
            snaps[f"{tag}/{key}/bf16"] = _gather_rank_copies(w.detach())
            snaps[f"{tag}/{key}/has_master"] = _gather_rank_copies(
                torch.tensor(int(main is not None)))
            snaps[f"{tag}/{key}/master"] = _gather_rank_copies(
                main.detach().clone() if main is not None else torch.zeros(w.shape))

    # The optimizer step ends with the layer-wise optimizer's all-gather of updated parameters
    # (optim/step.py); snapshot right after it, before the QK-Clip hook runs.
    gather = run.optimizer.allgather_params

    def gather_then_snapshot():
        out_ = gather()
        snapshot("stepped")
        snaps["local_max_logits"] = _gather_rank_copies(
            attention.core_attention.current_max_attn_logits.detach().clone())
        return out_

    run.optimizer.allgather_params = gather_then_snapshot
    for group in run.optimizer.param_groups:
        group["lr"] = 0.0
    run.step(batches, tau)
    run.optimizer.allgather_params = gather
    snapshot("clipped")
    for group in run.optimizer.param_groups:
        group["lr"] = 0.0
    run.step(batches, float("inf"))  # records the clipped weights' logits, clips nothing
    snapshot("after_next")
    snaps["next_local_max_logits"] = _gather_rank_copies(_last_max_logits[0])
    run.step(tau=tau)
    snapshot("after_real")
    owner = {k: run.optimizer.owner_of(w) for k, w in weights.items()}
    save(out, case, {"tau": tau, "owner": owner, "heads": attention.config.num_attention_heads,
                     "nope": attention.config.qk_head_dim,
                     "rope": attention.config.qk_pos_emb_head_dim,
                     "v": attention.config.v_head_dim, **snaps})


_last_max_logits: list[torch.Tensor] = [torch.empty(0)]


def _gather_rank_copies(t: torch.Tensor) -> torch.Tensor:
    """``[world, *t.shape]``: every rank's copy of ``t``."""
    t = t.contiguous()
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t)
    return torch.stack(parts)


def _record_logits_before_clip() -> None:
    """Keep a copy of layer 1's recorded max logits before QK-Clip resets them (bf16 case)."""
    import megatron_vlm.optim.qk_clip as qk_clip  # the QK-Clip hook's module

    clip = qk_clip.apply_qk_clip

    def wrapped(chunks, **kwargs):
        logits = mla_attentions(chunks)[0].core_attention.current_max_attn_logits
        _last_max_logits[0] = logits.detach().clone()
        return clip(chunks, **kwargs)

    qk_clip.apply_qk_clip = wrapped


CASES = {"single": case_layout, "single_nsbf16": case_layout, "dp2": case_dp2,
         "tp2": case_layout, "tp2_nsbf16": case_layout, "ep2": case_layout,
         "bf16_clip": case_bf16_clip, "dp2_to_dp1": case_dp2_to_dp1}


def main() -> None:
    out, cases = Path(sys.argv[1]), sys.argv[2:]
    _record_logits_before_clip()
    for case in cases:
        CASES[case](out, case)


if __name__ == "__main__":
    main()
