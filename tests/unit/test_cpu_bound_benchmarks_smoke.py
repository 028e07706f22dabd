"""Issue 18's benchmarks in one smoke test (no timing asserts): each runs ours and its baseline on a
few MB in-process and its JSON carries every figure.

- ``benchmarks/data_demand.py``: media/packing rates and the kimi_k25 cores-per-GPU arithmetic;
- ``benchmarks/media_floor.py``: image/video to patches vs the raw decoders of the same frames;
- ``benchmarks/convert_hf.py``: the safetensors loop, 1 and 2-process import/export, INT4 sizes;
- ``benchmarks/checkpoint_io.py``: our save/load vs plain DCP, the async snapshot and writer;
- ``benchmarks/prepare_throughput.py``: preparation with structure / no / full media checks vs
  ``tar`` of the same files.
"""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _data_demand(tmp_path) -> None:
    from benchmarks import data_demand

    path = data_demand.main(["--smoke", "--out-dir", str(tmp_path)])
    result = json.loads(path.read_text())
    assert result["device"]["cpu_model"] and result["smoke"]
    r = result["results"]
    assert r["plan"]["recipe"] == "kimi_k25" and r["plan"]["tokens_per_s_per_gpu"] > 0
    assert r["media"]["image"]["patches"] > 0 and r["media"]["video"]["llm_tokens"] > 0
    assert set(r["demand"]["cases"]) == {f"{m}@{b}" for m in ("stage_mix", "image", "video")
                                         for b in ("vision_share", "full_patch_budget")}


def _media_floor(tmp_path) -> None:
    from benchmarks import media_floor

    data = json.loads(media_floor.main(["--smoke", "--out-dir", str(tmp_path)]).read_text())
    assert data["smoke"] is True and data["device"]["cpu_model"]
    res = data["results"]
    assert set(res["ratios"]) == {f"{m}_{f}" for m in ("image", "video")
                                  for f in ("float32", "uint8")}
    assert all(r > 0 for r in res["ratios"].values())
    # The floors decode the same frames ours does (bit for bit), whichever is the fastest.
    assert all(res["video"]["floor_frames_equal_ours"].values())
    assert res["video"]["floor"] in res["video"]["floor_candidates_cpu_s"]
    assert res["image"]["grid_thw"][0] == 1 and res["video"]["patches"] > 0


def _convert_hf(tmp_path) -> None:
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


def _checkpoint_io(tmp_path) -> None:
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
    assert len(a["pairs"]) >= 1 and set(a["page_faults_per_step"]) == {"plain", "saving"}
    assert 0 < a["staging_copy_s"]["tiny"] <= a["snapshot_s"]["tiny"]
    assert len(res["loadavg_before"]) == 3
    assert not [p for p in tmp_path.iterdir() if p.name.startswith("ckpt_io_")]  # cleaned up


def _prepare_throughput(tmp_path) -> None:
    from benchmarks import prepare_throughput

    data = json.loads(prepare_throughput.main(["--smoke", "--out-dir", str(tmp_path)]).read_text())
    assert data["smoke"] is True and data["device"]["cpu_model"]
    res = data["results"]
    for label, jobs in (("interleaved", ("structure", "none", "full", "tar")),
                        ("interleaved_videos_only", ("structure", "none", "tar")),
                        ("interleaved_small_images", ("structure", "none", "full", "tar"))):
        runs = res[label]["runs"]
        assert set(runs) == set(jobs)
        modes = [j for j in jobs if j != "tar"]
        assert {r["samples"] for m in modes for r in runs[m]} == {res[label]["records"]}
        assert len({r["shard_bytes"] for m in modes for r in runs[m]}) == 1  # same shards
        assert runs["tar"][0]["bytes"] >= res[label]["media_bytes"] > 0
        assert res[label]["checks_over_no_checks"] > 0 and res[label]["checks_over_tar"] > 0
    assert res["checks_2_workers"]["shard_bytes"] == res["interleaved"]["runs"]["none"][0][
        "shard_bytes"]
    assert res["check_ms_per_file"]["video_structure_ms"] > 0
    assert res["enumeration"]["records"] == data["config"]["enumeration_records"]
    assert res["merge_scale"]["merge_samples_per_s"] > 0 and len(res["loadavg_after"]) == 3


def test_cpu_bound_benchmarks_smoke(tmp_path):
    for name, check in [("data_demand", _data_demand), ("media_floor", _media_floor),
                        ("convert_hf", _convert_hf),
                        ("checkpoint_io", _checkpoint_io),
                        ("prepare_throughput", _prepare_throughput)]:
        out = tmp_path / name
        out.mkdir()
        check(out)
