"""InternViT + ``mlp1`` under TP=2 equal transformers' ``InternVLModel.get_image_features``
(weights by the family's name map): outputs and every gradient shard. The 6B-style tower in
``tp`` mode without and with sequence parallelism (its whole-width q/k norm all-reduces the sum
of squares over TP, forward and backward) and in ``split`` mode (tower replicated, each rank
encoding some tiles); the 300M-style tower in ``tp`` mode with SP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def test_internvit_tp_matches_transformers(tmp_path):
    out = tmp_path / "result.json"
    env = dict(os.environ, TORCH_COMPILE_DISABLE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
         str(HERE / "internvl_vit_tp_worker.py"), str(out)],
        env=env, capture_output=True, text=True, timeout=600, cwd=HERE.parents[1])
    assert proc.returncode == 0, proc.stderr[-5000:]
    ranks = json.loads(out.read_text())
    for rank in ranks:
        for case in ("6b_tp_sp0", "6b_tp_sp1", "6b_split_sp1", "300m_tp_sp1"):
            res = rank[case]
            assert res["scale"] > 0.1, (case, res)
            assert res["output"] < 2e-5, (case, res)
            assert res["vit_grad"] < 5e-5 and res["proj_grad"] < 5e-5, (case, res)
    # The whole-width q norm checkpoints as TP shards in tp mode, whole in split mode.
    # (2 layers, TP) fragments.
    assert all(r["6b_tp_sp1"]["qnorm_fragments"] == [2, 2] for r in ranks)
    assert all(r["6b_split_sp1"]["qnorm_fragments"] == [2, 1] for r in ranks)
    # 5 tiles: TP encodes all on both ranks, split shares them out.
    assert [r["6b_tp_sp1"]["encoded"] for r in ranks] == [5, 5]
    assert sum(r["6b_split_sp1"]["encoded"] for r in ranks) == 5
    assert all(r["6b_split_sp1"]["encoded"] < 5 for r in ranks)
