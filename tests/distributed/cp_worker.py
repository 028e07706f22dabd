"""Worker for test_context_parallel.py: the tiny VLM under context parallelism vs one process.

``python cp_worker.py OUT reference`` (one process) builds the model, saves its initial weights
(``OUT/init``) and runs the reference case; ``torchrun --nproc-per-node=N cp_worker.py OUT
layouts N`` runs every N-rank layout of :data:`LAYOUTS` in one process start (megatron's groups
rebuilt per layout). Each case loads the initial checkpoint (resharded) and, on the four packed
multimodal micro-batches of ``vlm_cases.py`` (text, images of different sizes, 6-frame videos;
documents of odd lengths padded to 8, so they cross CP chunk boundaries), records:

* step 1: the routing map of every MoE layer and micro-batch (CP and SP shards joined back into
  global token order), the loss, every gradient (whole, globally named), the per-head max
  attention logits of every MLA layer after QK-Clip's MAX all-reduce over DP x CP, and which
  media items each rank's vision tower encoded;
* QK-Clip after every optimizer step with a tau that splits the heads (half of them clip at
  step 1: the reference picks it between the middle two of its step-1 maxima, ``OUT/tau.pt``,
  and every layout uses it): heads clipped per layer;
* the parameters after three steps and the loss of a forward pass on the batch.

Rank 0 writes ``OUT/<role>.pt``.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps

sys.path.insert(0, str(Path(__file__).resolve().parent))
from vlm_cases import (
    SEQ,
    RoutingRecorder,
    all_batches,
    gather_item_logs,
    my_batches,
    save_results,
    whole,
)
from vlm_worker import TP2, forward_loss, log, setup

from megatron_vlm.checkpoint import load_checkpoint, save_checkpoint
from megatron_vlm.optim.qk_clip import apply_qk_clip, mla_attentions
from megatron_vlm.parallel.context import unsplit_context_parallel
from megatron_vlm.training.model_setup import unwrap
from megatron_vlm.training.trainer import run_forward_backward

QK = ["model.llm.qk_clip=true"]
CP2 = ["parallel.cp=2"]
LAYOUTS = {  # world size -> {name: overrides}
    2: {"cp2": CP2},
    4: {"tp2_cp2": [*TP2, *CP2],
        "tp2_cp2_vit_tp": [*TP2, *CP2, "model.vision.parallel_mode=tp"],
        # the per-document SDPA kernel (the reference runs the dense-mask one)
        "pp2_cp2_sdpa_doc": ["parallel.pp=2", *CP2, "model.kernels.attention_kernel=sdpa_doc"]},
}


def dp_cp_group():
    return ps.get_data_parallel_group(with_context_parallel=True)


def max_logits(chunks) -> tuple[dict[int, torch.Tensor], dict[tuple, torch.Tensor]]:
    """Per layer, every head's max logit of this step: after the MAX all-reduce over DP x CP
    (heads joined over TP), and as each rank recorded it (keyed by layer, global rank and TP
    rank). Read before QK-Clip resets them."""
    mine, local = {}, {}
    for attention in mla_attentions(chunks):
        s = attention.core_attention.current_max_attn_logits.detach().float().clone()
        local[(attention.layer_number, dist.get_rank(), ps.get_tensor_model_parallel_rank())] = (
            s.clone())
        dist.all_reduce(s, op=dist.ReduceOp.MAX, group=dp_cp_group())
        mine[(attention.layer_number, ps.get_tensor_model_parallel_rank())] = s
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, (mine, local))
    by_layer: dict[int, dict[int, torch.Tensor]] = {}
    per_rank = {}
    for part, part_local in parts:
        per_rank.update(part_local)
        for (layer, tp_rank), s in part.items():
            by_layer.setdefault(layer, {})[tp_rank] = s
    return ({layer: torch.cat([heads[r] for r in sorted(heads)]) for layer, heads in
             by_layer.items()}, per_rank)


def splitting_tau(maxima: dict[int, torch.Tensor]) -> float:
    """A threshold halfway between the middle two of all heads' max logits."""
    values = torch.cat(list(maxima.values())).double().sort().values
    mid = len(values) // 2
    return float(values[mid - 1] + values[mid]) / 2


def clip(chunks, tau: float) -> dict[int, int]:
    """QK-Clip as the trainer runs it (MAX over DP x CP); heads clipped per layer (all ranks)."""
    stats = apply_qk_clip(chunks, group=dp_cp_group(), threshold=tau)
    mine = {(layer, ps.get_tensor_model_parallel_rank()): n
            for layer, n in stats.heads_clipped.items()}
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, mine)
    merged = {k: v for part in parts for k, v in part.items()}
    layers = sorted({layer for layer, _ in merged})
    return {layer: sum(v for (lay, _), v in merged.items() if lay == layer) for layer in layers}


