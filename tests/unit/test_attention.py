"""PackedSelfAttention against a plain softmax attention written here, and through megatron's MLA.

The reference is the textbook formula, per document, in float64:
``softmax(q k^T * scale + mask) v``.
Padding slots are filled with huge values so that a mask that lets any of them through shows up
as a large error, and the recorded max logits are checked against the max over legal entries only,
with planted huge logits on forbidden entries (padding, future, other document).
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_vlm.models.attention import PackedSelfAttention

ATOL = 2e-6  # fp32 SDPA vs the float64 reference; outputs are O(1)


# --------------------------------------------------------------------------- reference


def reference_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, causal: bool
) -> torch.Tensor:
    """One sequence: ``q, k [L, h, dk]``, ``v [L, h, dv]`` -> ``[L, h, dv]`` (float64)."""
    logits = reference_logits(q, k, scale)
    allowed = reference_allowed(q.shape[0], causal)
    weights = torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1)
    return torch.einsum("hqk,khd->qhd", weights, v.double())


def reference_logits(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """``[h, Lq, Lk]`` scaled logits in float64."""
    return torch.einsum("qhd,khd->hqk", q.double(), k.double()) * scale


def reference_allowed(n: int, causal: bool, key_ok: torch.Tensor | None = None) -> torch.Tensor:
    """``[n, n]`` True where query i may attend key j."""
    allowed = torch.ones(n, n, dtype=torch.bool)
    if causal:
        for i in range(n):
            allowed[i, i + 1 :] = False
    if key_ok is not None:
        allowed &= key_ok[None, :]
    return allowed


def reference_max_logits(q, k, scale, causal, spans, key_ok=None) -> torch.Tensor:
    """Per-head max of legal scaled logits over documents ``spans = [(start, real_len)]``."""
    best = torch.full((q.shape[1],), float("-inf"), dtype=torch.float64)
    for start, n in spans:
        sl = slice(start, start + n)
        logits = reference_logits(q[sl], k[sl], scale)
        ok = reference_allowed(n, causal, None if key_ok is None else key_ok[sl])
        best = torch.maximum(best, logits.masked_fill(~ok, float("-inf")).amax(dim=(1, 2)))
    return best


# --------------------------------------------------------------------------- helpers


def make_attention(
    num_heads: int, dk: int, dv: int, mask_type: AttnMaskType, softmax_scale: float | None = None,
    record: bool = False, qk_clip: bool = False,
) -> PackedSelfAttention:
    config = TransformerConfig(
        num_layers=1, hidden_size=num_heads * dv, num_attention_heads=num_heads, kv_channels=dv,
        attention_dropout=0.0, log_max_attention_logit=record, qk_clip=qk_clip,
    )
    return PackedSelfAttention(
        config, layer_number=1, attn_mask_type=mask_type, softmax_scale=softmax_scale,
        k_channels=dk, v_channels=dv,
    )


def thd_params(real: list[int], padded: list[int] | None = None) -> PackedSeqParams:
    cu = torch.tensor([0, *torch.tensor(real).cumsum(0).tolist()], dtype=torch.int32)
    cu_pad = None
    if padded is not None:
        cu_pad = torch.tensor([0, *torch.tensor(padded).cumsum(0).tolist()], dtype=torch.int32)
    longest = max(padded if padded is not None else real)
    return PackedSeqParams(
        qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu, cu_seqlens_q_padded=cu_pad,
        cu_seqlens_kv_padded=cu_pad, max_seqlen_q=longest, max_seqlen_kv=longest,
    )


def packed_layout(real: list[int], padded: list[int], tail: int):
    """Document starts and a [t] bool of real tokens for real lengths inside padded spans."""
    starts = [0, *torch.tensor(padded).cumsum(0).tolist()[:-1]]
    total = sum(padded) + tail
    is_real = torch.zeros(total, dtype=torch.bool)
    for s, n in zip(starts, real):
        is_real[s : s + n] = True
    return starts, is_real


# --------------------------------------------------------------------------- THD


@pytest.mark.parametrize("dk,dv", [(8, 8), (12, 8)], ids=["dk8-dv8", "dk12-dv8"])
@pytest.mark.parametrize("mask_type", [AttnMaskType.causal, AttnMaskType.no_mask],
                         ids=["causal", "bidirectional"])
@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "padded+tail"])
def test_thd_packed_equals_each_document_alone(dk, dv, mask_type, padded):
    torch.manual_seed(0)
    heads, real = 3, [5, 1, 9]
    spans, tail = ([8, 4, 12], 3) if padded else (real, 0)
    starts, is_real = packed_layout(real, spans, tail)
    t = len(is_real)
    q, k = torch.randn(t, heads, dk), torch.randn(t, heads, dk)
    v = torch.randn(t, heads, dv)
    # Padding slots hold huge garbage: any leak into a real token is a large error.
    for x in (q, k, v):
        x[~is_real] = 1e4 * torch.randn_like(x[~is_real])
    attn = make_attention(heads, dk, dv, mask_type)
    out = attn(q, k, v, None, packed_seq_params=thd_params(real, spans if padded else None))

    assert out.shape == (t, heads, dv)
    assert torch.isfinite(out).all()  # padding rows too: their output must not poison later layers
    causal = mask_type == AttnMaskType.causal
    scale = 1.0 / math.sqrt(dk)
    for s, n in zip(starts, real):
        sl = slice(s, s + n)
        ref = reference_attention(q[sl], k[sl], v[sl], scale, causal)
        torch.testing.assert_close(out[sl].double(), ref, atol=ATOL, rtol=0)


def test_thd_explicit_scale_and_4d_input():
    """megatron's non-MLA attention hands THD as ``[t, 1, np, hn]``; MLA passes its own scale."""
    torch.manual_seed(1)
    heads, dk, dv, real = 2, 12, 8, [4, 7]
    t = sum(real)
    q, k = torch.randn(t, 1, heads, dk), torch.randn(t, 1, heads, dk)
    v = torch.randn(t, 1, heads, dv)
    attn = make_attention(heads, dk, dv, AttnMaskType.padding_causal, softmax_scale=0.37)
    out = attn(q, k, v, None, packed_seq_params=thd_params(real))
    assert out.shape == (t, 1, heads * dv)
    out = out.view(t, heads, dv)
    for s, n in zip([0, 4], real):
        sl = slice(s, s + n)
        ref = reference_attention(q[sl, 0], k[sl, 0], v[sl, 0], 0.37, causal=True)
        torch.testing.assert_close(out[sl].double(), ref, atol=ATOL, rtol=0)


