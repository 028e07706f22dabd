"""The training loop: data -> model -> loss -> optimizer -> checkpoint.

``train(job)`` reads top to bottom: set up, maybe resume, then per step: this rank's micro-batches
-> megatron's forward-backward schedule -> all ranks agree the loss is finite (else skip and count)
-> optimizer + LR step -> metrics -> periodic validation and checkpoint. SIGTERM saves and exits.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state
from megatron.core.pipeline_parallel import get_forward_backward_func

from megatron_vlm.checkpoint import (
    CheckpointSaver,
    SaveReport,
    load_checkpoint,
    step_dir_name,
)
from megatron_vlm.checkpoint.run_dir import lr_report, start_run
from megatron_vlm.config.job import JobConfig
from megatron_vlm.models.llm import padded_vocab_size
from megatron_vlm.models.vlm import kernel_choice
from megatron_vlm.optim.builder import build_optimizer
from megatron_vlm.optim.qk_clip import (
    apply_qk_clip,
    apply_vit_qk_clip,
    mla_attentions,
    qk_clip_metrics,
    records_max_logits,
    reset_max_logits,
    vision_max_logit_group,
    vision_split_over_tp,
    vit_attentions,
    vit_records_max_logits,
)
from megatron_vlm.optim.schedules import build_scheduler
from megatron_vlm.parallel import comm
from megatron_vlm.parallel.init import init_distributed
from megatron_vlm.training import telemetry
from megatron_vlm.training.banner import startup_banner
from megatron_vlm.training.data_setup import DataSetup
from megatron_vlm.training.flops import llm_flops_per_token
from megatron_vlm.training.init_from import EXTRA_KEY, init_from_checkpoint, trainable_set
from megatron_vlm.training.metrics import MetricsLogger, plot_loss_curves
from megatron_vlm.training.model_setup import build_model_chunks
from megatron_vlm.training.startup import prepare_run, set_cpu_threads
from megatron_vlm.training.state import StopSignal, TrainState
from megatron_vlm.training.step import forward_step
from megatron_vlm.training.wandb_log import WandbSink


class NonFiniteLossError(RuntimeError):
    """Too many consecutive steps with a NaN/Inf loss."""


@dataclass
class TrainResult:
    """What a run leaves behind (for the CLI and tests)."""

    state: TrainState
    final_valid_loss: dict[str, float]
    first_valid_loss: dict[str, float]
    checkpoint: Path | None
    stopped_by_signal: bool


def _reduce_loss_reports(reports: list[dict]) -> torch.Tensor:
    """[sum of token losses, token count] of this step over micro-batches, PP and DP ranks."""
    total = torch.zeros(2, dtype=torch.float64)
    for r in reports:
        total += r["lm loss"].detach().to("cpu", torch.float64)
    if dist.is_initialized():
        # Only the last pipeline stage holds losses; the others contribute zeros.
        # comm moves the CPU sums to the group's device (NCCL has no CPU path) and back.
        comm.all_reduce(total, group=parallel_state.get_pipeline_model_parallel_group())
        comm.all_reduce(
            total, group=parallel_state.get_data_parallel_group(with_context_parallel=True)
        )
    return total


def _agree_any(*flags: bool) -> list[bool]:
    """Each flag OR-ed over all ranks (one small collective per step)."""
    t = torch.tensor([float(f) for f in flags])
    if dist.is_initialized():
        comm.all_reduce(t, op=comm.ReduceOp.MAX)
    return [bool(x) for x in t.tolist()]


def run_forward_backward(chunks, batches, seq_length: int, forward_only: bool) -> torch.Tensor:
    """megatron's schedule over this rank's micro-batches; returns [loss_sum, tokens]."""
    reports = get_forward_backward_func()(
        forward_step_func=forward_step,
        data_iterator=iter(batches),
        model=chunks,
        num_microbatches=len(batches),
        seq_length=seq_length,
        micro_batch_size=1,
        forward_only=forward_only,
    )
    return _reduce_loss_reports(reports)


@torch.no_grad()
def evaluate(chunks, data: DataSetup, seq_length: int) -> dict[str, float]:
    """Per-token mean validation loss for each held-out dataset."""
    for c in chunks:
        c.eval()
    out = {}
    for name, batches in data.valid.items():
        total = run_forward_backward(chunks, batches, seq_length, forward_only=True)
        out[name] = (total[0] / total[1].clamp(min=1)).item()
    for c in chunks:
        c.train()
    return out


def train_step(chunks, optimizer, scheduler, batches, seq_length: int, routers, stop: StopSignal,
               qk_clip_tau: float | None = None):
    """One optimizer step, then QK-Clip (when the model records max logits).

    Returns ``(loss, tokens, grad_norm, skipped, stop_requested, metrics)``; ``metrics`` holds
    the step's extra numbers to log (QK-Clip: max logit and heads clipped, overall and per
    layer), empty for a skipped step.
    """
    for c in chunks:
        c.zero_grad_buffer()
    optimizer.zero_grad()
    qk_clip_on = records_max_logits(chunks)
    vit_clip_on = vit_records_max_logits(chunks)  # model.vision.qk_clip
    if qk_clip_on or vit_clip_on:
        reset_max_logits(chunks)  # evaluation forwards record max logits too
    bias_before = telemetry.expert_bias_snapshot(routers)
    total = run_forward_backward(chunks, batches, seq_length, forward_only=False)
    loss = (total[0] / total[1].clamp(min=1)).item()
    # A finite loss can still give NaN/Inf gradients, which would poison the weights: check the
    # global grad norm before stepping (optimizer.step recomputes it; a small price on ~MBs).
    optimizer.prepare_grads()
    pre_norm = optimizer.get_grad_norm()
    bad = not (torch.isfinite(total[0]).item() and math.isfinite(float(pre_norm or 0.0)))
    nonfinite, stop_requested = _agree_any(bad, stop.requested)
    if nonfinite:
        # The expert-bias update ran inside finalize_model_grads: undo it with the step.
        telemetry.restore_expert_bias(routers, bias_before)
        return loss, int(total[1].item()), float("nan"), True, stop_requested, {}
    _, grad_norm, _ = optimizer.step()
    metrics = {}
    if qk_clip_on:
        # MuonClip (SPEC §2): this step's per-head max logits, MAX over DP x CP, rescale the
        # fp32 master rows of heads above tau; the layer-wise optimizer then sends the owners'
        # bf16 casts to the other DP ranks (sync_params).
        stats = apply_qk_clip(
            chunks, group=parallel_state.get_data_parallel_group(with_context_parallel=True),
            threshold=qk_clip_tau, param_sync=getattr(optimizer, "sync_params", None))
        num_layers = mla_attentions(chunks)[0].config.num_layers
        metrics = qk_clip_metrics(stats, num_layers, parallel_state.get_model_parallel_group())
    if vit_clip_on:
        # The ViT with the same tau; its MAX spans TP too when each TP rank encodes other items.
        tau = qk_clip_tau if qk_clip_tau is not None else mla_attentions(
            chunks)[0].config.qk_clip_threshold
        vit_stats = apply_vit_qk_clip(
            chunks, threshold=tau, group=vision_max_logit_group(chunks),
            param_sync=getattr(optimizer, "sync_params", None))
        # The tower sits on the first PP stage (the writer's); its heads split only under TP mode.
        metrics.update(qk_clip_metrics(
            vit_stats, vit_attentions(chunks)[0].config.num_layers,
            None if vision_split_over_tp(chunks)
            else parallel_state.get_tensor_model_parallel_group(), prefix="vit_qk_clip"))
    scheduler.step(increment=1)
    return loss, int(total[1].item()), float(grad_norm or 0.0), False, stop_requested, metrics


def _save(job, saver: CheckpointSaver, state, chunks, optimizer, scheduler, data,
          bias0) -> list[SaveReport]:
    extra = {
        "train_state": state.to_dict(),
        "loader": data.loader.state_dict(),
        "expert_bias_at_start": [b.tolist() for b in bias0],
        # What the optimizer state belongs to: a later stage keeps it only for the same set.
        EXTRA_KEY: trainable_set(chunks),
    }
    return saver.save(state.step, chunks, optimizer, scheduler, extra, job.to_yaml())


def _log_saves(metrics: MetricsLogger, reports: list[SaveReport], step: int) -> None:
    """One ``checkpoint`` record and line per completed save: how long it blocked the loop."""
    for r in reports:
        metrics.log(r.step, "checkpoint", {**r.metrics(), "completed_at_step": step})
        if not r.async_save:
            metrics.message(
                f"checkpoint {r.path} (sync): blocked the step loop {r.blocked_s:.2f} s")
            continue
        waited = f", waited {r.wait_s:.2f} s for the writer" if r.wait_s else ""
        metrics.message(
            f"checkpoint {r.path} (async): written in the background in "
            f"{r.write_end_unix - r.write_start_unix:.2f} s, complete at step {step}; blocked "
            f"the step loop {r.blocked_s:.2f} s (snapshot {r.schedule_s:.2f}, finalize "
            f"{r.finalize_s:.2f}{waited})")


def train(job: JobConfig) -> TrainResult:
    """Run (or resume) the job; returns the final state and validation losses."""
    # From here on SIGTERM/SIGUSR1 (preemption) only raise a flag: the loop saves and exits at
    # the next step boundary, all ranks together (train_step agrees the flag by a MAX).
    stop = StopSignal()
    # The run directory's lock is released on every way out (crash included; the kernel drops
    # it if the process dies).
    with contextlib.ExitStack() as cleanup:
        try:
            return _train(job, stop, cleanup)
        finally:
            stop.restore()


def _train(job: JobConfig, stop: StopSignal, cleanup: contextlib.ExitStack) -> TrainResult:
    dp = init_distributed(job.parallel, job.train.seed)
    rank = dist.get_rank()
    run_dir = Path(job.train.output_dir)
    ckpt_root = Path(job.checkpoint.dir) if job.checkpoint.dir else run_dir / "checkpoints"
    threads = set_cpu_threads(job)
    # Lock the run directory; refuse a fresh run over a previous one, resume=require without a
    # checkpoint, or a checkpoint of another model/layout; pick the checkpoint (rank 0 decides).
    start = start_run(run_dir, ckpt_root, job.checkpoint, job.to_yaml())
    cleanup.callback(start.release)
    # Inputs, tokenizer, data paths and token ids, before any model memory is spent.
    job, data = prepare_run(job, dp_rank=parallel_state.get_data_parallel_rank(), dp_size=dp,
                            run_dir=run_dir, resume_from=start.resume_from, is_writer=rank == 0)
    chunks = build_model_chunks(job)
    routers = telemetry.routers_of(chunks)
    finalize = telemetry.FinalizeWithTelemetry(chunks)
    for c in chunks:
        c.config.finalize_model_grads_func = finalize
    optimizer = build_optimizer(job.optim, chunks, job.model.params_dtype,
                                job.parallel.use_distributed_optimizer)
    scheduler = build_scheduler(job.optim, optimizer, job.train.steps)
    state, bias0 = TrainState(), telemetry.expert_bias_snapshot(routers)

    # Everything that may touch a global RNG (TensorBoard's import draws from numpy's) happens
    # before the checkpoint restores RNG states, so a resumed run continues bit-exactly.
    sinks = [WandbSink(job, run_dir)] if rank == 0 and job.train.wandb != "off" else []
    metrics = MetricsLogger(run_dir, is_writer=rank == 0, tensorboard=job.train.tensorboard,
                            total_steps=job.train.steps, peak_tflops=job.train.peak_tflops,
                            sinks=sinks)
    for line in [*start.messages, *data.notes]:
        metrics.message(line)
    resume_from = start.resume_from
    if resume_from is not None:
        extra = load_checkpoint(resume_from, chunks, optimizer, scheduler)
        state = TrainState.from_dict(extra["train_state"])
        if job.checkpoint.load_data_state:
            data.loader.load_state_dict(extra["loader"])
        else:
            metrics.message("data stream started afresh (checkpoint.load_data_state=false)")
        bias0 = [torch.tensor(b) for b in extra["expert_bias_at_start"]]
    elif job.checkpoint.init_from:  # a new run (stage) from another run's weights
        metrics.message(init_from_checkpoint(job.checkpoint.init_from, chunks, optimizer,
                                             scheduler).message)
        bias0 = telemetry.expert_bias_snapshot(routers)

    for line in startup_banner(job, world_size=dist.get_world_size(), dp_size=dp,
                               kernels=kernel_choice(job.model, job.parallel).describe(),
                               tokenizer=data.tokenizer.describe(),
                               data_lines=data.loader.describe(), checkpoint_root=ckpt_root,
                               resume_from=resume_from, resume_step=state.step, threads=threads):
        metrics.message(line)
    if resume_from is not None:
        metrics.message(f"resumed from {resume_from} at step {state.step}")
        for line in lr_report(resume_from, job.optim, job.train.steps, state.step,
                              scheduler.num_steps):
            metrics.message(line)
    seq_len = job.data.seq_length
    flops_per_token = llm_flops_per_token(
        job.model.llm, seq_len,
        padded_vocab_size=padded_vocab_size(job.model.llm.vocab_size, job.parallel.tp))
    world = dist.get_world_size()
    first_valid = evaluate(chunks, data, seq_len) if state.step == 0 else {}
    if first_valid:
        metrics.log(state.step, "valid", {f"loss/{k}": v for k, v in first_valid.items()},
                    progress=True)
    saver = CheckpointSaver(ckpt_root, job.checkpoint.keep_last, job.checkpoint.async_save)
    # A resumed run's checkpoint counts as saved: a run resumed at its last step saves nothing.
    last_ckpt, steps_here, stopped = resume_from, 0, False

    while state.step < job.train.steps:
        _log_saves(metrics, saver.poll(), state.step)  # an async save completes when written
        t0 = time.perf_counter()
        batches = data.loader.next_global_batch()
        loss, tokens, grad_norm, skipped, stop_requested, step_metrics = train_step(
            chunks, optimizer, scheduler, batches, seq_len, routers, stop,
            job.model.llm.qk_clip_threshold)
        dt = time.perf_counter() - t0
        state.step += 1
        steps_here += 1
        state.consumed_sequences += job.data.global_batch_size
        state.consumed_tokens += tokens
        state.skipped_steps += int(skipped)
        state.consecutive_nonfinite = state.consecutive_nonfinite + 1 if skipped else 0
        seq_tokens = job.data.global_batch_size * seq_len
        tflops = flops_per_token * seq_tokens / dt / world / 1e12
        values = {"loss": loss, "lr": optimizer.param_groups[0]["lr"], "grad_norm": grad_norm,
                  "tokens_per_s": seq_tokens / dt, "tflops_per_device": tflops,
                  "mfu": tflops / job.train.peak_tflops, "skipped_steps": state.skipped_steps,
                  "step_time_s": dt,
                  **telemetry.moe_metrics(finalize.last_loads, routers, bias0), **step_metrics,
                  **data.metrics()}
        metrics.log(state.step, "train", values,
                    progress=(skipped or state.step % job.train.log_interval == 0
                              or state.step == job.train.steps))
        if state.consecutive_nonfinite >= job.train.max_consecutive_nonfinite:
            saver.close()
            metrics.close()
            data.close()
            raise NonFiniteLossError(
                f"{state.consecutive_nonfinite} consecutive steps had a non-finite loss or "
                f"gradient (last at step {state.step}); lower optim.lr or check the data. Raise "
                "train.max_consecutive_nonfinite to tolerate more.")
        if job.train.eval_interval and state.step % job.train.eval_interval == 0:
            metrics.log(state.step, "valid",
                        {f"loss/{k}": v for k, v in evaluate(chunks, data, seq_len).items()},
                        progress=True)
        done_here = (job.train.exit_after_steps is not None
                     and steps_here >= job.train.exit_after_steps)
        save_now = (job.checkpoint.save_interval and state.step % job.checkpoint.save_interval == 0)
        if save_now or stop_requested or done_here:
            _log_saves(metrics, _save(job, saver, state, chunks, optimizer, scheduler, data,
                                      bias0), state.step)
            last_ckpt = ckpt_root / step_dir_name(state.step)
        if stop_requested or done_here:
            _log_saves(metrics, saver.finish(), state.step)  # complete before exiting
            stopped = stop_requested
            metrics.message(f"stopping at step {state.step} "
                            f"({'signal' if stop_requested else 'exit_after_steps'}); "
                            f"checkpoint {last_ckpt}")
            break
    else:
        if job.checkpoint.save_on_exit and (last_ckpt is None or
                                            not last_ckpt.name.endswith(f"{state.step:07d}")):
            _log_saves(metrics, _save(job, saver, state, chunks, optimizer, scheduler, data,
                                      bias0), state.step)
            last_ckpt = ckpt_root / step_dir_name(state.step)

    # Preempted: the grace period is for saving, not for a validation pass.
    final_valid = {} if stopped else evaluate(chunks, data, seq_len)  # overlaps an async write
    if final_valid:
        metrics.log(state.step, "valid", {f"loss/{k}": v for k, v in final_valid.items()},
                    progress=True)
    _log_saves(metrics, saver.finish(), state.step)
    saver.close()
    metrics.close()
    if rank == 0 and job.train.plot:
        plot_loss_curves(run_dir / "metrics.jsonl", run_dir / "loss_curve.png")
    data.close()
    return TrainResult(state, final_valid, first_valid, last_ckpt, stopped)
