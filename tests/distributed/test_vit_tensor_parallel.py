"""MoonViT + projector under TP=2, with and without sequence parallelism, equal transformers'
Kimi K2.5 vision tower and projector (weights copied): outputs and every gradient shard."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


@pytest.mark.parametrize("sp", ["0", "1"], ids=["tp2", "tp2_sp"])
def test_vit_tp_matches_transformers(tmp_path, sp):
    out = tmp_path / "result.json"
    env = dict(os.environ, TORCH_COMPILE_DISABLE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
         str(HERE / "vit_tp_worker.py"), str(out), sp],
        env=env, capture_output=True, text=True, timeout=600, cwd=HERE.parents[1])
    assert proc.returncode == 0, proc.stderr[-5000:]
    for rank in json.loads(out.read_text()):
        assert rank["output_scale"] > 0.1
        assert rank["output"] < 2e-5, rank
        assert rank["vit_grad"] < 5e-5 and rank["proj_grad"] < 5e-5, rank
