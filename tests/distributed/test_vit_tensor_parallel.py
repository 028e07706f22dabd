"""MoonViT + projector under TP=2, with and without sequence parallelism, equal transformers'
Kimi K2.5 vision tower and projector (weights copied): outputs and every gradient shard. Also in
split mode (tower replicated over TP, each rank encoding some of the items). QK-Clip on the tower
(``model.vision.qk_clip``): TP mode (local heads) and split mode (all heads, maxima reduced over
TP because each rank saw other items) give the same per-head maxima and clipped q/k rows."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


@pytest.mark.parametrize("sp, modes", [("0", "tp"), ("1", "tp,split")],
                         ids=["tp2", "tp2_sp_and_split"])
def test_vit_tp_matches_transformers(tmp_path, sp, modes):
    out = tmp_path / "result.json"
    env = dict(os.environ, TORCH_COMPILE_DISABLE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
         str(HERE / "vit_tp_worker.py"), str(out), sp, modes],
        env=env, capture_output=True, text=True, timeout=600, cwd=HERE.parents[1])
    assert proc.returncode == 0, proc.stderr[-5000:]
    ranks = json.loads(out.read_text())
    for mode in modes.split(","):
        for rank in ranks:
            res = rank[mode]
            assert res["output_scale"] > 0.1
            assert res["output"] < 2e-5, (mode, res)
            assert res["vit_grad"] < 5e-5 and res["proj_grad"] < 5e-5, (mode, res)
        # 5 items: TP encodes each jointly on both ranks; split gives each item to one rank
        # (cost-balanced: 24+12 patches on rank 0, 16+12+4 on rank 1).
        encoded = [rank[mode]["encoded_items"] for rank in ranks]
        assert encoded == {"tp": [5, 5], "split": [2, 3]}[mode], (mode, encoded)
        heads = [rank[mode]["heads_clipped"] for rank in ranks]
        assert heads[0] == heads[1] if mode == "split" else 0 < sum(heads) < 8, (mode, heads)
    if "split" in modes:
        for rank in ranks:
            res = rank["qk_clip"]
            assert res["maxima"] < 1e-5 and res["weight"] < 1e-6 and res["bias"] < 1e-6, res
        # each rank encoded only some items: its own maxima fall short of the reduced ones
        assert any(rank["qk_clip"]["split_local_below"] for rank in ranks)
