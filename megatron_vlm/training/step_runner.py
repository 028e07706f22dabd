"""One training step and the validation pass, as components the loop calls.

A step: zero the gradients -> megatron's forward-backward schedule over this rank's micro-batches
-> the global gradient norm, computed once (``optim/step.py``) -> every rank agrees whether the
loss and gradients are finite and whether a stop was requested (one MAX all-reduce) -> clip and
step, or skip (undoing the router's expert-bias update) -> the post-step hook (QK-Clip) -> the LR
schedule. The step's numbers come back in a :class:`StepResult` after one host sync.

Every collective here and in megatron's schedule runs on the ``pg_collection`` given (the
runtime's; None: ``parallel.runtime.groups_or_default``'s, for tests and tools).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from megatron.core.pipeline_parallel import get_forward_backward_func
from megatron.core.pipeline_parallel.p2p_communication import P2PCommunicator
from megatron.core.process_groups_config import ProcessGroupCollection
from megatron.core.utils import get_model_config

from megatron_vlm.optim.qk_clip import (
    QKClipHook,
    vision_max_logit_group,
    vision_split_over_tp,
)
from megatron_vlm.optim.step import step_with_grad_norm
from megatron_vlm.parallel import comm
from megatron_vlm.parallel.runtime import compute_device, groups_or_default
from megatron_vlm.training import telemetry
from megatron_vlm.training.state import StopSignal
from megatron_vlm.training.step import forward_step


@dataclass
class StepResult:
    """What one training step reports."""

    loss: float
    """Per-token mean loss over every micro-batch and DP rank (NaN/Inf for a skipped step)."""
    tokens: int
    """Real tokens with a loss, over all DP ranks."""
    grad_norm: float
    """Global gradient norm before clipping (NaN for a skipped step)."""
    skipped: bool
    """The loss or the gradients were not finite on some rank: no update."""
    stop_requested: bool
    """A stop (signal or stop file) was seen on some rank: save and exit after this step."""
    metrics: dict[str, float] = field(default_factory=dict)
    """Extra numbers to log (QK-Clip maxima and heads clipped); empty for a skipped step."""
    vit_flops: float = 0.0
    """The step's vision-tower + projector training FLOPs over all DP replicas."""
    samples: int = 0
    """Documents (packed samples) in the step over all DP replicas."""

    def astuple(self) -> tuple:
        """The former 6-tuple ``(loss, tokens, grad_norm, skipped, stop_requested, metrics)``."""
        return (self.loss, self.tokens, self.grad_norm, self.skipped, self.stop_requested,
                self.metrics)

    def __iter__(self) -> Iterator[Any]:
        """Unpacks as the former 6-tuple (code written against it keeps working)."""
        return iter(self.astuple())

    def __getitem__(self, index: int) -> Any:
        return self.astuple()[index]


def _reduce_totals(total: torch.Tensor, pgs: ProcessGroupCollection | None) -> torch.Tensor:
    """Sum per-rank step totals over the pipeline (only the last stage holds losses) and over
    DP x CP; comm places them on the group's device (NCCL has no CPU path) and back. Step totals
    stay on :func:`~megatron_vlm.parallel.runtime.compute_device` so the step needs one host
    sync, not one per collective."""
    if pgs is not None:
        comm.all_reduce(total, group=pgs.pp)
        comm.all_reduce(total, group=pgs.dp_cp)
    return total


def _schedule(chunks, pgs: ProcessGroupCollection) -> tuple[Callable, dict]:
    """megatron's forward-backward function for this layout and the groups it runs on."""
    config = get_model_config(chunks[0])
    pp_size, vp_size = pgs.pp.size(), config.virtual_pipeline_model_parallel_size
    kwargs: dict[str, Any] = {"pg_collection": pgs}
    if pp_size > 1:  # the pipelined schedules take both or neither
        kwargs["p2p_communicator"] = P2PCommunicator(pp_group=pgs.pp, config=config)
    return get_forward_backward_func(pp_size=pp_size, vp_size=vp_size), kwargs


def _local_totals(chunks, batches, seq_length: int, forward_only: bool,
                  pgs: ProcessGroupCollection,
                  schedule: tuple[Callable, dict] | None = None) -> torch.Tensor:
    """megatron's schedule (``_schedule``'s, or the caller's, built once) over this rank's
    micro-batches; this rank's ``[loss_sum, tokens]``."""
    schedule, groups = schedule or _schedule(chunks, pgs)
    reports = schedule(
        forward_step_func=forward_step,
        data_iterator=iter(batches),
        model=chunks,
        num_microbatches=len(batches),
        seq_length=seq_length,
        micro_batch_size=1,
        forward_only=forward_only,
        **groups,
    )
    total = torch.zeros(2, dtype=torch.float64, device=compute_device())
    for r in reports:
        total += r["lm loss"].detach().to(total.device, torch.float64)
    return total


def run_forward_backward(chunks, batches, seq_length: int, forward_only: bool,
                         pg_collection: ProcessGroupCollection | None = None) -> torch.Tensor:
    """megatron's schedule over this rank's micro-batches; returns ``[loss_sum, tokens]`` (float64,
    on :func:`~megatron_vlm.parallel.runtime.compute_device`) summed over micro-batches, PP and
    DP x CP ranks."""
    pgs = groups_or_default(pg_collection, required=True)
    return _reduce_totals(_local_totals(chunks, batches, seq_length, forward_only, pgs), pgs)


