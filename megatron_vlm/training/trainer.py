"""The training loop: data -> model -> loss -> optimizer -> checkpoint.

``train(job)`` sets up components (``_setup``: run directory and lock, start-up checks and data,
model, optimizer, schedule, metrics, checkpointer, the step), maybe resumes, then loops: this
rank's micro-batches -> one training step (``step_runner.TrainStep``: forward-backward, one
gradient norm, all ranks agree on finiteness and stops, optimizer step, QK-Clip hook) -> metrics
-> periodic validation and checkpoint. SIGTERM/SIGUSR1 or the stop file save and exit. Every
resource (loader workers, the async checkpoint writer, metrics files, the run-directory lock) is
registered on one ``ExitStack`` as it is created, so any exception closes them all.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from megatron_vlm.checkpoint import load_checkpoint
from megatron_vlm.checkpoint.run_dir import lr_report, start_run
from megatron_vlm.config.job import JobConfig
from megatron_vlm.families import family_costs
from megatron_vlm.models.llm import padded_vocab_size
from megatron_vlm.optim.builder import build_optimizer
from megatron_vlm.optim.schedules import build_scheduler
from megatron_vlm.parallel.init import init_distributed
from megatron_vlm.parallel.runtime import Runtime
from megatron_vlm.training import telemetry
from megatron_vlm.training.banner import startup_banner
from megatron_vlm.training.checkpointing import Checkpointer
from megatron_vlm.training.data_setup import DataSetup
from megatron_vlm.training.flops import llm_flops_per_token
from megatron_vlm.training.init_from import EXTRA_KEY, init_from_checkpoint, trainable_set
from megatron_vlm.training.metrics import MetricsLogger, plot_loss_curves
from megatron_vlm.training.model_setup import build_model_chunks, ddp_choice
from megatron_vlm.training.startup import prepare_run, set_cpu_threads
from megatron_vlm.training.state import StopSignal, TrainState
from megatron_vlm.training.step_runner import (  # noqa: F401  (re-exported for tools and tests)
    StepResult,
    TrainStep,
    evaluate,
    qk_clip_hook,
    run_forward_backward,
    train_step,
)
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


@dataclass
class _Run:
    """The components of one run, built by :func:`_setup`."""

    job: JobConfig
    runtime: Runtime
    data: DataSetup
    chunks: list
    step: TrainStep
    routers: list
    finalize: telemetry.FinalizeWithTelemetry
    metrics: MetricsLogger
    checkpointer: Checkpointer
    state: TrainState
    bias0: list
    llm_flops_per_token: float

    def validate(self) -> dict[str, float]:
        """Every held-out dataset's loss, logged and printed."""
        losses = evaluate(self.chunks, self.data.valid, self.job.data.seq_length,
                          self.runtime.pg_collection)
        self.metrics.log(self.state.step, "valid", {f"loss/{k}": v for k, v in losses.items()},
                         progress=True)
        return losses

    def step_vit_flops(self, batches: list) -> float:
        """This rank's share of the step's vision-tower FLOPs: the tower's work on its
        micro-batches, counted once per data-parallel replica (first pipeline stage, CP rank 0;
        every TP rank holds the same batches and the sum runs over PP and DP x CP only)."""
        vision, pgs = self.job.model.vision, self.runtime.pg_collection
        if vision is None or not (pgs.pp.rank() == 0 and pgs.cp.rank() == 0):
            return 0.0
        step_flops = family_costs(self.job.model.family).step_flops
        return sum(step_flops(vision, self.job.model.llm.hidden_size, b.vision.grid_thw)
                   for b in batches if b.vision is not None)

    def step_samples(self, batches: list) -> int:
        """This rank's share of the step's documents, counted once per data-parallel replica
        (first pipeline stage, CP rank 0, as ``step_vit_flops``)."""
        pgs = self.runtime.pg_collection
        if not (pgs.pp.rank() == 0 and pgs.cp.rank() == 0):
            return 0
        return sum(int(b.cu_seqlens.numel()) - 1 for b in batches)

    def step_values(self, result: StepResult, dt: float) -> dict:
        job, world = self.job, self.runtime.world_size
        seq_tokens = job.data.global_batch_size * job.data.seq_length
        flops = self.llm_flops_per_token * seq_tokens + result.vit_flops
        tflops = flops / dt / world / 1e12
        return {"loss": result.loss, "lr": self.step.optimizer.param_groups[0]["lr"],
                "grad_norm": result.grad_norm, "tokens_per_s": seq_tokens / dt,
                "samples_per_s": result.samples / dt,
                "tflops_per_device": tflops, "mfu": tflops / job.train.peak_tflops,
                "skipped_steps": self.state.skipped_steps, "step_time_s": dt,
                **telemetry.moe_metrics(self.finalize.last_loads, self.routers, self.bias0),
                **result.metrics, **self.data.metrics()}

    def extra_state(self) -> dict:
        """What a checkpoint holds besides model, optimizer and schedule."""
        return {"train_state": self.state.to_dict(), "loader": self.data.loader.state_dict(),
                "expert_bias_at_start": [b.tolist() for b in self.bias0],
                # What the optimizer state belongs to: a later stage keeps it only for the same
                # set.
                EXTRA_KEY: trainable_set(self.chunks)}


