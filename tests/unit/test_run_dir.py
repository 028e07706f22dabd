"""Run directories (``checkpoint/run_dir.py``): the one-job lock, the refusal of a fresh run over a
previous one, ``--overwrite``, ``resume=auto|require`` without a checkpoint, what a resume
refuses (another model; optimizer state the layout cannot take), the learning rate across a
resume, and the CLI flags. No training here (``tests/e2e/test_run_dir_training.py`` trains)."""

from __future__ import annotations

import errno
import fcntl
import json
import math
import multiprocessing
import os
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml

from megatron_vlm.checkpoint import run_dir as rd
from megatron_vlm.checkpoint.manifest import FORMAT, model_section, structural_hash
from megatron_vlm.checkpoint.run_dir import (
    RunDirError,
    acquire_run_lock,
    choose_start,
    lr_report,
    previous_run,
    resume_problem,
)
from megatron_vlm.config import CheckpointConfig, apply_overrides
from megatron_vlm.optim.schedules import build_scheduler
from megatron_vlm.recipes import get_recipe

# --- the lock ------------------------------------------------------------------------------------


def _holder(d: Path) -> dict:
    return json.loads((d / "run.lock").read_text())


def test_second_job_is_refused_and_the_lock_released_on_exit(tmp_path):
    lock, message = acquire_run_lock(tmp_path)
    assert message is None
    assert _holder(tmp_path)["pid"] == os.getpid()
    assert _holder(tmp_path)["host"] == socket.gethostname()
    # A second job (another open file description: the kernel's flock is per open file).
    with pytest.raises(RunDirError, match=rf"in use by another job \(pid {os.getpid()} on host"):
        acquire_run_lock(tmp_path)
    lock.release()
    assert not (tmp_path / "run.lock").exists()
    again, message = acquire_run_lock(tmp_path)  # free again, and nothing stale to report
    assert message is None
    again.release()


def _hold(d: str, ready) -> None:  # child process: take the lock, then wait to be killed
    acquire_run_lock(Path(d))
    ready.set()
    time.sleep(600)


def test_lock_of_a_killed_job_is_taken_over_with_a_message(tmp_path):
    ctx = multiprocessing.get_context("fork")
    ready = ctx.Event()
    child = ctx.Process(target=_hold, args=(str(tmp_path), ready), daemon=True)
    child.start()
    try:
        assert ready.wait(30)
        with pytest.raises(RunDirError, match=f"pid {child.pid} on host"):
            acquire_run_lock(tmp_path)  # the job is running: refused
    finally:
        os.kill(child.pid, signal.SIGKILL)  # no clean-up: the lock file stays behind
        child.join(30)
    assert _holder(tmp_path)["pid"] == child.pid
    lock, message = acquire_run_lock(tmp_path)
    assert f"took over the stale lock {tmp_path / 'run.lock'} of pid {child.pid}" in message
    assert _holder(tmp_path)["pid"] == os.getpid()
    lock.release()


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


def _write_holder(d: Path, host: str, pid: int) -> None:
    (d / "run.lock").write_text(json.dumps({"host": host, "pid": pid, "started_utc": "then"}))


def test_lock_file_of_a_dead_pid_on_this_host(tmp_path, monkeypatch):
    dead = _dead_pid()
    _write_holder(tmp_path, socket.gethostname(), dead)
    lock, message = acquire_run_lock(tmp_path)
    assert f"of pid {dead} on host {socket.gethostname()}" in message and "gone" in message
    lock.release()

    # A file system without flock: the pid decides (alive: refused; dead: taken over).
    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        _write_holder(tmp_path, socket.gethostname(), sleeper.pid)
        with pytest.raises(RunDirError, match=f"pid {sleeper.pid}"):
            acquire_run_lock(tmp_path)
    finally:
        sleeper.kill()
        sleeper.wait()
    lock, message = acquire_run_lock(tmp_path)  # sleeper is dead now
    assert f"of pid {sleeper.pid}" in message
    lock.release()


def test_lock_of_another_host_is_judged_by_its_heartbeat(tmp_path, monkeypatch):
    """flock may be node-local (Lustre localflock): another host's holder is alive iff the
    lock file's mtime moves while we watch."""
    monkeypatch.setattr(rd, "HEARTBEAT_S", 0.08)
    _write_holder(tmp_path, "elsewhere", 4242)
    stop = threading.Event()

    def beat():
        while not stop.wait(0.02):
            os.utime(tmp_path / "run.lock")

    beating = threading.Thread(target=beat)
    beating.start()
    try:
        with pytest.raises(RunDirError, match="pid 4242 on host elsewhere"):
            acquire_run_lock(tmp_path)
    finally:
        stop.set()
        beating.join()
    lock, message = acquire_run_lock(tmp_path)  # heartbeat stopped: that job is gone
    assert "of pid 4242 on host elsewhere" in message
    # Our own heartbeat moves the file's mtime.
    before = (tmp_path / "run.lock").stat().st_mtime_ns
    time.sleep(0.3)
    assert (tmp_path / "run.lock").stat().st_mtime_ns != before
    lock.release()