@torch.no_grad()
def evaluate(chunks, valid: dict[str, list], seq_length: int,
             pg_collection: ProcessGroupCollection | None = None) -> dict[str, float]:
    """Per-token mean validation loss for each held-out dataset."""
    for c in chunks:
        c.eval()
    out = {}
    for name, batches in valid.items():
        total = run_forward_backward(chunks, batches, seq_length, forward_only=True,
                                     pg_collection=pg_collection)
        out[name] = (total[0] / total[1].clamp(min=1)).item()
    for c in chunks:
        c.train()
    return out


def qk_clip_hook(chunks, optimizer, threshold: float | None,
                 pg_collection: ProcessGroupCollection | None = None) -> QKClipHook:
    """The QK-Clip post-step hook of these chunks on this run's process groups (None groups
    when there are none: one process)."""
    pgs = groups_or_default(pg_collection)
    return QKClipHook(
        chunks, threshold=threshold, param_sync=getattr(optimizer, "sync_params", None),
        dp_cp_group=pgs.dp_cp if pgs is not None else None,
        model_parallel_group=pgs.mp if pgs is not None else None,
        vit_group=vision_max_logit_group(chunks, pgs),
        # The tower sits on the first PP stage; its heads split over TP only in TP mode.
        vit_metrics_group=(None if pgs is None or vision_split_over_tp(chunks) else pgs.tp))


class TrainStep:
    """Callable one-step component (see the module docstring).

    Args:
        chunks: this rank's DDP-wrapped model chunks.
        optimizer: the megatron optimizer.
        scheduler: the LR schedule (stepped once per successful step).
        seq_length: packed sequence length S.
        routers: MoE routers (expert bias snapshot/restore around a skipped step).
        stop: the stop flag (signals, stop file).
        hook: post-step hook (QK-Clip); None for none.
        grad_norm_fn: the optimizer's norm (tests count its calls); default
            ``optimizer.get_grad_norm``.
        pg_collection: the run's process groups (None: ``groups_or_default``'s).
    """

    def __init__(self, chunks, optimizer, scheduler, seq_length: int, routers: list,
                 stop: StopSignal, hook: QKClipHook | None = None,
                 grad_norm_fn: Callable[[], float] | None = None,
                 pg_collection: ProcessGroupCollection | None = None) -> None:
        self.chunks, self.optimizer, self.scheduler = chunks, optimizer, scheduler
        self.seq_length, self.routers, self.stop, self.hook = seq_length, routers, stop, hook
        self.grad_norm_fn = grad_norm_fn or optimizer.get_grad_norm
        self.pgs = groups_or_default(pg_collection, required=True)
        self.schedule = _schedule(chunks, self.pgs)  # once: the same function and groups each step

    def __call__(self, batches: list, vit_flops: float = 0.0, samples: int = 0) -> StepResult:
        """One step on this rank's micro-batches; ``vit_flops`` and ``samples`` are this rank's
        shares of the step's vision FLOPs and documents (summed over PP and DP x CP with the
        loss, one collective)."""
        for c in self.chunks:
            c.zero_grad_buffer()
        self.optimizer.zero_grad()
        if self.hook is not None:
            self.hook.before_step()
        bias_before = telemetry.expert_bias_snapshot(self.routers)
        local = _local_totals(self.chunks, batches, self.seq_length, False, self.pgs,
                              self.schedule)
        total = _reduce_totals(torch.cat([local, local.new_tensor([vit_flops, samples])]),
                               self.pgs)
        # A finite loss can still give NaN/Inf gradients, which would poison the weights: the
        # norm is computed once, before deciding, and the step reuses it.
        self.optimizer.prepare_grads()
        grad_norm = float(self.grad_norm_fn() or 0.0)
        # Both flags, OR-ed over all ranks with the stop request in one collective; the loss
        # check stays on the device until the one host sync below.
        flags = torch.stack([(~torch.isfinite(total[0])).to(torch.float64),
                             total.new_tensor(float(not math.isfinite(grad_norm))),
                             total.new_tensor(float(self.stop.requested))])
        comm.all_reduce(flags, op=comm.ReduceOp.MAX)  # the default group: every rank
        loss_sum, tokens, flops, docs, bad_loss, bad_norm, stop = torch.cat(
            [total, flags]).tolist()
        loss = loss_sum / max(tokens, 1.0)
        if bad_loss or bad_norm:
            # The expert-bias update ran inside finalize_model_grads: undo it with the step.
            telemetry.restore_expert_bias(self.routers, bias_before)
            return StepResult(loss, int(tokens), float("nan"), True, bool(stop), vit_flops=flops,
                              samples=int(docs))
        step_with_grad_norm(self.optimizer, grad_norm)
        metrics = self.hook.after_step() if self.hook is not None else {}
        self.scheduler.step(increment=1)
        return StepResult(loss, int(tokens), grad_norm, False, bool(stop), metrics, flops,
                          int(docs))


def train_step(chunks, optimizer, scheduler, batches, seq_length: int, routers,
               stop: StopSignal, qk_clip_tau: float | None = None,
               pg_collection: ProcessGroupCollection | None = None) -> StepResult:
    """One step with a fresh :class:`TrainStep` (for tests and tools that drive steps)."""
    hook = qk_clip_hook(chunks, optimizer, qk_clip_tau, pg_collection)
    return TrainStep(chunks, optimizer, scheduler, seq_length, routers, stop,
                     hook if hook.active else None, pg_collection=pg_collection)(batches)