def train(job: JobConfig) -> TrainResult:
    """Run (or resume) the job; returns the final state and validation losses."""
    # From here on SIGTERM/SIGUSR1 (preemption) and the stop file only raise a flag: the loop
    # saves and exits at the next step boundary, all ranks together (agreed by a MAX).
    stop = StopSignal()
    with contextlib.ExitStack() as cleanup:
        cleanup.callback(stop.restore)
        return _loop(_setup(job, stop, cleanup), cleanup)


def _loop(run: _Run, cleanup: contextlib.ExitStack) -> TrainResult:
    job, state, metrics, ckpt = run.job, run.state, run.metrics, run.checkpointer
    first_valid = run.validate() if state.step == 0 else {}
    steps_here, stopped = 0, False
    while state.step < job.train.steps:
        ckpt.poll(state.step)  # an async save completes when written
        t0 = time.perf_counter()
        batches = run.data.loader.next_global_batch()
        result = run.step(batches, vit_flops=run.step_vit_flops(batches),
                          samples=run.step_samples(batches))
        dt = time.perf_counter() - t0
        state.record(result.tokens, result.skipped, job.data.global_batch_size)
        metrics.log(state.step, "train", run.step_values(result, dt),
                    progress=(result.skipped or state.step % job.train.log_interval == 0
                              or state.step == job.train.steps))
        if state.consecutive_nonfinite >= job.train.max_consecutive_nonfinite:
            raise NonFiniteLossError(
                f"{state.consecutive_nonfinite} consecutive steps had a non-finite loss or "
                f"gradient (last at step {state.step}); lower optim.lr or check the data. Raise "
                "train.max_consecutive_nonfinite to tolerate more.")
        if job.train.eval_interval and state.step % job.train.eval_interval == 0:
            run.validate()
        steps_here += 1
        done_here = job.train.exit_after_steps is not None and steps_here >= \
            job.train.exit_after_steps
        ckpt.maybe_save(state.step, force=result.stop_requested or done_here)
        if result.stop_requested or done_here:
            ckpt.finish(state.step)  # complete before exiting
            stopped = result.stop_requested
            metrics.message(f"stopping at step {state.step} "
                            f"({'signal' if stopped else 'exit_after_steps'}); "
                            f"checkpoint {ckpt.last_checkpoint}")
            break
    else:
        if job.checkpoint.save_on_exit:
            ckpt.maybe_save(state.step, force=True)
    # Preempted: the grace period is for saving, not for a validation pass.
    final_valid = {} if stopped else run.validate()  # overlaps an async write
    ckpt.finish(state.step)
    metrics.close()
    if run.runtime.rank == 0 and job.train.plot:  # still holding the run directory's lock
        plot_loss_curves(Path(job.train.output_dir) / "metrics.jsonl",
                         Path(job.train.output_dir) / "loss_curve.png")
    cleanup.close()  # writer, loaders, lock
    return TrainResult(state, final_valid, first_valid, ckpt.last_checkpoint, stopped)