# --- previous runs, overwrite, resume modes ------------------------------------------------------


def _fake_checkpoint(root: Path, step: int, **manifest) -> Path:
    """A directory that passes the completeness check (manifest, no files)."""
    path = root / f"step_{step:07d}"
    path.mkdir(parents=True)
    (path / "manifest.json").write_text(json.dumps(
        {"format": FORMAT, "format_version": 1, "step": step, "files": [], **manifest}))
    return path


def test_fresh_run_over_a_previous_run_is_refused(tmp_path):
    run = tmp_path / "run"
    ckpts = run / "checkpoints"
    run.mkdir()
    (run / "spm_1024.model").write_bytes(b"tok")  # a tokenizer alone is no previous run
    (run / "metrics.jsonl").write_text("")  # nor an empty metrics file
    assert choose_start(run, ckpts, CheckpointConfig()) == (None, [])
    (run / "metrics.jsonl").write_text('{"step": 1, "split": "train"}\n')
    with pytest.raises(RunDirError) as err:
        choose_start(run, ckpts, CheckpointConfig())
    assert f"run directory {run} holds a previous run ({run / 'metrics.jsonl'})" in str(err.value)
    assert "--resume" in str(err.value) and "--overwrite" in str(err.value)
    (run / "metrics.jsonl").unlink()
    (ckpts / "step_0000004").mkdir(parents=True)  # even an incomplete checkpoint
    with pytest.raises(RunDirError, match="step_0000004"):
        choose_start(run, ckpts, CheckpointConfig())


def test_overwrite_moves_the_previous_run_aside(tmp_path):
    run = tmp_path / "run"
    ckpts = run / "checkpoints"
    old = _fake_checkpoint(ckpts, 4)
    (ckpts / ".tmp-step_0000006-ab").mkdir()
    (run / "metrics.jsonl").write_text("old\n")
    (run / "tensorboard").mkdir()
    (run / "loss_curve.png").write_bytes(b"png")
    (run / "spm_1024.model").write_bytes(b"tok")
    resume_from, [message] = choose_start(run, ckpts, CheckpointConfig(overwrite=True))
    assert resume_from is None
    (aside,) = run.glob("replaced-*")
    assert f"to {aside}; starting at step 0" in message
    assert (aside / "checkpoints" / old.name / "manifest.json").is_file()
    assert (aside / "checkpoints" / ".tmp-step_0000006-ab").is_dir()
    assert (aside / "metrics.jsonl").read_text() == "old\n"
    assert (aside / "tensorboard").is_dir() and (aside / "loss_curve.png").is_file()
    assert (run / "spm_1024.model").is_file()  # the tokenizer stays
    assert previous_run(run, ckpts) == [] and not (run / "metrics.jsonl").exists()

    # Checkpoints outside the run directory go beside their root.
    outside = tmp_path / "elsewhere" / "ckpts"
    _fake_checkpoint(outside, 2)
    choose_start(run, outside, CheckpointConfig(overwrite=True))
    (moved,) = outside.parent.glob("ckpts.replaced-*")
    assert (moved / "step_0000002" / "manifest.json").is_file()
    assert list(outside.iterdir()) == []


def test_resume_auto_and_require_without_a_checkpoint(tmp_path):
    run, ckpts = tmp_path / "run", tmp_path / "run" / "checkpoints"
    resume_from, messages = choose_start(run, ckpts, CheckpointConfig(resume="auto"))
    assert resume_from is None
    assert messages == [f"checkpoint.resume=auto: no complete checkpoint in {ckpts}; "
                        "starting at step 0"]
    with pytest.raises(RunDirError, match=f"resume=require: no complete checkpoint in {ckpts}"):
        choose_start(run, ckpts, CheckpointConfig(resume="require"))
    (ckpts / "step_0000007").mkdir(parents=True)  # no manifest: an interrupted save
    with pytest.raises(RunDirError, match="ignored: step_0000007"):
        choose_start(run, ckpts, CheckpointConfig(resume="require"))
    newest = _fake_checkpoint(ckpts, 5)
    assert choose_start(run, ckpts, CheckpointConfig(resume="require")) == (newest, [])
    # overwrite never applies to a resuming run
    _, [note] = choose_start(run, ckpts, CheckpointConfig(resume="auto", overwrite=True))
    assert "checkpoint.overwrite ignored" in note and newest.is_dir()


