"""Run directories with real (tiny, in-process) trainings: a fresh run into a used directory, a
second job on a running one, ``--resume=require``/``auto`` without a checkpoint, ``--overwrite``,
a resume of another model or parallel layout, and a resume onto a longer WSD schedule (the lr
follows the new schedule; old and new lr logged; a warning as it rises).

Refusals go through ``megatron_vlm.train.main`` (the CLI's exit status and its one error line);
trainings through ``trainer.train``. The tiny text model, a few steps each (~20 s in all)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
from tiny_runs import read_metrics

from megatron_vlm.checkpoint.run_dir import acquire_run_lock
from megatron_vlm.config import apply_overrides
from megatron_vlm.recipes import get_recipe
from megatron_vlm.train import main
from megatron_vlm.training.trainer import train

COMMON = ["train.eval_interval=0", "train.eval_batches=1", "train.tensorboard=false",
          "train.plot=false", "train.log_interval=1", "checkpoint.save_interval=0",
          "data.global_batch_size=2"]
WSD = ["optim.schedule=wsd", "optim.wsd_decay_fraction=0.5", "optim.wsd_decay_style=linear",
       "optim.warmup_steps=2", "optim.lr=0.002", "optim.min_lr=0.0002"]
STOP = 12  # the first run stops here, inside its decay (steps 10-20)


def _wsd(step: int, total: int) -> float:
    """WSD of ``WSD`` written out: warmup 2, constant 2e-3, linear decay to 2e-4 over the last
    half of ``total`` steps."""
    decay = round(0.5 * total)
    if step <= 2:
        return 2e-3 * step / 2
    if step <= total - decay:
        return 2e-3
    return 2e-4 + 1.8e-3 * (1 - (step - (total - decay)) / decay)


@pytest.fixture(scope="module")
def first(tmp_path_factory):
    """A 20-step WSD run stopped at step 12 with a checkpoint; its tokenizer is reused."""
    run = tmp_path_factory.mktemp("rundir") / "first"
    train(apply_overrides(get_recipe("tiny_text_cpu"), [
        *COMMON, *WSD, "train.steps=20", f"train.exit_after_steps={STOP}",
        f"train.output_dir={run}"]))
    return run, [f"data.tokenizer_model={next(run.glob('spm_*.model'))}"]


def _copy(first, dest: Path) -> Path:
    shutil.copytree(first[0], dest)
    return dest


def _cli(run: Path, tok: list[str], *extra: str) -> list[str]:
    return ["--recipe", "tiny_text_cpu", *COMMON, *WSD, "train.steps=20", *tok,
            f"train.output_dir={run}", *extra]


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines[-1].startswith("error: "), err
    return lines[-1]


def test_resume_follows_the_new_schedule(first, tmp_path, capsys):
    run, tok = _copy(first, tmp_path / "run"), first[1]
    old = {r["step"]: r["lr"] for r in read_metrics(run) if r["split"] == "train"}
    assert sorted(old) == list(range(1, STOP + 1))
    for step, lr in old.items():  # the record of step s logs the lr after s scheduler steps
        assert lr == pytest.approx(_wsd(step, 20), rel=1e-9), step
    capsys.readouterr()
    # Extend the run to 40 steps: its decay moves to steps 20-40.
    result = train(apply_overrides(get_recipe("tiny_text_cpu"), [
        *COMMON, *WSD, *tok, "train.steps=40", "checkpoint.resume=auto",
        "train.exit_after_steps=2", f"train.output_dir={run}"]))
    out = capsys.readouterr().out
    assert result.state.step == STOP + 2
    assert f"resumed from {run / 'checkpoints' / f'step_{STOP:07d}'} at step {STOP}" in out
    old_lr, new_lr = _wsd(STOP, 20), _wsd(STOP, 40)
    assert (f"learning rate at resume step {STOP}: {old_lr:.6g} in the checkpoint's schedule"
            in out)
    assert f"-> {new_lr:.6g} in this run's" in out
    assert "warning: the learning rate rises on resume" in out
    assert f"+{100 * (new_lr / old_lr - 1):.1f}%" in out
    new = [r for r in read_metrics(run) if r["split"] == "train" and r["step"] > STOP]
    assert [r["step"] for r in new] == [STOP + 1, STOP + 2]
    for r in new:  # the new schedule's value, not the old one's (which decays here)
        assert r["lr"] == pytest.approx(_wsd(r["step"], 40), rel=1e-9)
        assert r["lr"] > 1.3 * _wsd(r["step"], 20)


def test_fresh_run_into_a_used_directory_is_refused(first, tmp_path, capsys):
    run = _copy(first, tmp_path / "run")
    before = {n: (run / n).read_bytes() for n in ("metrics.jsonl", "job.yaml")}
    assert main(_cli(run, first[1])) == 2
    line = _error_line(capsys)
    assert line.startswith(f"error: run directory {run} holds a previous run (")
    assert f"step_{STOP:07d}" in line and "--resume" in line and "--overwrite" in line
    assert {n: (run / n).read_bytes() for n in before} == before  # nothing touched
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [f"step_{STOP:07d}"]


def test_second_job_on_a_running_directory_is_refused(first, tmp_path, capsys):
    run = _copy(first, tmp_path / "run")
    job_yaml = (run / "job.yaml").read_bytes()
    lock, _ = acquire_run_lock(run)  # the running job
    try:
        assert main(_cli(run, first[1], "--resume")) == 2
    finally:
        lock.release()
    line = _error_line(capsys)
    assert f"run directory {run} is in use by another job (pid {os.getpid()} on host" in line
    assert (run / "job.yaml").read_bytes() == job_yaml


def test_resume_require_without_a_checkpoint_exits_naming_the_directory(first, tmp_path, capsys):
    run = tmp_path / "requeued"
    typo = tmp_path / "chekpoints"  # a mistyped checkpoint.dir on a requeue
    assert main(_cli(run, first[1], f"checkpoint.dir={typo}", "--resume=require")) == 2
    assert _error_line(capsys) == (
        f"error: checkpoint.resume=require: no complete checkpoint in {typo}. Nothing to resume: "
        "check train.output_dir / checkpoint.dir, or start the run with --resume=auto")
    assert not typo.exists() and not run.exists()  # nothing created


def test_resume_of_another_model_or_layout_is_refused(first, tmp_path, capsys):
    run = _copy(first, tmp_path / "run")
    assert main(_cli(run, first[1], "model.llm.num_layers=2", "--resume")) == 2
    line = _error_line(capsys)
    assert f"cannot resume from {run / 'checkpoints' / f'step_{STOP:07d}'}" in line
    assert "model.llm.num_layers: 3 in checkpoint != 2 now" in line
    assert "checkpoint.init_from=" in line
    # A DistributedOptimizer checkpoint saved at tp=2 cannot resume at tp=1 (dp_reshardable):
    # refused from the manifest before megatron reads a tensor.
    manifest_path = run / "checkpoints" / f"step_{STOP:07d}" / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["layout"]["tp"] = 2
    manifest["distributed_optimizer"] = True
    manifest_path.write_text(json.dumps(manifest))
    assert main(_cli(run, first[1], "--resume")) == 2
    line = _error_line(capsys)
    assert "in this parallel layout" in line and "tp: 2 in checkpoint != 1 now" in line


def test_resume_auto_from_nothing_then_overwrite(first, tmp_path, capsys):
    run, tok = tmp_path / "fresh", first[1]

    def job(*extra: str):
        return apply_overrides(get_recipe("tiny_text_cpu"), [
            *COMMON, *tok, "train.steps=2", "optim.warmup_steps=1", f"train.output_dir={run}",
            *extra])

    capsys.readouterr()
    assert train(job("checkpoint.resume=auto")).state.step == 2
    assert (f"checkpoint.resume=auto: no complete checkpoint in {run / 'checkpoints'}; "
            "starting at step 0") in capsys.readouterr().out
    old_metrics = (run / "metrics.jsonl").read_text()

    assert train(job("checkpoint.overwrite=true")).state.step == 2
    (aside,) = run.glob("replaced-*")
    assert (f"checkpoint.overwrite: moved the previous run ({run / 'checkpoints' / 'step_0000002'}"
            f", {run / 'metrics.jsonl'}) to {aside}; starting at step 0") in capsys.readouterr().out
    assert (aside / "metrics.jsonl").read_text() == old_metrics
    assert (aside / "checkpoints" / "step_0000002" / "manifest.json").is_file()
    steps = [r["step"] for r in read_metrics(run) if r["split"] == "train"]
    assert steps == [1, 2]  # a new metrics file, not appended to the old run's
    assert (run / "checkpoints" / "step_0000002" / "manifest.json").is_file()
