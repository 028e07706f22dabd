"""Megatron-LM FLOPs formula vs an independent count of every GEMM of a small MLA/MoE model."""

from __future__ import annotations

import pytest

from megatron_vlm.config.model import LLMConfig
from megatron_vlm.models.param_count import count_llm_params_closed_form
from megatron_vlm.recipes.kimi import kimi_k25_llm
from megatron_vlm.training.flops import (
    llm_flops_breakdown_per_token,
    llm_flops_per_token,
    mfu,
    model_flops,
)


def gemm(m: int, k: int, n: int) -> int:
    """Forward FLOPs of ``[m, k] @ [k, n]``."""
    return 2 * m * k * n


# hidden 64, 4 heads, q_lora 48, kv_lora 32, head dims nope 16 / rope 8 / v 16, 3 layers
# (1 dense FFN 192, 2 MoE: 8 experts of FFN 48, top-2, 1 shared), vocab 1024 (a multiple of 128).
SMALL = LLMConfig(
    vocab_size=1024, hidden_size=64, num_layers=3, num_attention_heads=4, q_lora_rank=48,
    kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, ffn_hidden_size=192,
    num_dense_layers=1, num_experts=8, moe_router_topk=2, num_shared_experts=1,
    moe_ffn_hidden_size=48,
)


def _hand_count_training_flops(seq: int, causal: bool) -> tuple[int, int]:
    """One sequence of ``seq`` tokens through SMALL, GEMM by GEMM (shapes written out).

    Returns (training FLOPs as Megatron counts them, router GEMM FLOPs that Megatron leaves out).
    """
    t = seq  # tokens
    fwd = 0
    for _layer in range(3):
        fwd += gemm(t, 64, 48)  # q_down: hidden 64 -> q_lora 48
        fwd += 2 * t * 48  # q_a_layernorm: Megatron counts 1 MAC per element of the latent
        fwd += gemm(t, 48, 4 * (16 + 8))  # q_up: 48 -> 4 heads x (nope 16 + rope 8) = 96
        fwd += gemm(t, 64, 32 + 8)  # kv_down: 64 -> kv_lora 32 + shared rope key 8
        fwd += 2 * t * 32  # kv_a_layernorm, same convention
        fwd += gemm(t, 32, 4 * (16 + 16))  # kv_up: 32 -> 4 heads x (k_nope 16 + v 16) = 128
        # Core attention per head: scores [t, 24] @ [24, t], context [t, t] @ [t, 16].
        qk = 4 * gemm(t, 24, t)
        pv = 4 * gemm(t, t, 16)
        fwd += (qk + pv) // 2 if causal else qk + pv  # causal: the lower triangle only
        fwd += gemm(t, 4 * 16, 64)  # o_proj: 4 heads x v 16 -> hidden 64
    # Layer 0, dense SwiGLU: fc1 = [gate; up] 64 -> 2 x 192, fc2 192 -> 64.
    fwd += gemm(t, 64, 2 * 192) + gemm(t, 192, 64)
    router = 0
    for _layer in range(2):  # layers 1, 2: MoE
        router += gemm(t, 64, 8)  # gate logits over 8 experts
        # Top-2: 2t token-expert rows through expert fc1 64 -> 2 x 48 and fc2 48 -> 64.
        fwd += gemm(2 * t, 64, 2 * 48) + gemm(2 * t, 48, 64)
        # Shared expert (1 x 48): every token.
        fwd += gemm(t, 64, 2 * 48) + gemm(t, 48, 64)
    fwd += gemm(t, 64, 1024)  # logits
    # Backward: a data-gradient and a weight-gradient GEMM of the same size per forward GEMM.
    return 3 * fwd, 3 * router


@pytest.mark.parametrize("causal", [True, False])
def test_formula_matches_gemm_count(causal: bool) -> None:
    seq = 256
    expected, router = _hand_count_training_flops(seq, causal)
    got = model_flops(SMALL, num_tokens=seq, seq_length=seq, causal=causal)
    assert got == pytest.approx(expected, rel=1e-12)
    # The router GEMM is what Megatron's convention omits; it is small next to the total.
    assert router / expected < 0.01
    # Per-token and per-step forms agree; a batch of 4 sequences costs 4x.
    assert llm_flops_per_token(SMALL, seq, causal) * seq == pytest.approx(got)
    assert model_flops(SMALL, 4 * seq, seq, causal) == pytest.approx(4 * expected)


def test_breakdown_terms() -> None:
    b = llm_flops_breakdown_per_token(SMALL, seq_length=256)
    assert b["logits"] == 6 * 64 * 1024
    assert b["mlp_dense"] == 6 * 3 * 64 * 192
    assert b["mlp_routed"] == 6 * 2 * 2 * 3 * 64 * 48  # 2 layers x top-2 x SwiGLU
    assert b["mlp_shared"] == 6 * 2 * 3 * 64 * 48
    assert b["attn_core"] == 6 * 3 * 4 * (24 + 16) * 256 / 2
    # q_proj variant (no q_lora): hidden x heads x (nope + rope).
    full_q = LLMConfig(**{**SMALL.__dict__, "q_lora_rank": None})
    assert llm_flops_breakdown_per_token(full_q, 256)["attn_q"] == 6 * 3 * 64 * 4 * 24
    dense = LLMConfig(**{**SMALL.__dict__, "num_experts": None})
    bd = llm_flops_breakdown_per_token(dense, 256)
    assert bd["mlp_routed"] == bd["mlp_shared"] == 0
    assert bd["mlp_dense"] == 6 * 3 * 3 * 64 * 192
    # A vocab of 1000 is padded to 1024 like the model's output layer.
    v1000 = LLMConfig(**{**SMALL.__dict__, "vocab_size": 1000})
    assert llm_flops_breakdown_per_token(v1000, 256)["logits"] == b["logits"]


def test_kimi_k25_matches_six_times_activated_matmul_params() -> None:
    """Outside core attention, training FLOPs per token are 6 x the matmul parameters a token
    uses (the classic 6N): activated params minus the input embedding (a lookup), the router
    (omitted by Megatron) and the per-layer/final RMSNorms (the MLA latent norms stay: Megatron
    counts them as one MAC per element)."""
    llm = kimi_k25_llm()
    params = count_llm_params_closed_form(llm)
    matmul = params["activated"] - params["embedding"] - params["router"] - params["layer_norms"]
    b = llm_flops_breakdown_per_token(llm, seq_length=4096)
    assert sum(b.values()) - b["attn_core"] == 6 * matmul
    # Published scale: ~32B activated -> ~200 GFLOPs per token at 4K context.
    assert 1.9e11 < llm_flops_per_token(llm, 4096) < 2.2e11


def test_mfu() -> None:
    assert mfu(395.6, 989.0) == pytest.approx(0.4)
    with pytest.raises(ValueError, match="peak_tflops"):
        mfu(1.0, 0.0)
