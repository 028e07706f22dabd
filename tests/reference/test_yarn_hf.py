"""YaRN: our MLA (megatron-core through ``build_llm``) against transformers' DeepSeek-V3.

Three independent things must agree (SPEC §2, YaRN):

1. the published formula, written out below from the SPEC (inverse frequencies with the
   ramp between ``beta_fast`` and ``beta_slow``, cos/sin times ``mscale(s, m) / mscale(s, m')``,
   softmax scale ``qk_head_dim^-0.5 * mscale(s, m')^2``);
2. transformers 5.23 ``DeepseekV3Attention`` / ``DeepseekV3ForCausalLM`` with copied weights;
3. megatron-core 0.16.1 ``MLASelfAttention`` built from our ``LLMConfig``.

Weight layout: megatron's MLA de-interleaves the rope channels itself
(``rope_utils._apply_rotary_pos_emb_bshd``: ``x[0::2]``, ``x[1::2]``), which is exactly HF's
``rope_interleave=True`` (the ``DeepseekV3Config`` default). With ``rope_interleave=False`` HF
pairs channel ``j`` with ``j + d_r/2``, so the rope rows of ``q_b_proj``/``q_proj`` (per head) and
of ``kv_a_proj_with_mqa`` are permuted: HF row ``j`` = megatron row ``2j``, HF row ``d_r/2 + j`` =
megatron row ``2j + 1``. Norms sit where HF puts them: ``q_layernorm`` = ``q_a_layernorm`` on the
q latent, ``kv_layernorm`` = ``kv_a_layernorm`` on the kv latent only (not the rope key).
``linear_kv_up_proj`` is ``kv_b_proj`` unchanged: per head ``[k_nope; v]`` rows.

Edge case (SPEC): ``mscale_all_dim = 0`` with ``mscale != 1``. megatron computes the formula
literally (``mscale(s, 0) = 1``, so cos/sin get ``mscale(s, m)`` and the softmax scale no
factor), as did DeepSeek's own remote code; transformers 5.23 treats a falsy ``mscale`` or
``mscale_all_dim`` as absent and then uses ``mscale(s, 1)`` for cos/sin, ignoring ``mscale``.
Outputs differ; ``test_mscale_all_dim_zero`` pins both behaviours and the HF config that
reproduces ours (``attention_factor`` given explicitly).
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

pytest.importorskip("transformers")
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM
from transformers.models.deepseek_v3.modeling_deepseek_v3 import (
    DeepseekV3Attention,
    DeepseekV3RotaryEmbedding,
)

from megatron_vlm.config import LLMConfig, ParallelConfig, YarnConfig

ATOL = 1e-5  # fp32, outputs O(1-5): summation-order differences only (measured ~2e-6)
HEADS, NOPE, ROPE, V, KV_LORA, HIDDEN = 4, 16, 16, 16, 32, 64
L0 = 32  # original context: short, so the YaRN ramp falls inside d_r/2 = 8 rope frequencies


# --------------------------------------------------------------------------- the formula


def mscale(s: float, m: float) -> float:
    return 1.0 if s <= 1 else 0.1 * m * math.log(s) + 1.0


def yarn_inv_freq(d_r: int, base: float, s: float, l0: int, beta_fast: float,
                  beta_slow: float) -> torch.Tensor:
    """SPEC §2 written out, in float64."""
    def corr_dim(r: float) -> float:
        return d_r * math.log(l0 / (2 * math.pi * r)) / (2 * math.log(base))

    low = max(math.floor(corr_dim(beta_fast)), 0)
    high = min(math.ceil(corr_dim(beta_slow)), d_r - 1)
    if low == high:
        high += 0.001
    i = torch.arange(d_r // 2, dtype=torch.float64)
    ramp = ((i - low) / (high - low)).clamp(0, 1)
    w = 1 - ramp  # extrapolation weight: 1 = keep the original frequency
    inv = base ** (-2 * i / d_r)
    return (inv / s) * (1 - w) + inv * w


# --------------------------------------------------------------------------- builders


def our_llm(yarn: YarnConfig, q_lora: int | None, max_pos: int) -> LLMConfig:
    return LLMConfig(
        vocab_size=128, hidden_size=HIDDEN, num_layers=1, num_attention_heads=HEADS,
        q_lora_rank=q_lora, kv_lora_rank=KV_LORA, qk_nope_head_dim=NOPE, qk_rope_head_dim=ROPE,
        v_head_dim=V, ffn_hidden_size=96, num_dense_layers=1, num_experts=None,
        rope_theta=10000.0, yarn=yarn, max_position_embeddings=max_pos,
        init_method_std=0.2,  # sharp attention: position and scale errors show in the output
    )


def build_ours(llm: LLMConfig):
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from megatron_vlm.models.llm import build_llm

    torch.manual_seed(0)
    model_parallel_cuda_manual_seed(0)
    model = build_llm(llm, ParallelConfig()).eval()
    with torch.no_grad():  # norms away from 1, so a misplaced norm shows
        for _name, p in model.named_parameters():
            if p.ndim == 1:
                p.uniform_(0.5, 1.5)
    return model


def hf_config(llm: LLMConfig, interleave: bool, **rope_extra) -> DeepseekV3Config:
    y = llm.yarn
    rope = dict(rope_type="yarn", rope_theta=llm.rope_theta, factor=y.factor,
                original_max_position_embeddings=y.original_max_position_embeddings,
                beta_fast=y.beta_fast, beta_slow=y.beta_slow, mscale=y.mscale,
                mscale_all_dim=y.mscale_all_dim, **rope_extra)
    cfg = DeepseekV3Config(
        vocab_size=llm.vocab_size, hidden_size=HIDDEN, intermediate_size=llm.ffn_hidden_size,
        num_hidden_layers=1, num_attention_heads=HEADS, num_key_value_heads=HEADS,
        q_lora_rank=llm.q_lora_rank, kv_lora_rank=KV_LORA, qk_nope_head_dim=NOPE,
        qk_rope_head_dim=ROPE, v_head_dim=V, first_k_dense_replace=1,
        max_position_embeddings=llm.max_position_embeddings, rope_interleave=interleave,
        attention_bias=False, rms_norm_eps=llm.norm_epsilon, tie_word_embeddings=False,
        rope_parameters=rope,
    )
    cfg._attn_implementation = "eager"
    return cfg


def rope_row_order(interleave: bool) -> torch.Tensor:
    """Megatron row index of each HF rope row."""
    if interleave:
        return torch.arange(ROPE)
    return torch.cat([torch.arange(0, ROPE, 2), torch.arange(1, ROPE, 2)])


@torch.no_grad()
def copy_attention(ours, hf: DeepseekV3Attention, interleave: bool) -> None:
    p = dict(ours.named_parameters())
    order = rope_row_order(interleave)

    def q_rows(w: torch.Tensor) -> torch.Tensor:
        w = w.view(HEADS, NOPE + ROPE, -1).clone()
        w[:, NOPE:] = w[:, NOPE:][:, order]
        return w.view(HEADS * (NOPE + ROPE), -1)

    if hf.q_lora_rank is not None:
        hf.q_a_proj.weight.copy_(p["linear_q_down_proj.weight"])
        hf.q_a_layernorm.weight.copy_(p["q_layernorm.weight"])
        hf.q_b_proj.weight.copy_(q_rows(p["linear_q_up_proj.weight"]))
    else:
        hf.q_proj.weight.copy_(q_rows(p["linear_q_proj.weight"]))
    kv_a = p["linear_kv_down_proj.weight"].clone()
    kv_a[KV_LORA:] = kv_a[KV_LORA:][order]
    hf.kv_a_proj_with_mqa.weight.copy_(kv_a)
    hf.kv_a_layernorm.weight.copy_(p["kv_layernorm.weight"])
    hf.kv_b_proj.weight.copy_(p["linear_kv_up_proj.weight"])
    hf.o_proj.weight.copy_(p["linear_proj.weight"])


def run_both_attentions(llm: LLMConfig, interleave: bool, seq: int, **rope_extra):
    """(ours [b, s, h], HF [b, s, h], our MLA module, HF attention, HF rotary)."""
    model = build_ours(llm)
    ours = model.decoder.layers[0].self_attention
    cfg = hf_config(llm, interleave, **rope_extra)
    hf = DeepseekV3Attention(cfg, layer_idx=0).eval()
    rotary = DeepseekV3RotaryEmbedding(cfg)
    copy_attention(ours, hf, interleave)
    x_sbh = torch.randn(seq, 2, HIDDEN, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out_ours, _ = ours(x_sbh, None)
        x = x_sbh.transpose(0, 1)
        cos, sin = rotary(x, torch.arange(seq)[None].expand(2, -1))
        causal = torch.full((seq, seq), float("-inf")).triu(1)[None, None]
        out_hf, _ = hf(x, (cos, sin), causal)
    return out_ours.transpose(0, 1), out_hf, ours, hf, rotary


# (factor, beta_fast, beta_slow, mscale, mscale_all_dim): K2.5-like, K2-0905 betas 1/1,
# DeepSeek-V2's 0.707/0.707, unequal m/m', and m = 1 with m' = 0 (HF and megatron agree there).
CASES = [
    (4.0, 32.0, 1.0, 1.0, 1.0),
    (40.0, 1.0, 1.0, 1.0, 1.0),
    (40.0, 32.0, 1.0, 0.707, 0.707),
    (8.0, 32.0, 1.0, 1.0, 0.707),
    (8.0, 32.0, 1.0, 1.0, 0.0),
]
CASE_IDS = ["s4-b32/1", "s40-b1/1", "s40-m.707/.707", "s8-m1/.707", "s8-m1/0"]


def yarn_of(case) -> YarnConfig:
    s, bf, bs, m, mad = case
    return YarnConfig(factor=s, original_max_position_embeddings=L0, beta_fast=bf, beta_slow=bs,
                      mscale=m, mscale_all_dim=mad)


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_rope_tables_equal_formula_and_hf(megatron_groups, case):
    """Frequencies and cos/sin scale, at positions up to the extended length."""
    yarn = yarn_of(case)
    s, _, _, m, mad = case
    llm = our_llm(yarn, q_lora=24, max_pos=int(L0 * s))
    ours = build_ours(llm).decoder.layers[0].self_attention
    rotary = DeepseekV3RotaryEmbedding(hf_config(llm, interleave=True))

    expected = yarn_inv_freq(ROPE, llm.rope_theta, s, L0, yarn.beta_fast, yarn.beta_slow)
    torch.testing.assert_close(rotary.inv_freq.double(), expected, rtol=1e-6, atol=0)
    # The ramp is exercised: some frequencies interpolated, some kept (or a 1/1 step).
    assert (expected < yarn_inv_freq(ROPE, llm.rope_theta, 1.0, L0, 32, 1) - 1e-9).any()

    n = int(L0 * s)
    emb, cos_sin_scale = ours.rotary_pos_emb(n)  # [n, 1, 1, d_r] angles, megatron's mscale
    angles = torch.arange(n, dtype=torch.float64)[:, None] * expected[None]
    torch.testing.assert_close(emb[:, 0, 0, : ROPE // 2].double(), angles, rtol=1e-5, atol=1e-4)
    assert cos_sin_scale == pytest.approx(mscale(s, m) / mscale(s, mad), rel=1e-12)
    assert rotary.attention_scaling == pytest.approx(cos_sin_scale, rel=1e-12)
    softmax = (NOPE + ROPE) ** -0.5 * mscale(s, mad) ** 2
    assert ours.softmax_scale == pytest.approx(softmax, rel=1e-12)


@pytest.mark.parametrize("interleave", [True, False], ids=["hf-interleave", "hf-halves"])
@pytest.mark.parametrize("q_lora", [24, None], ids=["q_lora", "q_proj"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_mla_attention_equals_hf(megatron_groups, case, q_lora, interleave):
    s = case[0]
    llm = our_llm(yarn_of(case), q_lora, max_pos=int(L0 * s))
    seq = 3 * L0  # beyond the original context
    ours, hf, our_attn, hf_attn, _ = run_both_attentions(llm, interleave, seq)
    assert our_attn.softmax_scale == pytest.approx(hf_attn.scaling, rel=1e-12)
    torch.testing.assert_close(ours, hf, atol=ATOL, rtol=0)
    assert hf.abs().max() > 1.0  # the tolerance is small against the output


def test_comparison_can_fail(megatron_groups):
    """Controls: a 1% change of the YaRN factor, or plain RoPE, moves the output far past ATOL."""
    llm = our_llm(yarn_of(CASES[0]), 24, max_pos=4 * L0)
    ours, _, _, _, _ = run_both_attentions(llm, True, 3 * L0)
    for other in (dataclasses.replace(llm.yarn, factor=4.04), YarnConfig(factor=1.0)):
        _, hf, _, _, _ = run_both_attentions(dataclasses.replace(llm, yarn=other), True, 3 * L0)
        assert (ours - hf).abs().max() > 100 * ATOL


def test_mscale_all_dim_zero(megatron_groups):
    """mscale = 0.707, mscale_all_dim = 0: megatron follows the formula, HF drops mscale.

    * ours (megatron): cos/sin x mscale(s, 0.707) / mscale(s, 0) = mscale(s, 0.707); softmax
      scale x mscale(s, 0)^2 = 1 -- the published formula (SPEC §2) and DeepSeek's remote code.
    * HF 5.23: ``if mscale and mscale_all_dim`` fails, so cos/sin x mscale(s, 1); softmax
      ``if mscale_all_dim`` fails, so x 1. Different output.
    * HF given ``attention_factor = mscale(s, 0.707)`` reproduces ours: that is what an HF export
      of such a config must write.
    """
    s = 8.0
    yarn = YarnConfig(factor=s, original_max_position_embeddings=L0, mscale=0.707,
                      mscale_all_dim=0.0)
    llm = our_llm(yarn, 24, max_pos=int(L0 * s))
    ours, hf, our_attn, hf_attn, rotary = run_both_attentions(llm, True, 3 * L0)

    _, cos_sin_scale = our_attn.rotary_pos_emb(8)
    assert cos_sin_scale == pytest.approx(mscale(s, 0.707), rel=1e-12)
    assert rotary.attention_scaling == pytest.approx(mscale(s, 1.0), rel=1e-12)
    assert our_attn.softmax_scale == pytest.approx((NOPE + ROPE) ** -0.5, rel=1e-12)
    assert hf_attn.scaling == pytest.approx((NOPE + ROPE) ** -0.5, rel=1e-12)
    assert (ours - hf).abs().max() > 100 * ATOL  # they really differ

    _, hf_fixed, _, _, rotary_fixed = run_both_attentions(
        llm, True, 3 * L0, attention_factor=mscale(s, 0.707))
    assert rotary_fixed.attention_scaling == pytest.approx(mscale(s, 0.707), rel=1e-12)
    torch.testing.assert_close(ours, hf_fixed, atol=ATOL, rtol=0)


@torch.no_grad()
def copy_causal_lm(model, hf: DeepseekV3ForCausalLM, interleave: bool) -> None:
    """Our 1-layer dense GPTModel -> HF DeepseekV3ForCausalLM."""
    p = dict(model.named_parameters())
    layer = hf.model.layers[0]
    hf.model.embed_tokens.weight.copy_(p["embedding.word_embeddings.weight"])
    layer.input_layernorm.weight.copy_(p["decoder.layers.0.input_layernorm.weight"])
    copy_attention(model.decoder.layers[0].self_attention, layer.self_attn, interleave)
    layer.post_attention_layernorm.weight.copy_(p["decoder.layers.0.pre_mlp_layernorm.weight"])
    gate, up = p["decoder.layers.0.mlp.linear_fc1.weight"].chunk(2, dim=0)  # megatron: [gate; up]
    layer.mlp.gate_proj.weight.copy_(gate)
    layer.mlp.up_proj.weight.copy_(up)
    layer.mlp.down_proj.weight.copy_(p["decoder.layers.0.mlp.linear_fc2.weight"])
    hf.model.norm.weight.copy_(p["decoder.final_layernorm.weight"])
    hf.lm_head.weight.copy_(p["output_layer.weight"])


@pytest.mark.parametrize("q_lora", [24, None], ids=["q_lora", "q_proj"])
def test_causal_lm_logits_equal_hf(megatron_groups, q_lora):
    case = CASES[2]  # factor 40, mscale = mscale_all_dim = 0.707
    llm = our_llm(yarn_of(case), q_lora, max_pos=int(L0 * case[0]))
    model = build_ours(llm)
    hf = DeepseekV3ForCausalLM(hf_config(llm, interleave=True)).eval()
    copy_causal_lm(model, hf, interleave=True)
    ids = torch.randint(0, 128, (2, 3 * L0), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = model(ids, None, None)
        theirs = hf(input_ids=ids).logits
    assert ours.shape == theirs.shape == (2, 3 * L0, 128)
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)


def test_extend_64_to_256_loads_and_runs(megatron_groups):
    """A tiny model trained a few steps at 64 tokens with plain RoPE, then rebuilt with YaRN
    (factor 4 from 64) loads its weights unchanged (no RoPE state is a parameter or a persistent
    buffer) and runs at 256 tokens."""
    from megatron_vlm.recipes.tiny import tiny_llm

    base = dataclasses.replace(tiny_llm(vocab_size=128), max_position_embeddings=64)
    torch.manual_seed(0)
    model = build_ours(base).train()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    g = torch.Generator().manual_seed(3)
    for _ in range(2):
        ids = torch.randint(0, 128, (2, 64), generator=g)
        logits = model(ids, None, None)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 128),
                                                 ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    # megatron's local linears keep a None ``_extra_state`` entry (TE/FP8 state) in the dict.
    trained = {k: v.detach().clone() if torch.is_tensor(v) else v
               for k, v in model.state_dict().items()}

    yarn = YarnConfig(factor=4.0, original_max_position_embeddings=64, beta_fast=32.0,
                      beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0)
    long = build_ours(dataclasses.replace(base, yarn=yarn, max_position_embeddings=256))
    assert set(long.state_dict()) == set(trained)
    long.load_state_dict(trained, strict=True)
    for k, v in long.state_dict().items():
        assert (torch.equal(v, trained[k]) if torch.is_tensor(v) else v is trained[k] is None), k
    ids = torch.randint(0, 128, (1, 256), generator=g)
    with torch.no_grad():
        out = long.eval()(ids, None, None)
    assert out.shape == (1, 256, 128)
    assert torch.isfinite(out).all()
    assert long.decoder.layers[0].self_attention.rotary_pos_emb.scaling_factor == 4.0
