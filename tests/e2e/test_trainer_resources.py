"""Every resource of a run is closed when a step raises: no energon loader worker or async
checkpoint writer process outlives the exception, the metrics file is closed and the run
directory's lock released (a new run can take the directory)."""

from __future__ import annotations

import time

import psutil
import pytest

from megatron_vlm.config import apply_overrides
from megatron_vlm.recipes import get_recipe


class InjectedFailure(RuntimeError):
    pass


def _children() -> set[int]:
    return {p.pid for p in psutil.Process().children(recursive=True) if p.is_running()
            and p.status() != psutil.STATUS_ZOMBIE}


def test_an_exception_mid_run_closes_workers_writer_metrics_and_lock(tmp_path, monkeypatch):
    from megatron_vlm.checkpoint.run_dir import RunDirError
    from megatron_vlm.training import step_runner, trainer

    run = tmp_path / "run"
    job = apply_overrides(get_recipe("tiny_vlm_cpu"), [
        f"train.output_dir={run}", "train.steps=6", "optim.warmup_steps=1",
        "train.eval_interval=0", "train.eval_batches=1", "data.global_batch_size=2",
        "data.multimodal.num_workers=1", "checkpoint.async_save=true",
        "checkpoint.save_interval=1", "train.plot=false", "train.tensorboard=false"])
    before = _children()
    real_call = step_runner.TrainStep.__call__
    calls = []

    def failing_call(self, batches, vit_flops=0.0, samples=0):
        calls.append(1)
        if len(calls) == 3:  # after two steps: a save in flight, loader workers busy
            assert _children() - before, "the run should have worker processes by now"
            raise InjectedFailure("injected")
        return real_call(self, batches, vit_flops, samples)

    monkeypatch.setattr(step_runner.TrainStep, "__call__", failing_call)
    with pytest.raises(InjectedFailure):
        trainer.train(job)
    deadline = time.monotonic() + 5  # closed on the way out, not left to the garbage collector
    while _children() - before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not _children() - before, [psutil.Process(p).cmdline() for p in _children() - before]
    # The checkpoints that were written are complete (the in-flight one finished).
    assert (run / "checkpoints" / "step_0000002" / "manifest.json").is_file()
    # The lock is gone: the same directory resumes in a new run (no "in use" refusal).
    monkeypatch.setattr(step_runner.TrainStep, "__call__", real_call)
    resumed = apply_overrides(job, ["checkpoint.resume=require", "train.steps=3"])
    try:
        result = trainer.train(resumed)
    except RunDirError as e:  # pragma: no cover - the assertion below explains
        pytest.fail(f"the failed run left its lock behind: {e}")
    assert result.state.step == 3
