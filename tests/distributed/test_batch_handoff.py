"""The batch hand-off between two gloo processes (``handoff_worker.py``): TP=2 receivers get
every field bit-exactly (None vision, empty tensors, int64/float32/bfloat16/bool, ints, a list of
tuples, a family's added fields); a later pipeline stage gets every field but tokens and media."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_hand_off_between_two_gloo_processes():
    # Two plain processes (no torchrun agent: faster to start).
    env = dict(os.environ, TORCH_COMPILE_DISABLE="1", OMP_NUM_THREADS="1", WORLD_SIZE="2",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    procs = [subprocess.Popen([sys.executable, str(HERE / "handoff_worker.py")],
                              env=dict(env, RANK=str(r)), cwd=HERE.parents[1],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    for r, (p, (out, err)) in enumerate(zip(procs, outs)):
        assert p.returncode == 0 and f"rank {r} ok" in out, err[-4000:]