def _setup(job: JobConfig, stop: StopSignal, cleanup: contextlib.ExitStack) -> _Run:
    """Build the run's components in data -> model -> optimizer -> metrics -> checkpoint order,
    registering each resource on ``cleanup``; resume or initialise from a checkpoint."""
    runtime = init_distributed(job.parallel, job.train.seed, model=job.model)
    rank, pgs, layout = runtime.rank, runtime.pg_collection, runtime.layout()
    run_dir = Path(job.train.output_dir)
    ckpt_root = Path(job.checkpoint.dir) if job.checkpoint.dir else run_dir / "checkpoints"
    threads = set_cpu_threads(job)
    # Lock the run directory; refuse a fresh run over a previous one, resume=require without a
    # checkpoint, or a checkpoint of another model/layout; pick the checkpoint (rank 0 decides).
    start = start_run(run_dir, ckpt_root, job.checkpoint, job.to_yaml(), layout)
    cleanup.callback(start.release)
    # Inputs, tokenizer, data paths and token ids, before any model memory is spent.
    job, data = prepare_run(job, dp_rank=runtime.dp_rank, dp_size=runtime.dp_size,
                            run_dir=run_dir, resume_from=start.resume_from, is_writer=rank == 0,
                            pg_collection=pgs)  # batches built once per replica, handed over
    cleanup.callback(data.close)
    chunks = build_model_chunks(job, runtime=runtime)
    routers = telemetry.routers_of(chunks)
    finalize = chunks[0].config.finalize_model_grads_func  # set by build_model_chunks
    optimizer = build_optimizer(job.optim, chunks, job.model.params_dtype,
                                job.parallel.use_distributed_optimizer, pgs)
    scheduler = build_scheduler(job.optim, optimizer, job.train.steps)
    state, bias0 = TrainState(), telemetry.expert_bias_snapshot(routers)

    # Everything that may touch a global RNG (TensorBoard's import draws from numpy's) happens
    # before the checkpoint restores RNG states, so a resumed run continues bit-exactly.
    sinks = [WandbSink(job, run_dir)] if rank == 0 and job.train.wandb != "off" else []
    metrics = MetricsLogger(run_dir, is_writer=rank == 0, tensorboard=job.train.tensorboard,
                            total_steps=job.train.steps, peak_tflops=job.train.peak_tflops,
                            sinks=sinks)
    cleanup.callback(metrics.close)
    for line in [*start.messages, *data.notes]:
        metrics.message(line)
    resume_from = start.resume_from
    if resume_from is not None:
        extra = load_checkpoint(resume_from, chunks, optimizer, scheduler, layout=layout)
        state = TrainState.from_dict(extra["train_state"])
        if job.checkpoint.load_data_state:
            data.loader.load_state_dict(extra["loader"])
        else:
            metrics.message("data stream started afresh (checkpoint.load_data_state=false)")
        # On the routers' device: the drift metric subtracts them from the live (CUDA) bias.
        bias_device = routers[0].expert_bias.device if routers else torch.device("cpu")
        bias0 = [torch.tensor(b, device=bias_device) for b in extra["expert_bias_at_start"]]
    elif job.checkpoint.init_from:  # a new run (stage) from another run's weights
        metrics.message(init_from_checkpoint(job.checkpoint.init_from, chunks, optimizer,
                                             scheduler, job.optim.optimizer, layout).message)
        bias0 = telemetry.expert_bias_snapshot(routers)
    for line in startup_banner(job, world_size=runtime.world_size, dp_size=runtime.dp_size,
                               kernels=(f"{runtime.kernels.describe()}; data-parallel: "
                                        f"{ddp_choice(job).describe()}"),
                               tokenizer=data.tokenizer.describe(),
                               data_lines=data.loader.describe(), checkpoint_root=ckpt_root,
                               resume_from=resume_from, resume_step=state.step, threads=threads):
        metrics.message(line)
    if resume_from is not None:
        metrics.message(f"resumed from {resume_from} at step {state.step}")
        for line in lr_report(resume_from, job.optim, job.train.steps, state.step,
                              scheduler.num_steps):
            metrics.message(line)
    hook = qk_clip_hook(chunks, optimizer, job.model.llm.qk_clip_threshold, pgs)
    step = TrainStep(chunks, optimizer, scheduler, job.data.seq_length, routers, stop,
                     hook if hook.active else None, pg_collection=pgs)
    run = _Run(job=job, runtime=runtime, data=data, chunks=chunks, step=step, routers=routers,
               finalize=finalize, metrics=metrics, checkpointer=None, state=state, bias0=bias0,
               llm_flops_per_token=llm_flops_per_token(
                   job.model.llm, job.data.seq_length,
                   padded_vocab_size=padded_vocab_size(job.model.llm.vocab_size,
                                                       job.parallel.tp)))
    # A resumed run's checkpoint counts as saved: a run resumed at its last step saves nothing.
    run.checkpointer = Checkpointer(
        ckpt_root, save_interval=job.checkpoint.save_interval, keep_last=job.checkpoint.keep_last,
        async_save=job.checkpoint.async_save, layout=layout,
        state=(chunks, optimizer, scheduler),
        extra_fn=run.extra_state, config_yaml=job.to_yaml(), metrics=metrics,
        saved_step=state.step if resume_from is not None else None)
    cleanup.callback(run.checkpointer.close)
    return run
