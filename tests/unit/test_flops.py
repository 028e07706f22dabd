"""Megatron-LM FLOPs formula vs an independent count of every GEMM of a small MLA/MoE model, a
known config by hand, and ViT FLOPs (Megatron-Bridge) by hand and against torch's FLOP counter."""

from __future__ import annotations

import pytest
import torch

from megatron_vlm.config.model import LLMConfig
from megatron_vlm.models.param_count import count_llm_params_closed_form
from megatron_vlm.recipes.kimi import kimi_k25_llm
from megatron_vlm.training.flops import (
    document_length_stats,
    llm_flops_breakdown_per_token,
    llm_flops_per_token,
    mfu,
    model_flops,
    packed_model_flops,
    vision_patch_stats,
    vit_flops,
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


# --------------------------------------------------------------------------- a known config by hand

# The K2-proxy of SPEC §8: hidden 2048, 16 heads, MLA with q_proj (no q_lora), kv_lora 512, head
# dims 128/64/128, layer 1 dense (FFN 11264) + 5 MoE layers of 64 experts (FFN 1408) top-6 + 2
# shared, vocab 32768, sequences of 4096.
K2_PROXY = LLMConfig(
    vocab_size=32768, hidden_size=2048, num_layers=6, num_attention_heads=16, q_lora_rank=None,
    kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
    ffn_hidden_size=11264, num_dense_layers=1, num_experts=64, moe_router_topk=6,
    num_shared_experts=2, moe_ffn_hidden_size=1408,
)


def test_k2_proxy_by_hand_from_megatron_formula() -> None:
    """Megatron-LM ``num_floating_point_operations`` (MLA branch, MTP off), term by term.

    Per token (3 passes x 2 FLOPs per MAC = 6 FLOPs per MAC):
      MLA q_term, q_lora None: h * n * (qk_head_dim + qk_pos_emb_head_dim)
          = 2048 * 16 * (128 + 64)                            =  6,291,456
      kv: kv_lora * (h + n * (qk_head_dim + v_head_dim) + 1) + h * qk_pos_emb_head_dim
          = 512 * (2048 + 16 * 256 + 1) + 2048 * 64 = 3,146,240 + 131,072 = 3,277,312
      o_proj: n * v_head_dim * h = 16 * 128 * 2048            =  4,194,304
      token-linear attention per layer: 6 * 13,763,072        = 82,578,432
      core attention per layer: 6 * (n * 192 / 2 + n * 128 / 2) * s
          = 6 * (1,536 + 1,024) * 4096 = 15,360 * 4096        = 62,914,560
      MLP: 6 * h * (ffn * 3 * dense + moe_ffn * topk * 3 * moe + shared_ffn * 3 * moe)
          = 12,288 * (11,264 * 3 + 1,408 * 6 * 3 * 5 + 2,816 * 3 * 5)
          = 12,288 * (33,792 + 126,720 + 42,240) = 12,288 * 202,752 = 2,491,416,576
      logits: 6 * h * padded_vocab = 6 * 2048 * 32768         =    402,653,184
      total = 6 * (82,578,432 + 62,914,560) + 2,491,416,576 + 402,653,184
            = 872,957,952 + 2,894,069,760                      = 3,767,027,712
    A step of 16 sequences (65,536 tokens): 3,767,027,712 * 65,536 = 246,875,928,133,632.
    """
    b = llm_flops_breakdown_per_token(K2_PROXY, seq_length=4096)
    assert b["attn_q"] == 6 * 6 * 6_291_456
    assert b["attn_kv"] == 6 * 6 * 3_277_312
    assert b["attn_out"] == 6 * 6 * 4_194_304
    assert b["attn_core"] == 6 * 62_914_560
    assert b["mlp_dense"] + b["mlp_routed"] + b["mlp_shared"] == 2_491_416_576
    assert b["logits"] == 402_653_184
    assert llm_flops_per_token(K2_PROXY, 4096) == 3_767_027_712
    assert model_flops(K2_PROXY, 16 * 4096, 4096) == 246_875_928_133_632


def test_packed_flops_megatron_thd_convention() -> None:
    """Megatron-LM's THD path: token-linear terms x real tokens, core attention x sum L_i^2.

    Two documents of 1000 and 3096 tokens (4096 real tokens, sum L^2 = 1,000,000 + 9,585,216
    = 10,585,216): token-linear per token = 3,767,027,712 - 6 * 62,914,560 = 3,389,540,352;
    core per L^2 = 6 layers * 15,360 = 92,160.
      3,389,540,352 * 4096 + 92,160 * 10,585,216 = 14,859,090,788,352.
    """
    assert document_length_stats([0, 1000, 4096]) == (4096, 10_585_216)
    assert packed_model_flops(K2_PROXY, 4096, 10_585_216) == 14_859_090_788_352
    # One document per sequence: the BSHD count.
    assert packed_model_flops(K2_PROXY, 4096, 4096**2) == model_flops(K2_PROXY, 4096, 4096)


def test_vit_flops_by_hand_from_bridge_formula() -> None:
    """Megatron-Bridge ``vit_flops_from_patch_stats`` for MoonViT (1152 wide, 27 layers, MLP
    4304) + Kimi projector to a 2048-wide LLM, on an image of 32x24 patches and a 4-frame video
    chunk of 16x12 (each its own attention sequence of 768 patches).

      patch_sum = 768 + 4*16*12 = 1,536;  patch_sq = 768^2 + 768^2 = 1,179,648
      merged tokens = 32*24/4 + 16*12/4 (frames pooled) = 192 + 48 = 240
      per layer: (8 h^2 + 4 h I) * patch_sum + 4 h * patch_sq
        = (10,616,832 + 19,832,832) * 1,536 + 4,608 * 1,179,648
        = 46,770,683,904 + 5,435,817,984 = 52,206,501,888;  x 27 = 1,409,575,550,976
      projector: 240 * (2 * 4608^2 + 2 * 4608 * 2048) = 240 * 61,341,696 = 14,722,007,040
      training = 3 * (1,409,575,550,976 + 14,722,007,040) = 4,272,892,674,048
    """
    from megatron_vlm.config.vision import moonvit_config

    grid = [[1, 32, 24], [4, 16, 12]]
    assert vision_patch_stats(grid) == (1536, 1_179_648, 240)
    assert vit_flops(moonvit_config(), 2048, grid) == 4_272_892_674_048
    with pytest.raises(ValueError, match="grid_thw"):
        vision_patch_stats([[0, 2, 2]])


def test_vit_forward_flops_equal_torch_flop_counter() -> None:
    """torch's FlopCounterMode (an outside count of every matmul/conv/SDPA) on a tiny MoonViT +
    projector forward equals the Bridge formula's forward share (1/3) plus the patch conv, which
    Bridge leaves out. The per-document SDPA kernel attends item by item, as the formula counts."""
    from megatron.core import parallel_state
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from megatron_vlm.config import KernelConfig, ParallelConfig, ProjectorConfig
    from megatron_vlm.models.projector import build_projector
    from megatron_vlm.models.vision.moonvit import build_moonvit
    from megatron_vlm.parallel.cpu_shims import apply_cpu_shims
    from megatron_vlm.parallel.init import init_distributed
    from megatron_vlm.recipes.tiny import tiny_moonvit

    if parallel_state.model_parallel_is_initialized():
        apply_cpu_shims()
    else:
        init_distributed(ParallelConfig(), seed=1234)
    vision = tiny_moonvit()
    out = 64
    vit = build_moonvit(vision, ParallelConfig(), kernels=KernelConfig(attention_kernel="sdpa_doc"))
    proj = build_projector(ProjectorConfig(vision_hidden_size=vision.hidden_size, merge_size=4,
                                           output_size=out), ParallelConfig())
    grid = torch.tensor([[1, 6, 4], [4, 2, 2], [3, 4, 6]])
    n = int(grid.prod(dim=1).sum())
    pixels = torch.randn(n, 3, 14, 14)
    # SDPA's math backend decomposes into bmm, which the counter sees (fused CPU SDPA it does not).
    with torch.no_grad(), FlopCounterMode(display=False) as counter, sdpa_kernel(SDPBackend.MATH):
        proj(vit(pixels, grid))
    conv = 2 * n * (3 * 14 * 14) * vision.hidden_size
    assert counter.get_total_flops() == vit_flops(vision, out, grid.tolist()) / 3 + conv
