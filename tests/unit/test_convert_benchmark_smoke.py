"""Smoke run of ``benchmarks/convert_hf.py`` (a few MB, in-process): the JSON carries the common
fields, the round trip is bit-exact and the measurements are sane. Nothing is timed."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def test_convert_hf_benchmark_smoke(tmp_path):
    from benchmarks import convert_hf

    data = json.loads(convert_hf.main(["--smoke", "--out-dir", str(tmp_path)]).read_text())
    for key in ("benchmark", "date", "device", "versions", "config", "results", "smoke"):
        assert key in data, key
    res = data["results"]
    assert data["smoke"] is True and res["round_trip"]["bit_exact"] is True
    assert res["num_shards"] > 1 and res["largest_shard_bytes"] <= res["checkpoint_bytes"]
    int4 = res["int4_size"]
    assert int4["other_tensors_bit_exact"] is True and int4["num_int4_weights"] > 0
    assert int4["bf16_over_int4"] > 1
    assert res["export_2_bytes_identical"] is True
    runs = {k: v[0] for k, v in res["runs"].items()}
    for phase in ("loop", "import", "import_2", "export", "export_2"):
        assert runs[phase]["seconds"] > 0 and runs[phase]["gb_per_s"] > 0
    for phase in (runs["import"], runs["export"], res["export_int4"]):
        assert phase["peak_rss_bytes"] >= phase["baseline_rss_bytes"] > 0
    assert res["ratio_of_medians"]["import_over_loop"] > 0