def test_call_time_mask_type_overrides_constructor():
    torch.manual_seed(2)
    heads, dk, dv, real = 2, 8, 8, [6]
    q, k, v = torch.randn(6, heads, dk), torch.randn(6, heads, dk), torch.randn(6, heads, dv)
    attn = make_attention(heads, dk, dv, AttnMaskType.causal)
    out = attn(q, k, v, None, attn_mask_type=AttnMaskType.no_mask,
               packed_seq_params=thd_params(real))
    ref = reference_attention(q, k, v, 1 / math.sqrt(dk), causal=False)
    torch.testing.assert_close(out.double(), ref, atol=ATOL, rtol=0)


# --------------------------------------------------------------------------- sbhd


@pytest.mark.parametrize("mask_type", [AttnMaskType.causal, AttnMaskType.no_mask],
                         ids=["causal", "bidirectional"])
def test_sbhd_equals_reference(mask_type):
    torch.manual_seed(3)
    s, b, heads, dk, dv = 7, 2, 3, 12, 8
    q, k = torch.randn(s, b, heads, dk), torch.randn(s, b, heads, dk)
    v = torch.randn(s, b, heads, dv)
    attn = make_attention(heads, dk, dv, mask_type)
    out = attn(q, k, v, None)
    assert out.shape == (s, b, heads * dv)
    out = out.view(s, b, heads, dv)
    causal = mask_type == AttnMaskType.causal
    for i in range(b):
        ref = reference_attention(q[:, i], k[:, i], v[:, i], 1 / math.sqrt(dk), causal)
        torch.testing.assert_close(out[:, i].double(), ref, atol=ATOL, rtol=0)


