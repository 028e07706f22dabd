"""The tiny VLM in parallel layouts equals one process on the identical padded packed batch.

Four micro-batches of 128 tokens (documents padded to multiples of 8) hold text, images of
different sizes and two 6-frame videos (chunks of 4 + 2 frames); fp32, dropout 0, dropless MoE
(8 experts top-2, expert bias updated every step). Every layout loads the one-process run's
initial weights (resharded), then: the routing maps of all MoE layers are identical, the loss and
every gradient match, and so do the grad norms and parameters over three AdamW steps.

Layouts (2 gloo ranks, one process start for all, ``vlm_worker.py``): TP=2 + SP with the vision
tower split over TP (default) and with TP inside the tower; PP=2 (tower and projector on stage
0, 1F1B over 4 micro-batches); EP=2 (x DP=2, all-to-all dispatcher); DP=2 with megatron's
DistributedOptimizer; TP=2 + SP x EP=2 (expert TP 1). The reference uses the
DistributedOptimizer at DP=1 (the same AdamW math as the plain optimizer).

Tolerances (fp32; layouts differ only in summation order): loss 1e-6 relative; each gradient's
max error 1e-5 of its largest entry (seen: <= 1e-6); grad norms 1e-5 relative. After three steps
at lr 3e-3, parameters within 1e-4 (3% of one step; AdamW's per-element normalisation amplifies
1e-6 gradient noise on entries whose |g| is near eps: seen <= 3.5e-5) and the whole update
within 1e-4 relative (Frobenius; seen <= 2e-5).
"""

from __future__ import annotations

from collections import Counter

import pytest
from vlm_runs import check_loss_and_gradients, check_routing, check_three_steps, vlm_results

LAYOUTS = ["tp2_sp", "tp2_sp_vit_tp", "pp2", "ep2", "dp2_distopt", "tp2_ep2"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    return vlm_results(tmp_path_factory)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_routing_decisions_are_identical(runs, layout):
    ref, lay = runs
    check_routing(ref, lay[layout], layout)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_loss_and_every_gradient_match_one_process(runs, layout):
    ref, lay = runs
    check_loss_and_gradients(ref, lay[layout], layout)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_parameters_after_three_steps_match_one_process(runs, layout):
    ref, lay = runs
    check_three_steps(ref, lay[layout], layout)


@pytest.mark.parametrize("layout", ["reference", *LAYOUTS])
def test_each_media_item_is_encoded_once_per_tp_group(runs, layout):
    """Item log of the first step (recompute off): split mode encodes each item of a DP rank's
    micro-batches on exactly one of its TP ranks; TP mode encodes every item once on each TP
    rank, jointly (one TP-sharded pass)."""
    ref, lay = runs
    ranks = (ref if layout == "reference" else lay[layout])["items"]
    towers = [r for r in ranks if r["pp_rank"] == 0]  # the tower lives on the first stage
    assert all(not r["encoded"] and not r["expected"] for r in ranks if r["pp_rank"] > 0)
    assert sum(len(r["expected"]) for r in towers if r["tp_rank"] == 0) == 8  # all 8 items
    for dp_rank in {r["dp_rank"] for r in towers}:
        group = [r for r in towers if r["dp_rank"] == dp_rank]
        expected = Counter(group[0]["expected"])
        assert all(Counter(r["expected"]) == expected for r in group)
        assert sum(expected.values()) > 0 and max(expected.values()) == 1
        if len(group) > 1 and group[0]["vision_mode"] == "split":
            per_rank = [Counter(r["encoded"]) for r in group]
            assert sum(per_rank, Counter()) == expected  # each item on exactly one rank
            assert all(0 < sum(c.values()) < sum(expected.values()) for c in per_rank)
        else:
            assert all(Counter(r["encoded"]) == expected for r in group)
