"""The whole GLM VLM in parallel layouts equals one process on an identical padded packed GLM
batch (issue 20, "TP=2, EP=2, CP=2, PP=2 equal one process on a GLM batch"; ``glm_worker.py``).

The model is ``families/glm`` as training builds it: the Glm4v tower (Conv3d over 2 frames,
bicubic-sampled position table, 2D RoPE, SwiGLU blocks), the projector (2x2 downsample conv +
merger SwiGLU) and the LLM -- GLM-4.5V-style (GQA with q/k/v bias, partial rotary 0.5, NeoX M-RoPE,
dense first layer then sigmoid-routed MoE with expert bias and a shared expert, one MTP layer at
loss weight 0.3) and GLM-4.1V-style (dense, sandwich norms, interleaved M-RoPE); fp32, dropout 0.

The batch is written by the family's data path: GLM's template (image wrappers, ``<|image|>``
placeholders, video wrappers, ``str(int(ts))`` after each temporal patch) over a character
tokenizer with GLM's media tokens, packed by ``pack_tokenized`` with GLM's position rule. Two
micro-batches of 96 tokens, documents padded to 8 (= 2*cp*tp, so CP chunk boundaries fall inside
images, temporal patches and padding): two images of different sizes (4x6 and 8x4 patches, the
4x4 position table up- and down-sampled) in one document and a 2-temporal-patch 4x4 video in
another; an image and a 2-patch 2x8 video in one document, and text only. Media items are
``(2, h, w)`` frame grids (an image's frame duplicated).

One process start (2 ranks): rank 0 first runs both one-process references alone, in a world of
one process (saving the initial weights every layout loads: TP init draws per-rank RNG), then both
ranks run every case: GLM-4.5V at TP=2 + SP + EP=2 (expert TP 1; tower split over TP: each
temporal patch encoded on one rank; merger SwiGLU and qkv bias sharded; the MTP layer scatters its
own embeddings over SP), PP=2 (tower and merger on stage 0, M-RoPE ids on both stages, the MTP
layer on the last stage with megatron's embedding copy synced through the VLM, 1F1B over 2
micro-batches) and CP=2 (merged embeddings and their M-RoPE ids split per document, temporal
patches split over the CP ranks, the MTP layer cuts ids and positions to its CP share) and EP=2
over DP=2 (one micro-batch per rank, experts split over the data-parallel ranks); GLM-4.1V
at TP=2 + SP (tower split over TP, and TP inside the tower: its SwiGLU blocks sharded) and CP=2.

Checked per case: loss, every gradient (tower, projector, LLM and MTP layer; every one non-zero
in the reference) and the grad norm of step 1; the grad norm of step 2, the parameters after two
AdamW steps (lr 3e-3; pinned in the worker) and the loss on the batch after them; which temporal
patches each rank's tower encoded. Tolerances as test_keye_layouts.py's (fp32; layouts differ in
summation order only): loss 1e-6 relative (seen <= 1.3e-7); each gradient's max error 1e-5 of
its largest entry (seen <= 7.9e-7); grad norms 1e-5 relative (seen <= 9.2e-7); every parameter
within 2e-4 after two steps (seen <= 5.8e-5: AdamW's per-element normalisation amplifies 1e-7
gradient noise on entries whose |g| is near eps; with init std 0.1 the k bias of each head's
unrotated half, whose true gradient is 0, reaches 5e-4) and the whole update within 1e-4
relative (Frobenius; seen <= 3.8e-5); the loss after the steps 1e-5 relative (seen <= 1.2e-7).

Controls (``test_wrong_mrope_ids_would_fail``): the reference weights on the same batch with 1D
ids (t = h = w) move the loss by 4.1e-6 / 6.0e-6 relative (GLM-4.5V / 4.1V; init std 0.02 keeps
attention soft, so the loss alone is a weak witness) and some gradient by 1.0e-2 / 8.2e-3 of its
largest entry; GLM's ids with h and w swapped move some gradient by 0.51 / 2.9e-4. Checked by
mutation (a harness monkeypatching the package in the worker, 2026-12-07): 1D ids on the second
pipeline stage move the PP=2 gradients by 4.9e-4 and parameters by 9.3e-3; h/w swapped on CP
rank 1's tokens move the CP=2 gradients by 3.5e-4 / 2.7e-4; without ``models/mtp.py``'s CP cut
or its SP scatter the CP=2 / TP=2 cases fail (96 vs 48 token concatenation), without
``VisionLanguageModel.shared_embedding_or_output_weight`` the PP=2 case fails (AttributeError):
these cases cover what the tiny Kimi VLM + MTP cases of the former test_glm_llm_layouts.py did.

One process start, 2 ranks: 31-33 s CPU in all (user time of the pytest run; 11-21 s of cases
after start-up on a loaded 2-core machine).
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

import pytest
import torch
from vlm_cases import relative_error
from vlm_runs import run_worker

HERE = Path(__file__).resolve().parent
CASES = ["glm45v/tp2_sp_ep2", "glm45v/pp2", "glm45v/cp2", "glm45v/ep2_dp2", "glm41v/tp2_sp",
         "glm41v/tp2_sp_vit_tp", "glm41v/cp2"]
NUM_SEGMENTS = 7  # temporal patches per step: two images + 2 video patches; an image + 2


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("glm_layouts")
    run_worker([sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc-per-node=2", str(HERE / "glm_worker.py"), str(out)])
    return torch.load(out / "all.pt", weights_only=True)


def _ref(runs, case: str) -> dict:
    return runs[case.split("/")[0] + "/ref"]


@pytest.mark.parametrize("model", ["glm45v", "glm41v"])
def test_wrong_mrope_ids_would_fail(runs, model):
    """The controls: the reference weights on the same batch with 1D ids (t = h = w) and with
    GLM's ids with h and w swapped move some gradient by over 10x the layouts' gradient tolerance
    (1e-5 of its largest entry), and the 1D ids move the loss by over 2x its tolerance (1e-6)."""
    ref, controls = runs[f"{model}/ref"], runs[f"{model}/controls"]
    for name, control in controls.items():
        worst = max(relative_error(control["grads"][n], g) for n, g in ref["grads"].items())
        assert worst > 1e-4, (name, worst)
    assert abs(controls["1d"]["loss"] - ref["loss"]) > 2e-6 * ref["loss"]


@pytest.mark.parametrize("case", CASES)
def test_loss_and_every_gradient_match_one_process(runs, case):
    ref, got = _ref(runs, case), runs[case]
    assert got["loss"] == pytest.approx(ref["loss"], rel=1e-6)
    assert got["grads"].keys() == ref["grads"].keys()
    prefixes = {name.split(".")[0] for name in ref["grads"]}
    assert prefixes == {"vision_tower", "projector", "language_model"}
    if case.startswith("glm45v"):
        assert any(".mtp.layers.0." in name for name in ref["grads"])
        assert any(".local_experts." in name for name in ref["grads"])
    for name, g in ref["grads"].items():
        assert g.abs().max() > 0, f"{name} has no gradient in the reference"
        assert relative_error(got["grads"][name], g) < 1e-5, (case, name)
    assert got["grad_norms"] == pytest.approx(ref["grad_norms"], rel=1e-5)


@pytest.mark.parametrize("case", CASES)
def test_parameters_after_two_steps_match_one_process(runs, case):
    ref, got = _ref(runs, case), runs[case]
    diff_sq = update_sq = 0.0
    for name, p in ref["params_end"].items():
        assert torch.equal(got["params0"][name], ref["params0"][name]), name
        diff, update = got["params_end"][name] - p, p - ref["params0"][name]
        assert diff.abs().max() < 2e-4, (case, name)
        diff_sq, update_sq = diff_sq + diff.square().sum(), update_sq + update.square().sum()
    assert update_sq.sqrt() > 1.0  # the steps moved the weights
    assert diff_sq.sqrt() <= 1e-4 * update_sq.sqrt(), case
    assert got["loss_end"] == pytest.approx(ref["loss_end"], rel=1e-5)
    assert ref["loss_end"] < ref["loss"] - 0.3  # and lowered the loss on the batch


@pytest.mark.parametrize("case", CASES)
def test_each_temporal_patch_is_encoded_once(runs, case):
    """The tower's unit of work is one image or one temporal patch (``(1, h, w)``): the reference
    encodes all 7 once; split mode over TP or CP, and DP (each rank its micro-batch), encodes
    each on exactly one rank, both ranks busy; TP inside the tower encodes every one on both TP
    ranks (one sharded pass); under PP only stage 0 holds the tower."""
    ref = _ref(runs, case)["items"]
    segments = Counter(ref[0]["encoded"])
    assert len(ref) == 1 and sum(segments.values()) == NUM_SEGMENTS
    assert max(segments.values()) == 1 and {s[:3] for s in segments} == {
        (1, 4, 6), (1, 8, 4), (1, 4, 4), (1, 6, 4), (1, 2, 8)}
    ranks = runs[case]["items"]
    encoded = [Counter(r["encoded"]) for r in ranks]
    if case.endswith("pp2"):
        assert [r["pp_rank"] for r in ranks] == [0, 1]
        assert encoded == [segments, Counter()]
    elif case.endswith("vit_tp"):
        assert encoded == [segments, segments]
    else:
        assert sum(encoded, Counter()) == segments
        assert all(0 < sum(c.values()) < NUM_SEGMENTS for c in encoded)
