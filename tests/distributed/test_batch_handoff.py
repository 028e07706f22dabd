"""The batch hand-off between gloo processes (``handoff_worker.py``): TP=2 receivers get every
field bit-exactly (None vision, empty tensors, int64/float32/bfloat16/bool, ints, a list of
tuples, a family's added fields); the last pipeline stage every field but tokens and media; a
middle stage (PP=3) neither the loss fields."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("world_size", [2, 3], ids=["tp2_pp2", "pp3"])
def test_hand_off_between_gloo_processes(world_size):
    # Plain processes (no torchrun agent: faster to start).
    env = dict(os.environ, TORCH_COMPILE_DISABLE="1", OMP_NUM_THREADS="1",
               WORLD_SIZE=str(world_size), MASTER_ADDR="127.0.0.1",
               MASTER_PORT=str(_free_port()))
    procs = [subprocess.Popen([sys.executable, str(HERE / "handoff_worker.py")],
                              env=dict(env, RANK=str(r)), cwd=HERE.parents[1],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in range(world_size)]
    outs = [p.communicate(timeout=120) for p in procs]
    for r, (p, (out, err)) in enumerate(zip(procs, outs)):
        assert p.returncode == 0 and f"rank {r} ok" in out, err[-4000:]
