"""Smoke run of benchmarks/vision_parallel_mode.py (2 gloo ranks, tiny tower, one round): both
modes run and the JSON says how many of its items each rank encoded. Nothing is timed against a
target (SPEC §13)."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def test_vision_parallel_mode_benchmark_smoke(tmp_path):
    from benchmarks import vision_parallel_mode

    data = json.loads(vision_parallel_mode.main(["--smoke", "--out-dir", str(tmp_path)])
                      .read_text())
    assert data["smoke"] is True and data["config"]["tp"] == 2
    res = data["results"]
    for mode in ("split", "tp"):
        assert res[mode]["train_step_s"]["median"] > 0
        assert res[mode]["vision_fwd_bwd_s"]["median"] > 0
    # Items (t,h,w) = (1,4,6), (1,2,2), (4,4,4), (2,4,4): cost-balanced, rank 0 takes the
    # 64-patch chunk alone; in TP mode every rank runs every item (jointly).
    assert res["split"]["encoded_fraction_per_rank"] == 0.25
    assert res["tp"]["encoded_fraction_per_rank"] == 1.0
