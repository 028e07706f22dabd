"""Resharding on resume (tiny VLM, gloo, the batches and runs of test_vlm_layouts.py).

A step-3 checkpoint written in one layout is loaded **strictly** into a model of another layout
whose weights were first initialised from a different seed (the load must overwrite them: they
move by ~3.9): the loss on the batch is the source layout's. Where the optimizer state is loaded
too, one more AdamW step lands on the source layout's own step-4 parameters (lost moments would
move each weight by up to lr = 3e-3 instead).

* TP=2 -> TP=1, PP=2 -> PP=1, EP=2 -> TP=2 x EP=2 (expert TP 1), and at TP=2 from the tower
  split over TP (replicated, whole tensors) to TP inside the tower (sharded): weights and AdamW
  state (megatron's per-parameter optimizer state follows the model's sharded tensors).
* EP=2 -> EP=1: weights; the optimizer state is refused with a clear message (megatron keeps the
  experts in their own optimizer only when ep > 1, so the state's structure differs).
* DP=1 -> DP=2 with the DistributedOptimizer (``dp_reshardable``): weights and state.
* A DistributedOptimizer checkpoint is refused across a PP change (``dp_reshardable`` reshards
  over DP only; megatron's ``fully_reshardable`` fails on this CPU stack, SPEC §6) and across
  ep=1 -> ep=2, each with a message naming the difference and the way out.
"""

from __future__ import annotations

import pytest
from vlm_runs import vlm_results

RESHARD = {"tp2_to_tp1": "tp2_sp", "vit_split_to_vit_tp": "tp2_sp", "pp2_to_pp1": "pp2",
           "ep2_to_ep1": "ep2", "ep2_to_tp2_ep2": "ep2", "dp1_to_dp2_distopt": "ref"}
WITH_OPTIMIZER = ["tp2_to_tp1", "vit_split_to_vit_tp", "pp2_to_pp1", "ep2_to_tp2_ep2",
                  "dp1_to_dp2_distopt"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    ref, lay = vlm_results(tmp_path_factory)
    return {**lay, "ref": ref}


@pytest.mark.parametrize("case", sorted(RESHARD))
def test_weights_reshard_strictly_and_the_loss_is_unchanged(runs, case):
    got, source = runs[case], runs[RESHARD[case]]
    assert got["moved_by_load"] > 1.0  # the other seed's weights were all replaced
    assert got["loss3"] == pytest.approx(source["loss3"], rel=1e-6)
    assert got["loss3"] == pytest.approx(runs["ref"]["loss3"], rel=1e-5)


@pytest.mark.parametrize("case", WITH_OPTIMIZER)
def test_optimizer_state_resumes_across_the_change(runs, case):
    got, source = runs[case], runs[RESHARD[case]]
    assert got["params4"].keys() == source["params4"].keys()
    worst = max((got["params4"][k] - p).abs().max().item() for k, p in source["params4"].items())
    moved = max((source["params4"][k] - p).abs().max().item()
                for k, p in source["params3"].items())
    assert moved > 1e-3  # step 4 moved the weights by about lr
    assert worst < 1e-6, (case, worst)


@pytest.mark.parametrize("case, must_contain", [
    ("pp1_to_pp2_distopt", ["DistributedOptimizer state (dp_reshardable)",
                            "reshards across data-parallel ranks only",
                            "pp: 1 in checkpoint != 2 now", "load_optimizer=False"]),
    ("ep1_to_ep2_distopt", ["reshards across data-parallel ranks only",
                            "ep: 1 in checkpoint != 2 now", "load_optimizer=False"]),
    ("ep2_to_ep1_adam", ["saved at ep=2", "cannot load at ep=1", "separate optimizer",
                         "load_optimizer=False"]),
])
def test_optimizer_state_across_an_unsupported_change_is_refused(runs, case, must_contain):
    message = runs[case]
    for text in must_contain:
        assert text in message, (text, message)
