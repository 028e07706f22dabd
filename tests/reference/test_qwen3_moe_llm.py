"""Qwen3-MoE LLM (InternVL3.5-30B-A3B's text model) from megatron-core modules == transformers'
``Qwen3MoeForCausalLM``.

Tiny fp32 model: hidden 48, 3 layers, GQA 4 query / 2 key-value heads of dim 16 with q/k
RMSNorm, 8 experts of width 32, top 2, softmax router, no shared expert; ``mlp_only_layers=[1]``
makes the middle layer a dense SwiGLU (96), so ``moe_layer_pattern`` is [1, 0, 1]. Weights go
through the family's name rules (``families/internvl/hf_llm_names.py``) from the release's
per-expert names. Both router normalisations: ``norm_topk_prob`` true (top-k then softmax,
megatron's ``moe_router_pre_softmax`` false) and false (softmax over all, top-k, not
renormalised). Our packed THD path (two documents with padding in their spans) against HF on
each document alone. Measured max |ours - HF| (packed): 3.6e-6 normalised, 3.2e-6 not.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")
from internvl_llm_reference import build_ours, packed_params, perturb, tokens

ATOL = 1e-5
VOCAB, THETA = 128, 1e4
TEXT = dict(vocab_size=VOCAB, hidden_size=48, intermediate_size=96, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16,
            moe_intermediate_size=32, num_experts=8, num_experts_per_tok=2,
            decoder_sparse_step=1, mlp_only_layers=[1], rms_norm_eps=1e-6,
            tie_word_embeddings=False, max_position_embeddings=256,
            rope_parameters={"rope_type": "default", "rope_theta": THETA})


def hf_qwen3_moe(norm_topk_prob: bool, seed: int = 0):
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    torch.manual_seed(seed)
    config = Qwen3MoeConfig(**TEXT, norm_topk_prob=norm_topk_prob)
    config._attn_implementation = "eager"
    model = Qwen3MoeForCausalLM(config).eval()
    perturb(model, seed + 1)
    return model


def our_llm(norm_topk_prob: bool):
    from megatron_vlm.config.model import LLMConfig
    from megatron_vlm.families.internvl.hf_llm_names import qwen3_moe_layer_pattern

    pattern = qwen3_moe_layer_pattern(3, TEXT["decoder_sparse_step"], TEXT["mlp_only_layers"])
    return LLMConfig(
        attention="gqa", vocab_size=VOCAB, hidden_size=48, num_layers=3, num_attention_heads=4,
        num_query_groups=2, kv_channels=16, qk_layernorm=True, ffn_hidden_size=96,
        num_experts=8, moe_router_topk=2, num_shared_experts=0, moe_ffn_hidden_size=32,
        moe_router_score_function="softmax", moe_router_pre_softmax=not norm_topk_prob,
        moe_router_topk_scaling_factor=1.0, moe_router_enable_expert_bias=False,
        moe_layer_pattern=pattern, num_dense_layers=pattern.count(0), rope_theta=THETA,
        norm_epsilon=1e-6, untie_embeddings=True, max_position_embeddings=256)


def release_state(hf_model) -> dict[str, torch.Tensor]:
    """LLM-relative HF names (``lm_head`` top-level), transformers' fused in-memory experts split
    into the release's per-expert ``gate/up/down_proj``."""
    out = {}
    for key, value in hf_model.state_dict().items():
        name = key.removeprefix("model.")
        if name.endswith("mlp.experts.gate_up_proj"):
            pre = name[:-len("gate_up_proj")]
            for e, t in enumerate(value):
                out[f"{pre}{e}.gate_proj.weight"], out[f"{pre}{e}.up_proj.weight"] = t.chunk(2)
        elif name.endswith("mlp.experts.down_proj"):
            pre = name[:-len("down_proj")]
            for e, t in enumerate(value):
                out[f"{pre}{e}.down_proj.weight"] = t
        elif "rotary_emb" not in name:
            out[name] = value
    return out


def build(norm_topk_prob: bool, kernels=None):
    from megatron_vlm.families.internvl.hf_llm_names import (
        internvl_head_rules,
        qwen3_moe_llm_rules,
    )

    hf = hf_qwen3_moe(norm_topk_prob)
    llm = our_llm(norm_topk_prob)
    rules = qwen3_moe_llm_rules(llm.moe_layer_pattern) + internvl_head_rules()
    return hf, build_ours(llm, release_state(hf), rules, kernels)