def test_start_run_refusal_leaves_nothing_behind(tmp_path, megatron_groups):
    """A refused start releases its locks and removes the directories it created (a mistyped
    checkpoint.dir); the job.yaml of the run directory is only written by an accepted start."""
    run, typo = tmp_path / "run", tmp_path / "typo" / "ckpts"
    with pytest.raises(RunDirError, match="resume=require"):
        rd.start_run(run, typo, CheckpointConfig(resume="require"), "x: 1\n")
    assert not run.exists() and not typo.exists()
    start = rd.start_run(run, typo, CheckpointConfig(resume="auto"), "x: 1\n")
    assert (run / "job.yaml").read_text() == "x: 1\n"
    assert (run / "run.lock").is_file() and (typo / "run.lock").is_file()
    start.release()
    assert not (run / "run.lock").exists() and not (typo / "run.lock").exists()


# --- what a resume refuses -----------------------------------------------------------------------


def _saved(tmp_path: Path, job, layout: dict | None = None, **manifest) -> Path:
    config = job.to_yaml()
    full = {"tp": 1, "pp": 1, "vpp": 1, "cp": 1, "ep": 1, "etp": 1, "dp": 1, **(layout or {})}
    manifest = {"optimizer_state": True, "distributed_optimizer": False, **manifest}
    return _fake_checkpoint(tmp_path / "ckpts", 3, config_yaml=config, layout=full,
                            model_config_sha256=structural_hash(model_section(config)), **manifest)


def test_resume_refuses_another_model_naming_the_fields(tmp_path, megatron_groups):
    job = get_recipe("tiny_text_cpu")
    ckpt = _saved(tmp_path, job)
    assert resume_problem(ckpt, job.to_yaml()) is None
    other = apply_overrides(job, ["model.llm.num_layers=2", "model.llm.hidden_size=32"])
    problem = resume_problem(ckpt, other.to_yaml())
    assert "model.llm.num_layers: 3 in checkpoint != 2 now" in problem
    assert "model.llm.hidden_size: 64 in checkpoint != 32 now" in problem
    assert f"checkpoint.init_from={ckpt}" in problem
    rope = apply_overrides(job, ["model.llm.rope_theta=50000"])  # a stage change: init_from
    assert "model.llm.rope_theta" in resume_problem(ckpt, rope.to_yaml())
    # How the same weights are computed may change on resume.
    runtime = apply_overrides(job, ["model.llm.recompute=full", "model.kernels.backend=local",
                                    "model.llm.hidden_dropout=0.1", "train.steps=999"])
    assert resume_problem(ckpt, runtime.to_yaml()) is None


def test_model_fields_new_or_gone_since_the_checkpoint(tmp_path, megatron_groups):
    """A checkpoint older than a config field: compatible while the field is at its default;
    token ids left null are filled from the tokenizer (which start-up checks)."""
    job = get_recipe("tiny_text_cpu")
    saved = json.loads(json.dumps(job.to_dict()))
    del saved["model"]["llm"]["untie_embeddings"]  # a field this checkpoint predates
    saved["model"]["llm"]["gone_field"] = 7  # a field this version no longer has
    saved["model"]["token_ids"] = {"bos": 1, "eos": 2}
    manifest = {"config_yaml": yaml.safe_dump(saved), "model_config_sha256": "old"}
    assert rd.model_differences(manifest, job.to_yaml()) == []
    changed = apply_overrides(job, ["model.llm.untie_embeddings=false", "model.token_ids.eos=5"])
    assert rd.model_differences(manifest, changed.to_yaml()) == [
        "model.llm.untie_embeddings: absent in checkpoint, False now",
        "model.token_ids.eos: 2 in checkpoint != 5 now"]


@pytest.mark.parametrize("layout, manifest, expected", [
    ({"tp": 2}, {}, None),  # per-parameter optimizer state reshards with the weights
    ({"pp": 2, "dp": 4}, {}, None),
    ({"tp": 2}, {"distributed_optimizer": True}, "tp: 2 in checkpoint != 1 now"),
    ({"dp": 2}, {"distributed_optimizer": True}, None),  # dp_reshardable
    ({"ep": 2}, {}, "saved at ep=2, which cannot load at ep=1"),
    ({"ep": 2}, {"optimizer_state": False}, None),  # weights only
])
def test_resume_refuses_optimizer_state_the_layout_cannot_take(tmp_path, megatron_groups, layout,
                                                               manifest, expected):
    job = get_recipe("tiny_text_cpu")
    problem = resume_problem(_saved(tmp_path, job, layout, **manifest), job.to_yaml())
    if expected is None:
        assert problem is None
    else:
        assert expected in problem and "in this parallel layout" in problem
        assert "checkpoint.init_from=" in problem and "load_optimizer" not in problem


# --- the learning rate across a resume -----------------------------------------------------------


