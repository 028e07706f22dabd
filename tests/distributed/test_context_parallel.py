"""Context parallelism for the VLM equals one process on the identical padded packed batch.

The tiny VLM (fp32, dropout 0, dropless MoE, QK-Clip on with tau low enough that heads clip) on
four packed micro-batches of 128 tokens: text, images of different sizes and two 6-frame videos
(chunks of 4 + 2 frames); documents of odd real lengths padded to 8 (= 2*cp*tp), so chunk
boundaries fall inside documents, image spans and padding. Every layout loads the one-process
run's initial weights (``cp_worker.py``); QK-Clip's tau is set between the middle two of the
reference's step-1 head maxima, so half of the heads clip. Process starts: the reference (1),
CP=2 (2 ranks), and one 4-rank start for TP=2+SP x CP=2 (vision tower split over the 4 TP x CP
ranks), the same with TP inside the tower, and PP=2 x CP=2 (tower on stage 0) with the
per-document SDPA kernel (the reference uses the dense-mask kernel).

Checked per layout: the routing of every MoE layer and token (CP/SP shards put back in global
order) identical; the loss and every gradient; the per-head max attention logits after QK-Clip's
MAX all-reduce over DP x CP equal the one-process maxima (a rank's own maxima would differ) and
the same heads clip in each of three steps; the parameters after three AdamW + QK-Clip steps;
every media item encoded on exactly one rank of the TP x CP group (split mode), or once per TP
group and on one CP rank only (TP mode).

Tolerances (fp32; layouts differ in summation order only): loss 1e-6 relative; each gradient's
max error 1e-5 of its largest entry (seen <= 9e-7); grad norms 1e-5 relative; max logits 1e-6
absolute (values ~0.07; seen <= 2.3e-8); parameters after three steps within 1e-4 (seen <=
4.3e-5: AdamW's per-element normalisation amplifies 1e-7 gradient noise on entries with |g| near
eps, as in test_vlm_layouts.py) and the whole update within 1e-4 relative.
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from vlm_runs import check_loss_and_gradients, check_routing, check_three_steps, run_worker

HERE = Path(__file__).resolve().parent
LAYOUTS = {"cp2": 2, "tp2_cp2": 4, "tp2_cp2_vit_tp": 4, "pp2_cp2_sdpa_doc": 4}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("cp")
    worker = str(HERE / "cp_worker.py")
    run_worker([sys.executable, worker, str(out), "reference"], timeout=900)
    results = {}
    for world in sorted(set(LAYOUTS.values())):
        run_worker([sys.executable, "-m", "torch.distributed.run", "--standalone",
                    f"--nproc-per-node={world}", worker, str(out), "layouts"], timeout=900)
        results.update(torch.load(out / f"layouts_{world}.pt", weights_only=True))
    return torch.load(out / "reference_1.pt", weights_only=True)["ref"], results


@pytest.mark.parametrize("layout", LAYOUTS)
def test_routing_is_identical(runs, layout):
    ref, lay = runs
    check_routing(ref, lay[layout], layout)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_loss_and_every_gradient_match_one_process(runs, layout):
    ref, lay = runs
    check_loss_and_gradients(ref, lay[layout], layout)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_qk_clip_max_logits_match_one_process(runs, layout):
    ref, lay = runs
    got = lay[layout]
    assert sorted(got["max_logits"]) == sorted(ref["max_logits"]) == [1, 2, 3, 4]
    for layer, maxima in ref["max_logits"].items():
        assert maxima.shape == (4,)
        assert (got["max_logits"][layer] - maxima).abs().max() < 1e-6, (layout, layer)
    # each rank recorded only its own queries' maxima: the all-reduce is what makes them equal
    own = got["rank_max_logits"]
    assert any(not torch.equal(s, got["max_logits"][layer].view(-1, s.numel())[tp_rank])
               for (layer, _, tp_rank), s in own.items())
    # tau splits the heads (8 of 16 clip at step 1), and the same heads clip in every step
    assert got["tau"] == ref["tau"]
    assert sum(ref["clipped"][0].values()) == 8
    assert got["clipped"] == ref["clipped"]


@pytest.mark.parametrize("layout", LAYOUTS)
def test_parameters_after_three_steps_match_one_process(runs, layout):
    ref, lay = runs
    check_three_steps(ref, lay[layout], layout)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_each_media_item_is_encoded_on_one_cp_rank(runs, layout):
    """Item log of the first step (recompute off). Split mode: each item on exactly one of the
    TP x CP ranks. TP mode: each item once per TP group (every TP rank of the owning CP rank
    takes part in its one TP-sharded pass) and on exactly one CP rank."""
    _, lay = runs
    ranks = lay[layout]["items"]
    towers = [r for r in ranks if r["pp_rank"] == 0]
    assert all(not r["encoded"] and not r["expected"] for r in ranks if r["pp_rank"] > 0)
    expected = Counter(towers[0]["expected"])
    assert sum(expected.values()) == 8 and max(expected.values()) == 1
    assert all(Counter(r["expected"]) == expected for r in towers)
    per_rank = {(r["cp_rank"], r["tp_rank"]): Counter(r["encoded"]) for r in towers}
    assert len(per_rank) == len(towers) >= 2
    if towers[0]["vision_mode"] == "split":
        assert sum(per_rank.values(), Counter()) == expected
        assert all(0 < sum(c.values()) < 8 for c in per_rank.values())
    else:
        cp_ranks = sorted({cp for cp, _ in per_rank})
        tp_ranks = sorted({tp for _, tp in per_rank})
        for cp in cp_ranks:  # the TP ranks of one CP rank encode the same items jointly
            assert all(per_rank[(cp, tp)] == per_rank[(cp, 0)] for tp in tp_ranks)
        assert sum((per_rank[(cp, 0)] for cp in cp_ranks), Counter()) == expected
        assert all(0 < sum(per_rank[(cp, 0)].values()) < 8 for cp in cp_ranks)
