"""MLA latent norms at ``rms_norm_eps=1e-5`` (Moonlight / Kimi-VL): logits equal transformers'.

transformers' DeepSeek-V3 (like the original DeepSeek-V2/V3 and Moonlight code) builds
``q_a_layernorm`` and ``kv_a_layernorm`` with the RMSNorm default eps 1e-6 whatever
``rms_norm_eps`` says; only the layer and final norms use ``rms_norm_eps``. megatron-core passes
``layernorm_epsilon`` to every norm, so ours must give the latent norms
``model.llm.mla_latent_norm_epsilon`` (1e-6; the import sets it) instead.

Tiny fp32 models (every weight and the router bias perturbed, the latent down-projections
scaled to latents of RMS ~0.2), with q_lora and with a full q_proj, imported through the
project's HF import path. Relative error = max |ours - HF| / max |HF|. Measured: 2.4e-7 / 1.6e-7
(fp32 summation order); with the latent norms at ``rms_norm_eps`` (the bug): 3.5e-4 / 1.7e-4.
``REL_TOL`` 2e-6 sits between; the control test checks the eps is visible at it.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

pytest.importorskip("transformers")
from hf_fixtures import load_converted, perturb_all
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

REL_TOL = 2e-6
SEQ = 32
HF_LATENT_EPS = 1e-6  # DeepseekV3RMSNorm's default, used for q_a_layernorm / kv_a_layernorm

BASE = {"vocab_size": 96, "hidden_size": 48, "intermediate_size": 64,
        "moe_intermediate_size": 16, "num_attention_heads": 4, "num_key_value_heads": 4,
        "kv_lora_rank": 16, "qk_nope_head_dim": 8, "qk_rope_head_dim": 8, "v_head_dim": 8,
        "max_position_embeddings": 64, "tie_word_embeddings": False, "rms_norm_eps": 1e-5,
        "routed_scaling_factor": 2.5, "num_nextn_predict_layers": 0, "num_hidden_layers": 2,
        "first_k_dense_replace": 1, "n_routed_experts": 4, "num_experts_per_tok": 2,
        "n_group": 1, "topk_group": 1, "n_shared_experts": 1, "attn_implementation": "eager"}
CASES = {"q_lora": {**BASE, "q_lora_rank": 16}, "q_proj": {**BASE, "q_lora_rank": None}}


@pytest.fixture(scope="module", params=list(CASES))
def case(request, megatron_groups, tmp_path_factory):
    """(HF model, our model imported from its save_pretrained files, our checkpoint, tmp dir)."""
    from megatron_vlm.convert import import_hf

    torch.manual_seed(0)
    hf = DeepseekV3ForCausalLM(DeepseekV3Config(**CASES[request.param])).eval()
    perturb_all(hf, seed=3)
    with torch.no_grad():  # latents of RMS ~0.2, where the norms' eps shows
        for name, p in hf.named_parameters():
            if name.endswith(("q_a_proj.weight", "kv_a_proj_with_mqa.weight")):
                p.mul_(0.3)
    tmp = tmp_path_factory.mktemp(f"eps_{request.param}")
    hf.save_pretrained(tmp / "hf")
    result = import_hf(tmp / "hf", tmp / "ours", progress=False)
    return hf, load_converted(result.checkpoint), result.checkpoint, tmp


def _relative_error(hf, ours) -> float:
    ids = torch.randint(0, hf.config.vocab_size, (2, SEQ),
                        generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        expected = hf(input_ids=ids).logits
        got = ours(ids, None, None)[..., : hf.config.vocab_size]
    assert got.shape == expected.shape == (2, SEQ, hf.config.vocab_size)
    assert expected.abs().max() > 1.0
    return ((got - expected).abs().max() / expected.abs().max()).item()


def _latent_norms(ours) -> list[torch.nn.Module]:
    attn = [layer.self_attention for layer in ours.decoder.layers]
    return ([a.kv_layernorm for a in attn]
            + [a.q_layernorm for a in attn if getattr(a, "q_layernorm", None) is not None])


def test_mla_eps_1e5_logits_equal_transformers(case):
    hf, ours, _, _ = case
    assert hf.config.rms_norm_eps == 1e-5
    # The reference really builds its latent norms at 1e-6 and the others at rms_norm_eps.
    hf_attn = hf.model.layers[0].self_attn
    assert hf_attn.kv_a_layernorm.variance_epsilon == HF_LATENT_EPS
    assert hf.model.layers[0].input_layernorm.variance_epsilon == 1e-5
    rel = _relative_error(hf, ours)
    assert rel < REL_TOL, f"max |ours - HF| / max |HF| = {rel:.2e}"


def test_latent_eps_is_visible_at_the_tolerance(case):
    """Control: our latent norms at ``rms_norm_eps`` (the megatron default) miss the tolerance
    by far, so the test above really checks the latent eps."""
    hf, ours, _, _ = case
    norms = _latent_norms(ours)
    assert norms and all(n.eps == HF_LATENT_EPS for n in norms)
    others = [m for m in ours.modules() if isinstance(m, torch.nn.RMSNorm)
              and not any(m is n for n in norms)]  # layer norms and the final norm
    assert len(others) == 2 * len(ours.decoder.layers) + 1
    assert all(m.eps == 1e-5 for m in others)
    try:
        for n in norms:
            n.eps = hf.config.rms_norm_eps
        rel = _relative_error(hf, ours)
    finally:
        for n in norms:
            n.eps = HF_LATENT_EPS
    assert rel > 20 * REL_TOL, f"{rel:.2e}"


def test_export_at_1e5_loads_in_transformers_with_the_same_logits(case):
    """Export writes ``rms_norm_eps`` 1e-5 and nothing for the latent eps (HF has no field):
    transformers' model from the export computes our logits."""
    from megatron_vlm.convert import export_hf

    _, ours, checkpoint, tmp = case
    export_hf(checkpoint, tmp / "exported", dtype="fp32", progress=False)
    reloaded = DeepseekV3ForCausalLM.from_pretrained(tmp / "exported",
                                                     attn_implementation="eager").eval()
    assert reloaded.config.rms_norm_eps == 1e-5
    assert _relative_error(reloaded, ours) < REL_TOL


def test_hf_config_sets_the_latent_eps_and_export_refuses_another():
    from megatron_vlm.convert.hf_config import llm_from_hf, llm_to_hf
    from megatron_vlm.convert.rules import ConversionError

    llm, _ = llm_from_hf(DeepseekV3Config(**CASES["q_proj"]).to_dict())
    assert (llm.norm_epsilon, llm.mla_latent_norm_epsilon) == (1e-5, HF_LATENT_EPS)
    text = llm_to_hf(llm)
    assert text["rms_norm_eps"] == 1e-5 and not [k for k in text if "latent" in k]
    with pytest.raises(ConversionError, match="mla_latent_norm_epsilon=1e-05"):
        llm_to_hf(dataclasses.replace(llm, mla_latent_norm_epsilon=1e-5))
