"""Async checkpointing inside the training loop (one process, gloo, in this pytest process).

One preempted run proves, from recorded timestamps and step numbers: training steps complete
while the background writer of step 3's checkpoint is still writing; SIGTERM arriving during
that in-flight write still ends with complete checkpoints only (step 3's, finished first, and
the stop step's) and a clean return; a resumed run continues from the stop step.

The writer is slowed down (sleeps in the bucket writer that the writer process runs,
``slow_ckpt_writer.py``) so the overlap does not depend on machine speed; the proof is the
timestamps of the steps and of the write, not the sleep. The write happens in the persistent
writer process, not in the trainer (its pid is recorded).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from slow_ckpt_writer import AFTER_SIGNAL_S, BEFORE_SIGNAL_S, LOG_ENV, PID_ENV, slow_write_buckets

from megatron_vlm.checkpoint import async_writer, find_latest_checkpoint, verify_checkpoint
from megatron_vlm.config import apply_overrides
from megatron_vlm.recipes import get_recipe
from megatron_vlm.training.trainer import train

SAVE_AT = 3


def _job(run_dir: Path, steps: int, resume: bool = False):
    return apply_overrides(get_recipe("tiny_text_cpu"), [
        f"train.steps={steps}", "optim.warmup_steps=1", "train.eval_interval=0",
        "train.log_interval=1", "train.tensorboard=false", "train.plot=false",
        f"train.output_dir={run_dir}", f"checkpoint.save_interval={SAVE_AT}",
        "checkpoint.async_save=true", f"checkpoint.resume={str(resume).lower()}"])


def _records(run_dir: Path) -> list[dict]:
    return [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def preempted(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("async_train")
    signal_log = run_dir / "signal_sent.json"
    mp = pytest.MonkeyPatch()
    mp.setenv(PID_ENV, str(os.getpid()))
    mp.setenv(LOG_ENV, str(signal_log))
    mp.setattr(async_writer, "write_buckets_to_queue", slow_write_buckets)
    try:
        result = train(_job(run_dir, steps=1_000))  # the SIGTERM stops it long before
    finally:
        mp.undo()
    sent = json.loads(signal_log.read_text())
    assert sent["writer_pid"] != os.getpid()  # written by the writer process, not the trainer
    return run_dir, result, sent["time"]


def test_steps_complete_while_the_write_is_in_flight(preempted):
    run_dir, _, _ = preempted
    records = _records(run_dir)
    (first,) = [r for r in records if r["split"] == "checkpoint" and r["step"] == SAVE_AT]
    assert first["async"] == 1.0
    during = [r["step"] for r in records if r["split"] == "train"
              and first["write_start_unix"] < r["time"] < first["write_end_unix"]]
    assert during and min(during) > SAVE_AT, (during, first)
    assert first["completed_at_step"] > SAVE_AT
    assert first["write_s"] >= BEFORE_SIGNAL_S + AFTER_SIGNAL_S


def test_sigterm_during_inflight_save_leaves_complete_checkpoints(preempted):
    run_dir, result, signal_time = preempted
    records = _records(run_dir)
    (first,) = [r for r in records if r["split"] == "checkpoint" and r["step"] == SAVE_AT]
    assert first["write_start_unix"] < signal_time < first["write_end_unix"]  # in flight
    stop = result.state.step
    assert result.stopped_by_signal and stop > SAVE_AT
    ckpts = run_dir / "checkpoints"
    names = sorted(p.name for p in ckpts.iterdir())  # no .tmp-* leftovers
    steps = [int(n.removeprefix("step_")) for n in names]
    # Step 3's (finished first), any later interval saves (keep_last=3), the stop step's.
    assert steps[0] == SAVE_AT and steps[-1] == stop, names
    assert all(s % SAVE_AT == 0 for s in steps[:-1]) and len(steps) <= 3
    for name, step in zip(names, steps):
        assert verify_checkpoint(ckpts / name, full=True)["step"] == step
    assert find_latest_checkpoint(ckpts) == result.checkpoint == ckpts / f"step_{stop:07d}"
    # Each checkpoint holds the loop state of its own step, not of the step it completed at.
    for step in (SAVE_AT, stop):
        rank0 = verify_checkpoint(ckpts / f"step_{step:07d}")["extra_rank0"]
        assert rank0["train_state"]["step"] == step


def test_resumes_from_the_stop_step(preempted):
    run_dir, result, _ = preempted
    stop = result.state.step
    again = train(_job(run_dir, steps=stop + 2, resume=True))
    assert again.state.step == stop + 2 and not again.stopped_by_signal
    steps = [r["step"] for r in _records(run_dir) if r["split"] == "train"]
    assert steps[-2:] == [stop + 1, stop + 2] and steps.count(stop + 1) == 1
