"""The GLM tower + projector under TP=2 equal transformers' ``Glm4vVisionModel`` (weights by the
family's name map): outputs and every gradient shard in ``tp`` mode without and with sequence
parallelism, and in ``split`` mode (tower replicated, each rank encoding some temporal patches).
The projector's downsample, ``proj`` and LayerNorm run replicated: their gradients must be
complete on every rank without a reduction."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def test_glm_vit_tp_matches_transformers(tmp_path):
    out = tmp_path / "result.json"
    env = dict(os.environ, TORCH_COMPILE_DISABLE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
         str(HERE / "glm_vit_tp_worker.py"), str(out)],
        env=env, capture_output=True, text=True, timeout=600, cwd=HERE.parents[1])
    assert proc.returncode == 0, proc.stderr[-5000:]
    ranks = json.loads(out.read_text())
    for rank in ranks:
        assert rank["scale"] > 0.1
        for mode in ("tp_sp0", "tp_sp1", "split_sp1"):
            res = rank[mode]
            assert res["output"] < 2e-5, (mode, res)
            assert res["vit_grad"] < 5e-5 and res["proj_grad"] < 5e-5, (mode, res)
    # 5 segments (2-patch video = 2): TP encodes all on both ranks, split shares them out.
    assert [r["tp_sp1"]["encoded"] for r in ranks] == [5, 5]
    assert sum(r["split_sp1"]["encoded"] for r in ranks) == 5
    assert all(r["split_sp1"]["encoded"] < 5 for r in ranks)
