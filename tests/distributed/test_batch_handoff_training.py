"""Decode once per replica in a real TP=2 run (``handoff_train_worker.py``, tiny VLM on the
bundled multimodal corpus): only rank 0 (TP rank 0 / PP stage 0) runs the loader (its batch
builds, pack calls and validation batches counted per rank), and the losses, validation losses
and data metrics rank 0 logs equal the former path's, where every rank loads; a run resumed
from the hand-off run's checkpoint (loader state saved by the source) continues it exactly."""

from __future__ import annotations

import json
import sys

import pytest
from vlm_runs import HERE, run_worker

LAYOUTS = ["tp2"]
"""The layouts CI trains (about 25 s each on 2 cores). PP=2 and CP=2 pass the same checks through
the same worker by hand (``torchrun --nproc-per-node=2 tests/distributed/handoff_train_worker.py
OUT pp2,cp2``); CI covers the hand-off's PP routing in ``test_batch_handoff.py`` (PP=2, PP=3)."""


def _records(run_dir) -> dict:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return {(r["split"], r["step"]): r for r in map(json.loads, lines)
            if r["split"] in ("train", "valid")}


def _same(got: dict, want: dict, key) -> None:
    numbers = [k for k in want if k.startswith(("loss", "grad_norm", "data/"))]
    assert any(k.startswith("loss") for k in numbers)
    for k in numbers:
        assert got[k] == pytest.approx(want[k], rel=1e-9, abs=1e-12), (key, k)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Every layout in one process start (the groups are rebuilt between them)."""
    out = tmp_path_factory.mktemp("handoff_training")
    run_worker([sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc-per-node=2", str(HERE / "handoff_train_worker.py"), str(out),
                ",".join(LAYOUTS)])
    return out, [json.loads((out / f"counts_rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_one_rank_loads_and_trains_as_every_rank_loading(runs, layout):
    out, counts = runs
    counts = [c[layout] for c in counts]
    # Former path: both ranks (TP peers, or PP stages) decode and pack the same batches.
    assert counts[0]["every_rank"] == counts[1]["every_rank"] == {
        "validation_batches": 1, "next_global_batch": 2, "pack": 4}
    # Hand-off: rank 0 only, rank 1 never touches a loader.
    assert counts[0]["handoff"] == {"validation_batches": 1, "next_global_batch": 1, "pack": 2}
    assert counts[0]["resumed"] == {"validation_batches": 1, "next_global_batch": 1, "pack": 2}
    assert counts[1]["handoff"] == counts[1]["resumed"] == {}

    ref = _records(out / layout / "every_rank")
    handoff, resumed = _records(out / layout / "handoff"), _records(out / layout / "resumed")
    assert handoff.keys() == {("valid", 0), ("train", 1), ("valid", 1)}
    assert resumed.keys() == {("train", 2), ("valid", 2)}
    for key in [("valid", 0), ("train", 1)]:
        _same(handoff[key], ref[key], key)
    for key in [("train", 2), ("valid", 2)]:
        _same(resumed[key], ref[key], key)
    # The step changed the model, so equal numbers are not trivially equal.
    assert ref[("valid", 2)]["loss/text"] != ref[("valid", 0)]["loss/text"]
