"""The LLM cost model with grouped-query attention (``attention: gqa``, Qwen3): the planner's
tensor list and the closed-form parameter count against tiny GQA models megatron builds on the
``meta`` device (dense and MoE, with and without q/k norms and qkv bias), Qwen3-8B's count against
transformers' own ``Qwen3ForCausalLM``, FLOPs against a hand count of the matmuls and against
Megatron-LM's GQA formula transcribed here, activations against what autograd saves."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from megatron_vlm.config.model import LLMConfig, ModelConfig
from megatron_vlm.config.parallel import ParallelConfig
from megatron_vlm.models.param_count import count_llm_params_closed_form, count_module_params
from megatron_vlm.planning.costs import llm_head_flops, llm_layer_flops
from megatron_vlm.planning.tensors import chunk_tensors
from megatron_vlm.training.flops import llm_flops_breakdown_per_token, model_flops

#: Qwen3-8B's published parameter count (untied embeddings included); checked below against
#: transformers' Qwen3ForCausalLM built from the same sizes, not trusted on its own.
QWEN3_8B_PARAMS = 8_190_735_360


def tiny_gqa(**overrides) -> LLMConfig:
    """Hidden 48, 4 query heads / 2 key-value heads of dim 16 (so ``kv_channels`` differs from
    hidden / heads), SwiGLU 96, vocab 128, untied head."""
    kwargs = dict(
        attention="gqa", vocab_size=128, hidden_size=48, num_layers=2, num_attention_heads=4,
        num_query_groups=2, kv_channels=16, qk_layernorm=True, add_qkv_bias=False,
        ffn_hidden_size=96, num_experts=None, num_dense_layers=2, rope_theta=1e6,
        untie_embeddings=True, max_position_embeddings=256)
    kwargs.update(overrides)
    return LLMConfig(**kwargs)


def qwen3_8b() -> LLMConfig:
    """Qwen3-8B's sizes (FAMILIES.md §1): 36 layers, 4096 wide, 32 q / 8 kv heads of 128,
    SwiGLU 12288, q/k RMSNorm, no bias, vocab 151936, untied."""
    return LLMConfig(
        attention="gqa", vocab_size=151936, hidden_size=4096, num_layers=36,
        num_attention_heads=32, num_query_groups=8, kv_channels=128, qk_layernorm=True,
        ffn_hidden_size=12288, num_experts=None, num_dense_layers=36, rope_theta=1e6,
        untie_embeddings=True, max_position_embeddings=40960)


CASES = {
    "dense": tiny_gqa(),
    "dense_bias_no_qknorm": tiny_gqa(qk_layernorm=False, add_qkv_bias=True, num_query_groups=1),
    "moe": tiny_gqa(num_experts=4, moe_ffn_hidden_size=32, num_dense_layers=1, moe_router_topk=2,
                    num_shared_experts=1, add_qkv_bias=True),
}


@pytest.fixture(scope="module")
def built() -> dict[str, torch.nn.Module]:
    """Each case as ``models.llm.build_llm`` makes it (TP = 1, bf16) on the meta device, as
    ``convert/mcore.py::build_meta_model`` does."""
    from megatron_vlm.models.llm import build_llm
    from megatron_vlm.parallel.init import ensure_single_process_groups

    groups = ensure_single_process_groups(seed=1234).pg_collection
    with torch.device("meta"):
        return {name: build_llm(llm, ParallelConfig(), "bf16", pg_collection=groups)
                for name, llm in CASES.items()}


@pytest.mark.parametrize("name", sorted(CASES))
def test_tensor_list_equals_the_built_model(built, name) -> None:
    llm = CASES[name]
    planned = chunk_tensors(ModelConfig(llm=llm, params_dtype="bf16"), range(llm.num_layers),
                            first=True, last=True)
    dtypes = {torch.bfloat16: "bf16", torch.float32: "fp32"}
    real = [(n, tuple(p.shape), dtypes[p.dtype]) for n, p in built[name].named_parameters()]
    assert [(t.name, t.shape, t.dtype) for t in planned] == real


@pytest.mark.parametrize("name", sorted(CASES))
def test_closed_form_count_equals_the_built_model(built, name) -> None:
    closed = count_llm_params_closed_form(CASES[name])
    measured = count_module_params(built[name])
    assert {k: closed[k] for k in measured} == measured


def test_tensor_list_splits_whole_query_groups_over_tp() -> None:
    llm = qwen3_8b()
    model = ModelConfig(llm=llm, params_dtype="bf16")
    names = {t.name: t.shape for t in chunk_tensors(model, [0], first=False, last=False, tp=4)}
    # 32 q heads / 4 = 8 heads, 8 groups / 4 = 2 groups per rank: (8 + 2 * 2) * 128 rows
    assert names["decoder.layers.0.self_attention.linear_qkv.weight"] == (1536, 4096)
    assert names["decoder.layers.0.self_attention.linear_proj.weight"] == (4096, 1024)
    assert names["decoder.layers.0.self_attention.q_layernorm.weight"] == (128,)
    with pytest.raises(ValueError, match="num_query_groups=8"):
        chunk_tensors(model, [0], first=False, last=False, tp=16)


def test_qwen3_8b_count_equals_transformers() -> None:
    from transformers import Qwen3Config, Qwen3ForCausalLM

    config = Qwen3Config(
        vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
        num_attention_heads=32, num_key_value_heads=8, head_dim=128, tie_word_embeddings=False,
        attention_bias=False)
    with torch.device("meta"):
        hf = Qwen3ForCausalLM(config)
    assert hf.num_parameters() == QWEN3_8B_PARAMS
    counts = count_llm_params_closed_form(qwen3_8b())
    assert counts["total"] == QWEN3_8B_PARAMS
    planned = chunk_tensors(ModelConfig(llm=qwen3_8b(), params_dtype="bf16"), range(36),
                            first=True, last=True)
    assert sum(t.numel for t in planned) == QWEN3_8B_PARAMS


def _matmul_flops(m: int, n: int, k: int) -> int:
    return 2 * m * n * k


@pytest.mark.parametrize("name", ["dense", "moe"])
def test_layer_flops_equal_a_hand_count_of_the_matmuls(name) -> None:
    llm, s = CASES[name], 32
    h, n, g, d = 48, 4, 2, 16
    # forward matmuls of one sequence, written out; training = 3x forward
    attention = (_matmul_flops(s, h, (n + 2 * g) * d)  # linear_qkv
                 + n * _matmul_flops(s, d, s) // 2  # Q K^T per head, causal half
                 + n * _matmul_flops(s, s, d) // 2  # P V per head, causal half
                 + _matmul_flops(s, n * d, h))  # linear_proj
    for layer in range(llm.num_layers):
        if llm.moe_layer_freq[layer]:  # top-2 routed + 1 shared expert of 32
            mlp = 3 * (_matmul_flops(s, h, 2 * 32) + _matmul_flops(s, 32, h))
        else:
            mlp = _matmul_flops(s, h, 2 * 96) + _matmul_flops(s, 96, h)
        got = llm_layer_flops(llm, layer, s)
        assert got == {"attention": 3 * attention, "mlp": 3 * mlp}
    # the whole-model formula is the per-layer sum plus the head
    total = sum(sum(llm_layer_flops(llm, i, s).values()) for i in range(llm.num_layers))
    assert model_flops(llm, s, s) == pytest.approx(total + llm_head_flops(llm, s))


def test_qwen3_8b_flops_equal_megatron_lms_gqa_formula() -> None:
    """Megatron-LM ``num_floating_point_operations`` (``megatron/training/training.py`` at
    d98e8a64, ``transformer_flops``, "MHA or GQA" branch, no output gate, dense SwiGLU, no MTP),
    transcribed for one batch of ``b`` sequences of ``s`` tokens."""
    b, s = 2, 8192
    h, n, g, d, ffn, layers, vocab = 4096, 32, 8, 128, 12288, 36, 151936
    q_size, kv_size = d * n, d * g
    self_attn = 3 * 2 * (h * (q_size + kv_size + kv_size) + q_size * h)
    core = 3 * 2 * q_size / 2 * 2
    mlp = 3 * 2 * h * (ffn * 3)  # dense layers, ffn_expansion_factor 3 (swiglu)
    megatron = b * s * layers * (self_attn + mlp) + b * s * s * layers * core \
        + b * s * 3 * 2 * h * vocab
    assert model_flops(qwen3_8b(), b * s, s) == pytest.approx(megatron, rel=1e-12)
    terms = llm_flops_breakdown_per_token(qwen3_8b(), s)
    assert terms["attn_kv"] == 6 * layers * h * 2 * g * d


def test_activation_terms_bound_what_a_local_gqa_layer_saves() -> None:
    """As ``test_memory.py`` does for MLA: the planner's per-token terms lie between 0.4x and 1x
    of what autograd saves in megatron's local GQA layer (it keeps norm outputs and the dense
    softmax the fused kernels do not)."""
    from megatron_vlm.models.llm import build_llm
    from megatron_vlm.parallel.init import ensure_single_process_groups
    from megatron_vlm.planning.activations import llm_layer_terms

    ensure_single_process_groups(seed=1234)
    llm = dataclasses.replace(CASES["moe"], hidden_size=128, num_attention_heads=8,
                              num_query_groups=2, kv_channels=32, ffn_hidden_size=384,
                              moe_ffn_hidden_size=96)
    model = build_llm(llm, ParallelConfig(), "fp32")
    seq = 128
    for layer in model.decoder.layers:
        storages: dict[int, int] = {}

        def pack(t, storages=storages):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        x = torch.randn(seq, 1, llm.hidden_size, requires_grad=True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            layer(hidden_states=x, attention_mask=None)
        measured = sum(storages.values()) / 4 / seq
        terms = llm_layer_terms(llm, layer.layer_number - 1, tp=1, etp=1, cp=1,
                                seq_length=seq, flash=False)
        predicted = sum(t.elements for t in terms)
        assert 0.4 * measured < predicted < measured, (layer.layer_number, predicted, measured)

