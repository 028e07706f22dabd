"""Smoke runs of the benchmarks (SPEC §13: benchmarks are not tests; each gets a smoke test).

Each ``benchmarks.<name>.main(["--smoke", "--out-dir", tmp])`` runs in-process and its JSON
must carry the common fields and sane values. Nothing here is timed against a target.
"""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

COMMON = ("benchmark", "date", "device", "device_kind", "versions", "config", "results", "smoke")


def _run(module, tmp_path) -> dict:
    path = module.main(["--smoke", "--out-dir", str(tmp_path)])
    data = json.loads(path.read_text())
    for key in COMMON:
        assert key in data, key
    assert data["smoke"] is True
    assert data["device"]["cpu_model"] and data["device"]["cpu_cores"] >= 1
    assert "torch" in data["versions"] and "megatron-core" in data["versions"]
    return data["results"]


def test_video_decode_smoke(tmp_path):
    pytest.importorskip("av")
    from benchmarks import video_decode

    res = _run(video_decode, tmp_path)
    for row in res["per_clip"].values():
        for backend in ("decord", "pyav"):
            if backend in row:
                assert row[backend]["frames_decoded"] == row["frames"]
                assert row[backend]["frames_per_s_per_core"] > 0


def test_data_loader_smoke(tmp_path):
    from benchmarks import data_loader

    res = _run(data_loader, tmp_path)
    assert set(res["by_workers"]) == {"0", "1"}
    for row in res["by_workers"].values():
        assert row["samples"] >= row["packs"] > 0
        assert row["samples_per_s"] > 0
        assert 0.0 <= row["padding_fraction"] <= 1.0


def test_data_packing_smoke(tmp_path):
    from benchmarks import data_packing

    res = _run(data_packing, tmp_path)
    acct = res["padding_accounting"]
    for kind in ("packed", "padded_batch_max", "padded_one_per_sequence"):
        assert 0.0 <= acct[kind]["padding_fraction"] <= 1.0
    assert acct["packed"]["padding_fraction"] < acct["padded_batch_max"]["padding_fraction"]
    assert acct["packed"]["padding_fraction"] <= 0.05 + 0.02  # small smoke sample
    assert acct["packed"]["samples_per_micro_batch"] > acct["padded_batch_max"][
        "samples_per_micro_batch"]
    fb = res["forward_backward"]
    assert fb["packed"]["padding_fraction"] < fb["padded_batch_max"]["padding_fraction"]
    assert fb["packed"]["samples_per_s"] > 0 and fb["padded_batch_max"]["samples_per_s"] > 0
    assert fb["speedup_samples_per_s"] > 0
