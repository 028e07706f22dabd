"""Parallel layouts give the single-process loss and *every* gradient after one forward-backward
from identical weights: the parallel run loads the single-process run's initial checkpoint,
resharded to its layout (TP=2 with SP; EP=2 with the all-to-all dispatcher and DP=2; PP=2 with
megatron's 1F1B schedule over 4 micro-batches)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent
COMMON = ["data.pad_to_multiple=4", "data.global_batch_size=4", "model.llm.num_layers=4"]


def _grads(tmp: Path, nproc: int, overrides: list[str]) -> dict:
    out = tmp / f"grads_{nproc}_{'_'.join(overrides) or 'single'}.pt"
    env = dict(os.environ, TORCH_COMPILE_DISABLE="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc-per-node={nproc}", str(HERE / "grads_worker.py"), str(out),
           str(tmp / "init" / "step_0000000"), *COMMON, *overrides]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600,
                          cwd=HERE.parents[1])
    assert proc.returncode == 0, proc.stderr[-5000:]
    return torch.load(out, weights_only=True)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("layouts")
    return tmp, _grads(tmp, 1, [])


@pytest.mark.parametrize(
    "overrides",
    [["parallel.tp=2", "parallel.sequence_parallel=true"], ["parallel.ep=2"], ["parallel.pp=2"]],
    ids=["tp2_sp", "ep2_dp2", "pp2"],
)
def test_loss_and_every_gradient_match_one_process(reference, overrides):
    tmp, ref = reference
    par = _grads(tmp, 2, overrides)
    assert torch.allclose(par["loss"], ref["loss"], rtol=1e-6, atol=0)
    assert par["grads"].keys() == ref["grads"].keys()
    for name, g in ref["grads"].items():
        got = par["grads"][name]
        assert got.shape == g.shape, name
        scale = g.abs().max().item()
        assert scale > 0, f"{name} has no gradient in the reference"
        err = (got - g).abs().max().item() / scale
        assert err < 1e-5, (name, err)
