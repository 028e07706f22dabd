"""Smoke run of ``benchmarks/checkpoint_io.py`` (no timing asserts): it saves and loads the same
state both ways and reports every figure."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def test_checkpoint_io_smoke(tmp_path):
    from benchmarks import checkpoint_io

    path = checkpoint_io.main(["--smoke", "--out-dir", str(tmp_path), "--work-dir",
                               str(tmp_path)])
    data = json.loads(path.read_text())
    assert data["smoke"] is True and data["device"]["cpu_model"]
    res = data["results"]
    # Same state both ways: our files hold the baseline's tensor bytes plus manifest-free
    # extras (common.pt, rank file, megatron metadata) of a few KB per tensor at most.
    assert 0 < res["baseline_bytes"] <= res["ours_bytes"] < 1.2 * res["baseline_bytes"] + 65536
    for part in ("save", "load_verified", "load_sizes_only"):
        for key in ("ours_s", "baseline_s", "baseline_over_ours", "ours_cpu_s", "baseline_cpu_s"):
            assert res[part][key] > 0, (part, key)
    a = res["async"]
    assert a["tiny_train_s_without_saves"] > 0 and a["tiny_train_s_while_writer_runs"] > 0
    assert a["tiny_blocked_s_per_save"] > 0 and a["blocked_s_at_10GB_linear"] > 0
    assert len(res["loadavg_before"]) == 3
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("ckpt_io_")]  # cleaned up
