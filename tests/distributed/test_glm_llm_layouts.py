"""The GLM LLM options in parallel layouts equal one process (text only, ``glm_llm_worker.py``).

GLM-4.5V-style LLM (GQA with q/k/v bias, partial rotary 0.5, NeoX M-RoPE, dense first layer then
sigmoid-routed MoE with expert bias and a shared expert, one MTP layer trained at loss weight
0.3) in TP=2 + SP + EP=2, PP=2 (the MTP layer on the last stage, with megatron's copy of the
embedding there) and CP=2 (M-RoPE ids and the MTP roll on CP shares); GLM-4.1V-style LLM (dense,
sandwich norms, interleaved M-RoPE) in TP=2 + SP and CP=2. Two packed micro-batches of 64 tokens,
documents padded to 8, 3-axis ids that differ per axis (an image-like block in every document).
And the tiny Kimi VLM with an MTP layer (weight 0.3) in CP=2, TP=2 + SP and PP=2 on the VLM
layout tests' media batches: the VLM hands its LLM the whole sequence's ids and scatters the
merged embeddings over SP itself, so the MTP layers must cut the ids to their CP share and scatter
their own embeddings (``models/mtp.py``; without either, the run fails on a 128 vs 64 token
concatenation); under PP megatron syncs the last stage's embedding copy through the VLM
(``VisionLanguageModel.shared_embedding_or_output_weight``).

Checked per layout: loss, every gradient (MTP layer included; every one non-zero in the
reference) and the grad norms of two AdamW steps, and the parameters after them. Tolerances as
test_keye_layouts.py's (fp32, summation order only): loss 1e-6 relative (seen <= 9e-8), each
gradient within 1e-5 of its largest entry (seen <= 8.5e-7), grad norms 1e-5 relative (seen
<= 3.6e-6), the whole update within 1e-4 relative (Frobenius; seen <= 6.7e-5) and every parameter
within 5e-4 after two steps (seen <= 1.4e-4: AdamW's per-element normalisation amplifies 1e-7
gradient noise where |g| is near eps). Checked by mutation: without ``models/mtp.py``'s padded
document boundaries megatron's MTP roll fails under CP=2 (it divides the real-length boundaries
by cp). One process start, ~22 s of cases after start-up (~25 s CPU per rank).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from vlm_cases import relative_error
from vlm_runs import run_worker

HERE = Path(__file__).resolve().parent
CASES = ["glm45/tp2_sp_ep2", "glm45/pp2", "glm45/cp2", "glm41/tp2_sp", "glm41/cp2",
         "vlm_mtp/cp2", "vlm_mtp/tp2_sp", "vlm_mtp/pp2"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("glm_llm_layouts")
    run_worker([sys.executable, "-m", "torch.distributed.run", "--standalone",
                "--nproc-per-node=2", str(HERE / "glm_llm_worker.py"), str(out)])
    return torch.load(out / "all.pt", weights_only=True)


@pytest.mark.parametrize("case", CASES)
def test_loss_and_every_gradient_match_one_process(runs, case):
    ref, got = runs[case.split("/")[0] + "/ref"], runs[case]
    assert got["loss"] == pytest.approx(ref["loss"], rel=1e-6)
    assert got["grads"].keys() == ref["grads"].keys()
    if not case.startswith("glm41"):
        assert any("mtp.layers.0." in name for name in ref["grads"])
    for name, g in ref["grads"].items():
        assert g.abs().max() > 0, f"{name} has no gradient in the reference"
        assert relative_error(got["grads"][name], g) < 1e-5, (case, name)
    assert got["grad_norms"] == pytest.approx(ref["grad_norms"], rel=1e-5)


@pytest.mark.parametrize("case", CASES)
def test_parameters_after_two_steps_match_one_process(runs, case):
    ref, got = runs[case.split("/")[0] + "/ref"], runs[case]
    diff_sq = update_sq = 0.0
    for name, p in ref["params_end"].items():
        assert torch.equal(got["params0"][name], ref["params0"][name]), name
        diff, update = got["params_end"][name] - p, p - ref["params0"][name]
        assert diff.abs().max() < 5e-4, (case, name)
        diff_sq, update_sq = diff_sq + diff.square().sum(), update_sq + update.square().sum()
    assert diff_sq.sqrt() <= 1e-4 * update_sq.sqrt(), case
