"""MoE telemetry: expert loads per layer and expert-bias drift.

megatron-core's ``finalize_model_grads`` updates the expert bias from ``local_tokens_per_expert``
and then zeroes those counters (``distributed/finalize_model_grads.py:477``,
``reset_model_temporary_tensors``), so the loads must be read inside it: ``FinalizeWithTelemetry``
wraps megatron's function, snapshots the counters (summed over TP x CP x DP like megatron does),
and calls it.
"""

from __future__ import annotations

import torch
from megatron.core.distributed.finalize_model_grads import finalize_model_grads

from megatron_vlm.parallel import comm
from megatron_vlm.parallel.runtime import groups_or_default


def routers_of(model_chunks: list) -> list:
    """Every MoE router with an expert bias, in layer order."""
    found = []
    for chunk in model_chunks:
        for module in chunk.modules():
            if hasattr(module, "expert_bias") and module.expert_bias is not None:
                found.append(module)
    return found


class FinalizeWithTelemetry:
    """``config.finalize_model_grads_func`` that records expert loads before megatron resets
    them, on ``pg_collection`` (the run's groups; None: ``groups_or_default``'s). megatron's
    schedules call it with the groups they run on; a call without them gets ours."""

    def __init__(self, model_chunks: list, pg_collection=None) -> None:
        self.routers = routers_of(model_chunks)
        self.last_loads: list[torch.Tensor] = []
        self.pgs = groups_or_default(pg_collection)

    def __call__(self, model, num_tokens=None, pg_collection=None, **kwargs):
        pgs = pg_collection if pg_collection is not None else self.pgs
        if self.routers:
            loads = torch.stack([r.local_tokens_per_expert.detach().clone() for r in self.routers])
            if self.pgs is not None:
                comm.all_reduce(loads, group=self.pgs.tp_dp_cp)
            self.last_loads = list(loads)
        return finalize_model_grads(model, num_tokens, pg_collection=pgs, **kwargs)


def expert_bias_snapshot(routers: list) -> list[torch.Tensor]:
    """Copies of every router's expert bias (to restore after a skipped step, or measure drift)."""
    return [r.expert_bias.detach().clone() for r in routers]


def restore_expert_bias(routers: list, snapshot: list[torch.Tensor]) -> None:
    with torch.no_grad():
        for router, saved in zip(routers, snapshot):
            router.expert_bias.copy_(saved)


def moe_metrics(
    loads: list[torch.Tensor], routers: list, bias_at_start: list[torch.Tensor]
) -> dict[str, float]:
    """Per-layer max/mean expert load and expert-bias drift (L_inf distance from the start)."""
    out: dict[str, float] = {}
    for i, (load, router) in enumerate(zip(loads, routers)):
        name = f"moe/layer{router.layer_number}"
        mean = load.float().mean().item()
        out[f"{name}/max_over_mean_load"] = load.float().max().item() / mean if mean > 0 else 0.0
        if i < len(bias_at_start):
            drift = (router.expert_bias.detach().float() - bias_at_start[i].float()).abs().max()
            out[f"{name}/bias_drift"] = drift.item()
    return out
