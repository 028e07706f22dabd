"""Preemption across ranks (torchrun, gloo, 2 processes): SIGTERM to ONE rank only.

The stop flag is agreed across ranks every step (an all-reduce MAX inside ``train_step``), so
both ranks save the same step and exit cleanly: torchrun returns 0, one complete checkpoint of
the stop step exists (async saves: the newest complete one is the stop step's, nothing
half-written is left), and a relaunch with ``--resume`` continues from it.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from tiny_runs import train_steps

from megatron_vlm.checkpoint import find_latest_checkpoint, verify_checkpoint

REPO = Path(__file__).resolve().parents[2]
COMMON = ["--recipe", "tiny_text_cpu", "optim.warmup_steps=1", "train.eval_interval=0",
          "train.log_interval=1", "train.tensorboard=false", "train.plot=false",
          "checkpoint.save_interval=3", "checkpoint.async_save=true"]


def _torchrun(args: list[str]) -> subprocess.Popen:
    env = dict(os.environ, TORCH_COMPILE_DISABLE="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    return subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
         "-m", "megatron_vlm.train", *COMMON, *args],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _worker_pid(parent: int, rank: int) -> int:
    """The torchrun worker of ``rank`` (a child of the launcher, RANK in its environment)."""
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            ppid = int((proc / "stat").read_text().rsplit(")", 1)[1].split()[1])
            env = (proc / "environ").read_bytes().split(b"\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == parent and f"RANK={rank}".encode() in env:
            return int(proc.name)
    raise AssertionError(f"no worker of rank {rank} under torchrun pid {parent}")


def test_signal_to_one_rank_stops_both_with_one_checkpoint_then_resumes(tmp_path):
    run_dir = tmp_path / "run"
    proc = _torchrun(["train.steps=100000", f"train.output_dir={run_dir}"])
    deadline = time.time() + 300
    while len(train_steps(run_dir)) < 4 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()[1][-4000:]
    os.kill(_worker_pid(proc.pid, rank=1), signal.SIGTERM)  # rank 1 only; rank 0 unsignalled
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err[-5000:]
    stop = max(train_steps(run_dir))
    assert f"stopping at step {stop} (signal)" in out
    ckpts = run_dir / "checkpoints"
    names = sorted(p.name for p in ckpts.iterdir())
    assert names[-1] == f"step_{stop:07d}" and not [n for n in names if n.startswith(".tmp")]
    manifest = verify_checkpoint(ckpts / names[-1], full=True)
    assert manifest["world_size"] == 2 and manifest["step"] == stop
    assert {"rank_00000.pt", "rank_00001.pt"} <= {e["path"] for e in manifest["files"]}
    assert find_latest_checkpoint(ckpts) == ckpts / names[-1]

    again = _torchrun([f"train.steps={stop + 2}", f"train.output_dir={run_dir}", "--resume"])
    out, err = again.communicate(timeout=300)
    assert again.returncode == 0, err[-5000:]
    assert f"resumed from {ckpts / names[-1]} at step {stop}" in out
    steps = train_steps(run_dir)
    assert steps[-2:] == [stop + 1, stop + 2] and steps.count(stop + 1) == 1