def test_sbhd_padding_attention_mask():
    """megatron's ``attention_mask`` is True where attention is forbidden (``[b, 1, s, s]``)."""
    torch.manual_seed(4)
    s, b, heads, dk, dv = 6, 2, 2, 12, 8
    q, k = torch.randn(s, b, heads, dk), torch.randn(s, b, heads, dk)
    v = torch.randn(s, b, heads, dv)
    key_ok = torch.ones(b, s, dtype=torch.bool)
    key_ok[1, 4:] = False  # sequence 1 ends with 2 padding tokens
    for x in (k, v):
        x[4:, 1] = 1e4 * torch.randn_like(x[4:, 1])
    forbidden = ~(key_ok[:, None, None, :] & key_ok[:, None, :, None])  # padding rows too
    attn = make_attention(heads, dk, dv, AttnMaskType.causal)
    out = attn(q, k, v, forbidden).view(s, b, heads, dv)
    assert torch.isfinite(out).all()
    for i in range(b):
        n = int(key_ok[i].sum())
        ref = reference_attention(q[:n, i], k[:n, i], v[:n, i], 1 / math.sqrt(dk), causal=True)
        torch.testing.assert_close(out[:n, i].double(), ref, atol=ATOL, rtol=0)


# --------------------------------------------------------------------------- max logits


def _planted_thd_inputs(seed: int):
    """Two padded documents plus tail padding, with huge logits planted on forbidden entries.

    Layout (t = 16): doc 0 real [0, 4) padded to 6, doc 1 real [6, 12) padded to 8, tail [14, 16).
    Channel 0 carries a future-key trap inside doc 1 (query 6 -> key 11); channel 1 a
    cross-document trap (query 8 in doc 1 -> key 2 in doc 0, in the past, so causality alone
    would allow it); padding queries and keys are 1e3.
    """
    g = torch.Generator().manual_seed(seed)
    heads, dk, dv = 2, 12, 8
    real, spans, tail = [4, 6], [6, 8], 2
    starts, is_real = packed_layout(real, spans, tail)
    t = len(is_real)
    q = torch.randn(t, heads, dk, generator=g)
    k = torch.randn(t, heads, dk, generator=g)
    v = torch.randn(t, heads, dv, generator=g)
    q[:, :, :2] = 0.0
    k[:, :, :2] = 0.0
    q[6, :, 0], k[11, :, 0] = 30.0, 30.0  # future trap (legal when bidirectional)
    q[8, :, 1], k[2, :, 1] = 30.0, 30.0  # cross-document trap
    q[~is_real], k[~is_real] = 1e3, 1e3  # padding traps (padding query x padding key = 1.2e7)
    spans_real = list(zip(starts, real))
    return q, k, v, spans_real, is_real, thd_params(real, spans)


@pytest.mark.parametrize("mask_type", [AttnMaskType.causal, AttnMaskType.no_mask],
                         ids=["causal", "bidirectional"])
@pytest.mark.parametrize("flag", ["log_max_attention_logit", "qk_clip"])
def test_thd_max_logits_over_legal_entries_only(mask_type, flag):
    q, k, v, spans, is_real, params = _planted_thd_inputs(seed=5)
    heads, dk = q.shape[1], q.shape[2]
    attn = make_attention(heads, dk, v.shape[2], mask_type, softmax_scale=0.25,
                          record=flag == "log_max_attention_logit", qk_clip=flag == "qk_clip")
    assert attn.current_max_attn_logits is None
    attn(q, k, v, None, packed_seq_params=params)

    causal = mask_type == AttnMaskType.causal
    expected = reference_max_logits(q, k, 0.25, causal, spans)
    got = attn.current_max_attn_logits
    assert got.shape == (heads,)
    torch.testing.assert_close(got.double(), expected, atol=1e-5, rtol=1e-6)
    # The traps are far above the legal max, so the check above can fail.
    everything = reference_logits(q, k, 0.25).amax(dim=(1, 2))
    assert (everything > 100 * expected.abs().max()).all()
    # Only the future trap (30 * 30 * 0.25 = 225 plus the random channels) is legal, and only
    # when bidirectional.
    assert (expected < 50).all() if causal else (expected > 200).all()


