"""Our LLMConfig -> megatron's MLATransformerConfig: every family-critical field is set from our
config (SPEC §2 numbers written out here), never left at megatron's defaults."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from megatron.core.transformer.transformer_config import MLATransformerConfig

from megatron_vlm.config import ParallelConfig, YarnConfig
from megatron_vlm.models.llm import build_transformer_config, padded_vocab_size
from megatron_vlm.recipes.kimi import kimi_k25_llm, moonlight_llm


def test_kimi_k25_fields():
    c = build_transformer_config(kimi_k25_llm(), ParallelConfig(), "bf16")
    assert (c.hidden_size, c.num_layers, c.num_attention_heads) == (7168, 61, 64)
    assert (c.q_lora_rank, c.kv_lora_rank) == (1536, 512)
    assert (c.qk_head_dim, c.qk_pos_emb_head_dim, c.v_head_dim) == (128, 64, 128)
    assert (c.num_moe_experts, c.moe_router_topk, c.moe_ffn_hidden_size) == (384, 8, 2048)
    assert c.moe_shared_expert_intermediate_size == 2048 * 1
    assert c.ffn_hidden_size == 18432
    assert c.moe_layer_freq == [0] + [1] * 60
    assert c.moe_router_score_function == "sigmoid" and c.moe_router_enable_expert_bias
    assert c.moe_router_topk_scaling_factor == 2.827 and c.moe_router_bias_update_rate == 1e-3
    assert c.moe_router_load_balancing_type == "none" and c.moe_expert_capacity_factor is None
    # YaRN: factor 64 from 4096, beta 32/1, mscale = mscale_all_dim = 1 -- not megatron's
    # MLATransformerConfig defaults (rotary_scaling_factor=40, mscale_all_dim=0.0).
    assert c.rope_type == "yarn" and c.rotary_base == 50000.0
    assert (c.rotary_scaling_factor, c.original_max_position_embeddings) == (64.0, 4096)
    assert (c.beta_fast, c.beta_slow, c.mscale, c.mscale_all_dim) == (32.0, 1.0, 1.0, 1.0)
    defaults = {f.name: f.default for f in dataclasses.fields(MLATransformerConfig)}
    assert defaults["rotary_scaling_factor"] != c.rotary_scaling_factor
    assert c.normalization == "RMSNorm" and c.gated_linear_unit and not c.add_bias_linear
    assert c.params_dtype == torch.bfloat16 and c.bf16 and c.calculate_per_token_loss
    assert padded_vocab_size(163840, 8) == 163840


def test_moonlight_q_proj_and_plain_rope():
    c = build_transformer_config(moonlight_llm(), ParallelConfig(), "fp32")
    assert c.q_lora_rank is None and c.rope_type == "rope" and c.rotary_base == 800000.0
    assert (c.num_moe_experts, c.moe_router_topk) == (64, 6)
    assert c.moe_shared_expert_intermediate_size == 1408 * 2
    assert c.moe_router_topk_scaling_factor == 2.446


@pytest.mark.parametrize("mscale, mscale_all_dim", [(0.707, 0.0), (1.0, 1.0)])
def test_yarn_mscale_passes_through(mscale, mscale_all_dim):
    llm = dataclasses.replace(kimi_k25_llm(), yarn=YarnConfig(
        factor=40.0, original_max_position_embeddings=4096, beta_fast=32.0, beta_slow=1.0,
        mscale=mscale, mscale_all_dim=mscale_all_dim))
    c = build_transformer_config(llm, ParallelConfig(), "fp32")
    assert (c.mscale, c.mscale_all_dim, c.rotary_scaling_factor) == (mscale, mscale_all_dim, 40.0)
