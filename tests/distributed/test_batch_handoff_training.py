"""Decode once per replica in a real TP=2 run (``handoff_train_worker.py``, tiny VLM on the
bundled multimodal corpus): only TP rank 0 runs the loader (its batch builds, pack calls and
validation batches counted per rank), and the losses, validation losses and data metrics rank 0
logs equal the former path's, where every rank loads; a run resumed from the hand-off run's
checkpoint (loader state saved by the source) continues it exactly."""

from __future__ import annotations

import json
import sys

import pytest
from vlm_runs import HERE, run_worker


def _records(run_dir) -> dict:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {(r["split"], r["step"]): r for r in map(json.loads, lines)
            if r["split"] in ("train", "valid")}


def _same(got: dict, want: dict, key) -> None:
    numbers = [k for k in want if k.startswith(("loss", "grad_norm", "data/"))]
    assert any(k.startswith("loss") for k in numbers)
    for k in numbers:
        assert got[k] == pytest.approx(want[k], rel=1e-9, abs=1e-12), (key, k)


def test_tp2_loads_on_one_rank_and_trains_as_every_rank_loading(tmp_path):
    run_worker([sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc-per-node=2", str(HERE / "handoff_train_worker.py"), str(tmp_path),
                "tp2"])
    counts = [json.loads((tmp_path / f"counts_rank{r}.json").read_text()) for r in range(2)]
    # Former path: both TP ranks decode and pack the same batches.
    assert counts[0]["every_rank"] == counts[1]["every_rank"] == {
        "validation_batches": 1, "next_global_batch": 2, "pack": 4}
    # Hand-off: rank 0 only, rank 1 never touches a loader.
    assert counts[0]["handoff"] == {"validation_batches": 1, "next_global_batch": 1, "pack": 2}
    assert counts[0]["resumed"] == {"validation_batches": 1, "next_global_batch": 1, "pack": 2}
    assert counts[1]["handoff"] == counts[1]["resumed"] == {}

    ref = _records(tmp_path / "every_rank")
    handoff, resumed = _records(tmp_path / "handoff"), _records(tmp_path / "resumed")
    assert handoff.keys() == {("valid", 0), ("train", 1), ("valid", 1)}
    assert resumed.keys() == {("train", 2), ("valid", 2)}
    for key in [("valid", 0), ("train", 1)]:
        _same(handoff[key], ref[key], key)
    for key in [("train", 2), ("valid", 2)]:
        _same(resumed[key], ref[key], key)
    # The step changed the model, so equal numbers are not trivially equal.
    assert ref[("train", 2)]["loss"] != ref[("train", 1)]["loss"]