def test_max_logits_running_max_and_reset():
    q, k, v, spans, _, params = _planted_thd_inputs(seed=6)
    heads, dk = q.shape[1], q.shape[2]
    attn = make_attention(heads, dk, v.shape[2], AttnMaskType.causal, record=True)
    scale = 1 / math.sqrt(dk)
    q2 = q.clone()
    q2[:, 0] *= 2.0  # head 0: larger max in call 2
    q2[:, 1] *= 0.5  # head 1: smaller max in call 2 (the max of call 1 must survive)
    attn(q, k, v, None, packed_seq_params=params)
    attn(q2, k, v, None, packed_seq_params=params)
    first = reference_max_logits(q, k, scale, True, spans)
    second = reference_max_logits(q2, k, scale, True, spans)
    assert second[0] > first[0] and second[1] < first[1]
    torch.testing.assert_close(attn.current_max_attn_logits.double(),
                               torch.maximum(first, second), atol=1e-5, rtol=1e-6)
    # megatron's clip_qk resets the attribute to None after each step; recording restarts.
    attn.current_max_attn_logits = None
    attn(q2, k, v, None, packed_seq_params=params)
    torch.testing.assert_close(attn.current_max_attn_logits.double(), second, atol=1e-5, rtol=1e-6)


def test_sbhd_max_logits_skip_future_and_masked_keys():
    torch.manual_seed(7)
    s, b, heads, dk, dv = 6, 2, 2, 12, 8
    q, k = torch.randn(s, b, heads, dk), torch.randn(s, b, heads, dk)
    v = torch.randn(s, b, heads, dv)
    q[..., 0], k[..., 0] = 0.0, 0.0
    q[0, 1, :, 0], k[5, 1, :, 0] = 30.0, 30.0  # sequence 1: future trap
    k[5, 0] = 1e3  # sequence 0: its last key is padding (masked below)
    key_ok = torch.ones(b, s, dtype=torch.bool)
    key_ok[0, 5] = False
    forbidden = ~key_ok[:, None, None, :].expand(b, 1, s, s)
    attn = make_attention(heads, dk, dv, AttnMaskType.causal, record=True)
    attn(q, k, v, forbidden)
    scale = 1 / math.sqrt(dk)
    expected = torch.maximum(
        reference_max_logits(q[:, 0], k[:, 0], scale, True, [(0, s)], key_ok[0]),
        reference_max_logits(q[:, 1], k[:, 1], scale, True, [(0, s)], key_ok[1]),
    )
    assert attn.current_max_attn_logits.shape == (heads,)
    torch.testing.assert_close(attn.current_max_attn_logits.double(), expected,
                               atol=1e-5, rtol=1e-6)
    assert (expected < 50).all()


def test_no_recording_unless_asked():
    q, k, v, _, _, params = _planted_thd_inputs(seed=8)
    attn = make_attention(q.shape[1], q.shape[2], v.shape[2], AttnMaskType.causal)
    attn(q, k, v, None, packed_seq_params=params)
    assert attn.current_max_attn_logits is None


# --------------------------------------------------------------------------- through MLA


def build_tiny_llm(**overrides):
    """The tiny recipe's LLM (MLA with q_lora, 1 dense + 2 MoE layers), fp32, eval mode.

    ``init_method_std`` is raised from 0.02 so attention is sharp: with near-uniform attention,
    positional or masking errors barely move the logits and the comparisons below could not fail.
    """
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from megatron_vlm.config import ParallelConfig
    from megatron_vlm.models.llm import build_llm
    from megatron_vlm.recipes.tiny import tiny_llm

    torch.manual_seed(0)
    model_parallel_cuda_manual_seed(0)
    llm = dataclasses.replace(tiny_llm(vocab_size=128), init_method_std=0.2, **overrides)
    return build_llm(llm, ParallelConfig()).eval(), llm