@pytest.fixture(scope="module")
def normalised(megatron_groups):
    return build(norm_topk_prob=True)


def _check_packed(hf, ours) -> float:
    """Two documents (real 13 and 9 tokens in spans of 14 and 12) in one THD sequence: each
    document's logits equal HF's on that document alone. Returns the max difference."""
    lengths, spans = [13, 9], [14, 12]
    ids = tokens(sum(spans), seed=2, vocab=VOCAB)
    positions = torch.cat([torch.arange(n) for n in spans])[None]
    worst = 0.0
    with torch.no_grad():
        got = ours(ids, positions, None, packed_seq_params=packed_params(lengths, spans))
        for start, n in zip([0, spans[0]], lengths):
            expected = hf(input_ids=ids[:, start:start + n]).logits
            assert expected.abs().max() > 1.0
            torch.testing.assert_close(got[:, start:start + n], expected, atol=ATOL, rtol=0)
            worst = max(worst, float((got[:, start:start + n] - expected).abs().max()))
    return worst


def test_layer_pattern_from_qwen3_moe_config():
    """Qwen3MoeDecoderLayer's rule, written out: MoE iff not mlp-only and (i + 1) % step == 0."""
    from megatron_vlm.families.internvl.hf_llm_names import qwen3_moe_layer_pattern

    assert qwen3_moe_layer_pattern(4) == [1, 1, 1, 1]
    assert qwen3_moe_layer_pattern(4, 2) == [0, 1, 0, 1]
    assert qwen3_moe_layer_pattern(5, 1, [0, 3]) == [0, 1, 1, 0, 1]
    hf = hf_qwen3_moe(True)  # transformers' own layers: a dense one has no router
    kinds = [int(hasattr(layer.mlp, "gate") and hasattr(layer.mlp, "experts"))
             for layer in hf.model.layers]
    assert kinds == qwen3_moe_layer_pattern(3, 1, [1]) == [1, 0, 1]


def test_single_sequence_logits_equal_transformers(normalised):
    hf, ours = normalised
    ids = tokens(21, seed=1, vocab=VOCAB)
    with torch.no_grad():
        expected = hf(input_ids=ids).logits
        got = ours(ids, torch.arange(21)[None], None)
    assert got.shape == expected.shape == (1, 21, VOCAB)
    assert expected.abs().max() > 1.0
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


def test_packed_documents_equal_transformers_per_document(normalised):
    hf, ours = normalised
    _check_packed(hf, ours)
    # Control: the other router normalisation on the same weights differs.
    from megatron_vlm.families.internvl.hf_llm_names import (
        internvl_head_rules,
        qwen3_moe_llm_rules,
    )

    llm = our_llm(norm_topk_prob=False)
    other = build_ours(llm, release_state(hf),
                       qwen3_moe_llm_rules(llm.moe_layer_pattern) + internvl_head_rules())
    ids = tokens(13, seed=3, vocab=VOCAB)
    with torch.no_grad():
        diff = (other(ids, torch.arange(13)[None], None) - hf(input_ids=ids).logits).abs().max()
    assert diff > 100 * ATOL


def test_unnormalised_topk_equals_transformers(megatron_groups):
    """``norm_topk_prob: false``: softmax over all experts, top-k, not renormalised."""
    hf, ours = build(norm_topk_prob=False)
    _check_packed(hf, ours)


def test_moe_layer_pattern_is_checked():
    from megatron_vlm.config.model import LLMConfig

    base = dict(num_layers=3, num_experts=8, moe_router_topk=2)
    with pytest.raises(ValueError, match="set num_dense_layers to the number of 0s"):
        LLMConfig(**base, moe_layer_pattern=[1, 0, 1], num_dense_layers=0)
    with pytest.raises(ValueError, match="must have num_layers=3 entries"):
        LLMConfig(**base, moe_layer_pattern=[1, 1], num_dense_layers=0)
    with pytest.raises(ValueError, match="applies to moe_router_score_function=softmax"):
        LLMConfig(**base, moe_router_pre_softmax=True)
    llm = LLMConfig(**base, moe_layer_pattern=[1, 0, 1], num_dense_layers=1)
    assert llm.moe_layer_freq == [1, 0, 1] and llm.num_moe_layers == 2


