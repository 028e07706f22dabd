"""TP=2 (+SP) gives the single-process loss and *every* gradient after one forward-backward,
from identical initial weights (megatron's CPU init splits one master weight per tensor)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
COMMON = ["data.pad_to_multiple=4", "data.global_batch_size=4"]


def _grads(tmp: Path, nproc: int, overrides: list[str]) -> dict:
    out = tmp / f"grads_{nproc}.pt"
    env = dict(os.environ, TORCH_COMPILE_DISABLE="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={nproc}", str(HERE / "grads_worker.py"), str(out), *COMMON,
           *overrides]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600,
                          cwd=HERE.parents[1])
    assert proc.returncode == 0, proc.stderr[-5000:]
    return torch.load(out, weights_only=True)


def test_tp2_sequence_parallel_loss_and_every_gradient(tmp_path):
    ref = _grads(tmp_path, 1, [])
    tp2 = _grads(tmp_path, 2, ["parallel.tp=2", "parallel.sequence_parallel=true"])
    assert torch.allclose(tp2["loss"], ref["loss"], rtol=1e-6, atol=0)
    assert tp2["grads"].keys() == ref["grads"].keys()
    for name, g in ref["grads"].items():
        got = tp2["grads"][name]
        assert got.shape == g.shape, name
        scale = g.abs().max().item()
        assert scale > 0, f"{name} has no gradient in the reference"
        err = (got - g).abs().max().item() / scale
        assert err < 1e-5, (name, err)