def test_mla_layers_record_max_logits_with_yarn_scale(megatron_groups):
    """Each MLA layer records ``[heads]`` max logits = the legal max of the q, k it attends with,
    at megatron's softmax scale mscale(s, m')^2 / sqrt(qk_head_dim) (SPEC §2, QK-Clip)."""
    from megatron_vlm.config.model import YarnConfig

    yarn = YarnConfig(factor=4.0, original_max_position_embeddings=64, mscale=1.0,
                      mscale_all_dim=1.0)
    model, llm = build_tiny_llm(qk_clip=True, yarn=yarn)
    captured = {}

    def grab(i):
        def hook(module, args, kwargs):
            captured[i] = (args[0].detach().clone(), args[1].detach().clone())
        return hook

    layers = model.decoder.layers
    handles = [
        layer.self_attention.core_attention.register_forward_pre_hook(grab(i), with_kwargs=True)
        for i, layer in enumerate(layers)
    ]
    real, spans = [10, 6], [12, 8]
    starts, is_real = packed_layout(real, spans, 0)
    ids = torch.randint(0, 128, (1, len(is_real)), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        model(ids, None, None, packed_seq_params=thd_params(real, spans))
    for h in handles:
        h.remove()

    mscale = 0.1 * 1.0 * math.log(4.0) + 1.0
    scale = mscale**2 / math.sqrt(llm.qk_nope_head_dim + llm.qk_rope_head_dim)
    assert len(captured) == llm.num_layers
    for i, layer in enumerate(layers):
        got = layer.self_attention.core_attention.current_max_attn_logits
        assert got is not None and got.shape == (llm.num_attention_heads,)
        q, k = captured[i]
        expected = reference_max_logits(q, k, scale, True, list(zip(starts, real)))
        torch.testing.assert_close(got.double(), expected, atol=1e-4, rtol=1e-5)


def test_mla_packed_documents_equal_documents_alone(megatron_groups):
    """Packed THD through the whole model: each document's logits equal that document run alone.

    Documents are padded (cu_seqlens_padded), so this checks that megatron's MLA RoPE splits by
    the padded boundaries and restarts per document, and that no token sees another document or
    padding. (RoPE is relative, so a uniform shift of one document's positions is invisible; a
    wrong split is not.)
    """
    model, _ = build_tiny_llm()
    real, spans = [10, 6], [12, 8]
    starts, _ = packed_layout(real, spans, 0)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 128, (1, sum(spans)), generator=g)
    with torch.no_grad():
        packed = model(ids, None, None, packed_seq_params=thd_params(real, spans))
        alone = [
            model(ids[:, s : s + n], None, None, packed_seq_params=thd_params([n]))
            for s, n in zip(starts, real)
        ]
        alone_sbhd = model(ids[:, starts[1] : starts[1] + real[1]], None, None)
    for (s, n), ref in zip(zip(starts, real), alone):
        torch.testing.assert_close(packed[:, s : s + n], ref, atol=2e-5, rtol=0)
    torch.testing.assert_close(alone[1], alone_sbhd, atol=2e-5, rtol=0)

    # Control: the logits do depend on positions at a level far above the tolerance, so a
    # positional error (here: every rotary frequency x1.5) would have failed the check above.
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    originals = [layer.self_attention.rotary_pos_emb.inv_freq for layer in model.decoder.layers]
    try:
        for layer, inv in zip(model.decoder.layers, originals):
            layer.self_attention.rotary_pos_emb.inv_freq = inv * 1.5
        RotaryEmbedding.forward.cache_clear()  # megatron caches rotary tables per length
        with torch.no_grad():
            shifted = model(ids[:, starts[1] : starts[1] + real[1]], None, None,
                            packed_seq_params=thd_params([real[1]]))
    finally:
        for layer, inv in zip(model.decoder.layers, originals):
            layer.self_attention.rotary_pos_emb.inv_freq = inv
        RotaryEmbedding.forward.cache_clear()
    assert (shifted - alone[1]).abs().max() > 1e-2
