"""Preemption that does not depend on torchrun's grace period.

torchrun SIGKILLs its workers a grace period after forwarding them a signal: 30 s, fixed, in
the NGC 25.10 container's torch 2.9 (``TORCH_ELASTIC_SHUTDOWN_TIMEOUT`` is honoured only since
pytorch#172596), shorter than one K2.5 step plus a save. So the batch script never signals
torchrun: its SIGUSR1 trap creates the stop file, which the trainers' ``StopSignal`` checks.

Here the rendered script runs the real ``python -m torch.distributed.run`` (through the stand-in
``srun``) with ``TORCH_ELASTIC_SHUTDOWN_TIMEOUT=2`` standing in for the fixed kill, around a
stand-in trainer that polls ``StopSignal`` and then "saves" for 6 s -- three times the grace
torchrun would give it. The save completes and the job requeues.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import pytest
from slurm_stand_ins import slurm_env

from megatron_vlm.cluster import SlurmJob, render_sbatch
from megatron_vlm.parallel.init import free_port
from megatron_vlm.training.state import STOP_FILE_ENV, StopSignal

SAVE_S = 6.0

# The stand-in trainer: no megatron, only the stop check the real loop uses (one per 0.1 s).
TRAINER = f'''
import os, sys, time
from pathlib import Path
from megatron_vlm.training.state import StopSignal

out = Path(os.environ["TRAINER_OUT"])
stop = StopSignal()
(out / "ready").write_text(os.environ["{STOP_FILE_ENV}"])
while not stop.requested:
    time.sleep(0.1)
time.sleep({SAVE_S})  # the checkpoint save
(out / "saved").write_text(f"signal={{stop.received}}")
sys.exit(0)
'''


def test_stop_signal_reads_the_stop_file(tmp_path, monkeypatch):
    path = tmp_path / "STOP-1"
    monkeypatch.setenv(STOP_FILE_ENV, str(path))
    stop = StopSignal(signals=())
    assert not stop.requested
    path.touch()
    assert stop.requested and stop.received is None
    path.unlink()
    monkeypatch.setenv(STOP_FILE_ENV, "")
    assert not StopSignal(signals=()).requested  # unset/empty: no file is checked


@pytest.mark.parametrize("sig", ["USR1", "TERM"])
def test_save_longer_than_torchrun_grace_completes_then_requeues(tmp_path, fake_slurm, sig):
    """USR1 (time limit near): the 6 s save completes under torchrun's 2 s grace and the job
    requeues, within 15 s of the signal. TERM (scancel of the batch shell): the same save, no
    requeue."""
    work, out = tmp_path / "work", tmp_path / "out"
    work.mkdir()
    out.mkdir()
    (work / "stand_in_trainer.py").write_text(TRAINER)
    run_dir = tmp_path / "run"
    (run_dir).mkdir()
    (run_dir / "STOP-5151").touch()  # a stale request of an earlier start must not stop this one
    job = SlurmJob(job_name="grace", train_args=["--recipe", "tiny_text_cpu"],
                   run_dir=str(run_dir), gpus_per_node=1, time="01:00:00", venv=sys.prefix,
                   workdir=str(work), train_module="stand_in_trainer",
                   env={"TORCH_ELASTIC_SHUTDOWN_TIMEOUT": "2", "TRAINER_OUT": str(out)})
    script = tmp_path / "job.sbatch"
    script.write_text(render_sbatch(job))
    env = slurm_env(fake_slurm, SLURM_JOB_ID="5151", SLURM_NNODES="1",
                    SLURM_JOB_NODELIST="localhost", MASTER_PORT=str(free_port()))
    proc = subprocess.Popen(["bash", str(script)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120  # torchrun's start-up on a loaded 2-core machine
        while not (out / "ready").exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        assert (out / "ready").exists(), proc.communicate(timeout=30)
        assert (out / "ready").read_text() == str(run_dir / "STOP-5151")
        time.sleep(0.5)  # the trainer is polling: no stale request stopped it
        assert proc.poll() is None and not (out / "saved").exists()

        t0 = time.time()
        proc.send_signal(getattr(signal, f"SIG{sig}"))  # what SLURM sends the batch shell
        stdout, stderr = proc.communicate(timeout=60)
        elapsed = time.time() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, stdout[-3000:] + stderr[-3000:]
    # The save ran to the end, with no signal reaching the trainer (the stop file asked).
    assert (out / "saved").read_text() == "signal=None"
    assert SAVE_S <= elapsed <= 15.0, elapsed
    assert not (fake_slurm / "scancel").exists()
    assert not (run_dir / "STOP-5151").exists()  # removed once the trainers exited
    if sig == "USR1":
        assert "trainers exited (0); requeueing job 5151" in stdout
        assert (fake_slurm / "requeued").read_text().split() == ["5151"]
        assert (fake_slurm / "requeued").stat().st_mtime >= (out / "saved").stat().st_mtime
    else:
        assert "training exited with 0" in stdout
        assert not (fake_slurm / "requeued").exists()