def _wsd(step: int, lr: float, lo: float, warm: int, total: int, frac: float) -> float:
    """Linear warmup, constant, linear decay over the last ``round(frac * total)`` steps."""
    decay = round(frac * total)
    if step <= warm:
        return lr * step / warm
    if step <= total - decay:
        return lr
    return lo + (lr - lo) * (1 - (step - (total - decay)) / decay)


WSD = ["optim.schedule=wsd", "optim.wsd_decay_fraction=0.5", "optim.wsd_decay_style=linear",
       "optim.warmup_steps=2", "optim.lr=0.002", "optim.min_lr=0.0002"]


def test_loaded_scheduler_follows_the_new_schedule():
    old = apply_overrides(get_recipe("tiny_text_cpu"), [*WSD, "train.steps=20"])
    new = apply_overrides(old, ["train.steps=40"])
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_scheduler(old.optim, opt, old.train.steps)
    for _ in range(12):
        sched.step(increment=1)
    assert opt.param_groups[0]["lr"] == pytest.approx(_wsd(12, 2e-3, 2e-4, 2, 20, 0.5))
    opt2 = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    resumed = build_scheduler(new.optim, opt2, new.train.steps)
    resumed.load_state_dict(sched.state_dict())  # the step count comes from the checkpoint
    assert resumed.num_steps == 12
    for step in range(12, 41):
        assert opt2.param_groups[0]["lr"] == pytest.approx(_wsd(step, 2e-3, 2e-4, 2, 40, 0.5))
        resumed.step(increment=1)


def test_lr_report_old_and_new_and_a_warning_when_it_rises(tmp_path):
    old = apply_overrides(get_recipe("tiny_text_cpu"), [*WSD, "train.steps=20"])
    ckpt = _fake_checkpoint(tmp_path, 12, config_yaml=old.to_yaml())
    old_lr, new_lr = _wsd(12, 2e-3, 2e-4, 2, 20, 0.5), _wsd(12, 2e-3, 2e-4, 2, 40, 0.5)
    assert new_lr > 1.01 * old_lr  # the old run was decaying, the extended one is still stable
    line, warning = lr_report(ckpt, apply_overrides(old, ["train.steps=40"]).optim, 40, 12, 12)
    assert f"step 12: {old_lr:.6g} in the checkpoint's schedule" in line
    assert f"-> {new_lr:.6g} in this run's" in line and "20 steps" in line and "40 steps" in line
    rise = 100 * (new_lr / old_lr - 1)
    assert warning.startswith("warning: the learning rate rises on resume")
    assert f"+{rise:.1f}%" in warning
    assert lr_report(ckpt, old.optim, 20, 12, 12) == [
        f"learning rate at resume step 12: {old_lr:.6g} (schedule unchanged)"]
    # Shortening the run lowers the lr: both values, no warning.
    shorter = lr_report(ckpt, old.optim, 16, 12, 12)
    assert len(shorter) == 1 and f"-> {_wsd(12, 2e-3, 2e-4, 2, 16, 0.5):.6g}" in shorter[0]
    assert math.isclose(_wsd(12, 2e-3, 2e-4, 2, 16, 0.5), 2e-3 - 1.8e-3 * 4 / 8)


# --- the CLI -------------------------------------------------------------------------------------


@pytest.mark.parametrize("argv, resume, overrides", [
    (["--resume"], "auto", []),
    (["--resume", "train.steps=50"], "auto", ["train.steps=50"]),  # not eaten as the mode
    (["--resume", "require", "train.steps=50"], "require", ["train.steps=50"]),
    (["--resume=require"], "require", []),
    (["--resume=auto"], "auto", []),
    ([], None, []),
])
def test_cli_resume_flags(argv, resume, overrides):
    from megatron_vlm.train import build_job, parse_args

    args = parse_args(["--recipe", "tiny_text_cpu", *argv])
    assert args.resume == resume and args.overrides == overrides and not args.overwrite
    assert build_job(args).checkpoint.resume == (resume or "never")


def test_cli_overwrite_and_legacy_resume_values():
    from megatron_vlm.train import build_job, main, parse_args

    job = build_job(parse_args(["--recipe", "tiny_text_cpu", "--overwrite"]))
    assert job.checkpoint.overwrite and job.checkpoint.resume == "never"
    base = get_recipe("tiny_text_cpu")
    assert apply_overrides(base, ["checkpoint.resume=true"]).checkpoint.resume == "auto"
    assert apply_overrides(base, ["checkpoint.resume=false"]).checkpoint.resume == "never"
    assert CheckpointConfig(resume=True).resume == "auto"
    with pytest.raises(ValueError, match="checkpoint.resume"):
        CheckpointConfig(resume="sometimes")
    with pytest.raises(SystemExit):
        main(["--resume=sometimes"])