def test_param_count_closed_form_equals_built_model(normalised):
    """A dense layer inside the MoE stack (``moe_layer_pattern``) counts as dense."""
    from megatron_vlm.models.param_count import count_llm_params_closed_form, count_module_params

    _, ours = normalised
    built = count_module_params(ours)
    closed = count_llm_params_closed_form(our_llm(True))
    assert {k: closed[k] for k in built} == built
    assert built["dense_mlp"] == 3 * 48 * 96 and built["router"] == 2 * 8 * 48


def test_planned_tensors_equal_the_built_model(megatron_groups):
    from internvl_llm_reference import planned_and_built_tensors

    planned, built = planned_and_built_tensors(our_llm(True))
    assert planned == built
    assert ("decoder.layers.1.mlp.linear_fc1.weight", (192, 48), "bf16") in built


@pytest.mark.parametrize("norm_topk_prob", [True, False])
def test_config_both_ways(norm_topk_prob):
    """transformers' ``Qwen3MoeConfig`` -> our LLMConfig is the one written by hand above, and
    back to a config transformers builds the same model from."""
    from transformers import Qwen3MoeConfig

    from megatron_vlm.families.internvl.hf_llm_config import llm_from_hf, llm_to_hf

    config = Qwen3MoeConfig(**TEXT, norm_topk_prob=norm_topk_prob)
    hf = config.to_dict()
    llm = llm_from_hf(hf)
    assert llm == our_llm(norm_topk_prob)
    exported = llm_to_hf(llm, "qwen3_moe")
    again = Qwen3MoeConfig(**{k: v for k, v in exported.items() if k != "model_type"})
    for key in ("num_experts", "num_experts_per_tok", "moe_intermediate_size", "norm_topk_prob",
                "head_dim", "num_key_value_heads", "intermediate_size", "rope_parameters"):
        assert getattr(again, key) == getattr(config, key), key
    assert again.mlp_only_layers == [1] and llm_from_hf(again.to_dict()) == llm


def test_dense_qwen3_config_maps_to_the_tested_llm():
    """InternVL3.5-8B's Qwen3: the tiny ``Qwen3ForCausalLM`` config of ``test_qwen3_llm``
    (``qwen3_reference``) maps to the LLMConfig that test proves equal, and back."""
    import qwen3_reference as ref
    from transformers import Qwen3Config

    from megatron_vlm.families.internvl.hf_llm_config import llm_from_hf, llm_to_hf

    config = Qwen3Config(  # hf_qwen3's config, without building its model
        vocab_size=ref.VOCAB, hidden_size=ref.HIDDEN, intermediate_size=ref.FFN,
        num_hidden_layers=ref.LAYERS, num_attention_heads=ref.HEADS,
        num_key_value_heads=ref.KV_HEADS, head_dim=ref.HEAD_DIM, rms_norm_eps=ref.EPS,
        tie_word_embeddings=False, attention_bias=False, max_position_embeddings=256,
        rope_parameters={"rope_type": "default", "rope_theta": THETA})
    llm = llm_from_hf(config.to_dict())
    assert llm == ref.our_llm_config(THETA)
    assert llm_from_hf(llm_to_hf(llm, "qwen3")) == llm


def test_qwen3_30b_a3b_count_equals_transformers():
    """The released Qwen3-30B-A3B sizes (InternVL3.5-30B-A3B's LLM): the config mapping's LLM
    has transformers' parameter count, closed form and planner's tensor list alike."""
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

    from megatron_vlm.config.model import ModelConfig
    from megatron_vlm.families.internvl.hf_llm_config import llm_from_hf
    from megatron_vlm.models.param_count import count_llm_params_closed_form
    from megatron_vlm.planning.tensors import chunk_tensors

    config = Qwen3MoeConfig(
        vocab_size=151936, hidden_size=2048, intermediate_size=6144, num_hidden_layers=48,
        num_attention_heads=32, num_key_value_heads=4, head_dim=128, moe_intermediate_size=768,
        num_experts=128, num_experts_per_tok=8, norm_topk_prob=True, tie_word_embeddings=False)
    with torch.device("meta"):
        expected = Qwen3MoeForCausalLM(config).num_parameters()
    llm = llm_from_hf(config.to_dict())
    assert llm.moe_layer_pattern is None and llm.num_moe_layers == 48
    counts = count_llm_params_closed_form(llm)
    assert counts["total"] == expected
    assert 3.2e9 < counts["activated"] < 3.4e9  # "A3B"
    planned = chunk_tensors(ModelConfig(llm=llm, params_dtype="bf16"), range(48), first=True,
                            last=True)
    assert sum(t.numel for t in planned) == expected