def step(chunks, optimizer, scheduler, batches, tau: float | None, probe=None):
    """One optimizer step then QK-Clip; ``probe()`` runs between the gradients and the update
    and returns ``(grads, max logits)``; ``tau`` None: :func:`splitting_tau` of those maxima."""
    for c in chunks:
        c.zero_grad_buffer()
    optimizer.zero_grad()
    total = run_forward_backward(chunks, batches, SEQ, forward_only=False)
    extra = probe() if probe is not None else None
    if tau is None:
        tau = splitting_tau(extra[1][0])
    _, grad_norm, _ = optimizer.step()
    scheduler.step(increment=1)
    clipped = clip(chunks, tau)
    return (total[0] / total[1]).item(), float(grad_norm), clipped, extra, tau


def routing_in_global_order(recorder: RoutingRecorder, ids: list[int], batches
                            ) -> dict[tuple[int, int], torch.Tensor]:
    """``{(micro-batch, layer): routing [S, experts]}``: each rank's map (its CP chunks, SP
    shard) joined over TP, then put back in global token order over CP."""
    seen: dict[int, int] = {}
    mine = {}
    for layer, routing in recorder.records:
        k = seen.get(layer, 0)
        seen[layer] = k + 1
        key = (ids[k], layer, ps.get_context_parallel_rank(), ps.get_tensor_model_parallel_rank())
        mine[key] = routing
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, mine)
    shards: dict[tuple[int, int], dict[tuple[int, int], torch.Tensor]] = {}
    for part in parts:
        for (mb, layer, cp_rank, tp_rank), routing in part.items():
            shards.setdefault((mb, layer), {})[(cp_rank, tp_rank)] = routing
    cp, tp = ps.get_context_parallel_world_size(), ps.get_tensor_model_parallel_world_size()
    by_id = dict(zip(ids, batches))
    out = {}
    for (mb, layer), got in shards.items():
        cp_parts = [torch.cat([got[(c, t)] for t in range(tp)]) for c in range(cp)]
        out[(mb, layer)] = unsplit_context_parallel(
            cp_parts, by_id[mb].cu_seqlens_padded, SEQ, dim=0)
    return out


def run_case(overrides: list[str], out: Path, init: Path, tau: float | None) -> dict:
    job, chunks, optimizer, scheduler = setup([*QK, *overrides], out)
    load_checkpoint(init, chunks, None, None, load_optimizer=False)  # strict, resharded
    ids, batches = my_batches(all_batches())
    model = unwrap(chunks[0])
    vit = model.vision_tower if model.pre_process else None
    if vit is not None:
        vit.encoded_item_log = []
    params0 = whole(chunks, "param")
    recorder = RoutingRecorder(chunks)
    loss, norm, clipped, (grads, (logits, rank_logits)), tau = step(
        chunks, optimizer, scheduler, batches, tau,
        probe=lambda: (whole(chunks, "grad"), max_logits(chunks)))
    recorder.remove()
    logs = gather_item_logs(vit, batches, job.model.vision.parallel_mode)
    if vit is not None:
        vit.encoded_item_log = None
    norms, clips = [norm], [clipped]
    for _ in range(2):
        _, norm, clipped, _, _ = step(chunks, optimizer, scheduler, batches, tau)
        norms.append(norm)
        clips.append(clipped)
    result = {"routing": routing_in_global_order(recorder, ids, batches), "loss": loss,
              "grad_norms": norms, "grads": grads, "max_logits": logits,
              "rank_max_logits": rank_logits, "clipped": clips,
              "tau": tau, "params0": params0, "params3": whole(chunks, "param"),
              "loss3": forward_loss(chunks, batches), "items": logs}
    return result


def main() -> None:
    out, role = Path(sys.argv[1]), sys.argv[2]
    init = out / "init" / "step_0000000"
    results: dict = {}
    t0 = time.perf_counter()
    if role == "reference":
        job, chunks, _, _ = setup(QK, out)
        save_checkpoint(init.parent, 0, chunks, None, None, {}, job.to_yaml())
        results["ref"] = run_case([], out, init, tau=None)
        torch.save({"tau": results["ref"]["tau"]}, out / "tau.pt")
    else:
        tau = torch.load(out / "tau.pt", weights_only=True)["tau"]
        for name, overrides in LAYOUTS[int(os.environ["WORLD_SIZE"])].items():
            log(f"layout {name}")
            results[name] = run_case(overrides, out, init, tau)
    seconds = save_results(results, out / f"{role}_{dist.get_world_size()}.pt", t0)
    log(f"done in {seconds:.1f} s")


if __name__ == "__main__":
    main()
