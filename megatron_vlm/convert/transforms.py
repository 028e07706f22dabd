"""The named transforms of the mapping tables (see ``rules.py``), and the import-only alias maps.

Each :class:`~megatron_vlm.convert.rules.Transform` is exact (permutations, concatenations,
padding with zeros and slicing): a round trip returns the same bits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from megatron_vlm.convert.rules import ConversionError, ConvertContext, Transform

# --- per-head helpers (ViT qkv) -------------------------------------------------------------------


def rope_rows_half_to_interleaved(w: Tensor, num_heads: int) -> Tensor:
    """Undo transformers' ``PermuteForRope`` on q or k rows (weight ``[H*d, in]`` or bias):
    each head's rotate-half ``(2, d/2)`` rows back to interleaved pairs ``(d/2, 2)``."""
    half = w.shape[0] // num_heads // 2
    return w.reshape(num_heads, 2, half, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def rope_rows_interleaved_to_half(w: Tensor, num_heads: int) -> Tensor:
    """transformers' ``PermuteForRope``: interleaved pairs -> rotate-half, per head."""
    half = w.shape[0] // num_heads // 2
    return w.reshape(num_heads, half, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def fuse_qkv(q: Tensor, k: Tensor, v: Tensor, num_heads: int) -> Tensor:
    """``[H*d, ...]`` q, k, v -> megatron's per-head ``[H*3*d, ...]`` (q_h, k_h, v_h)."""
    parts = [x.reshape(num_heads, -1, *x.shape[1:]) for x in (q, k, v)]
    fused = torch.stack(parts, dim=1)  # [H, 3, d, ...]
    return fused.reshape(-1, *q.shape[1:])


def split_qkv(qkv: Tensor, num_heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """Inverse of :func:`fuse_qkv`."""
    per_head = qkv.reshape(num_heads, 3, -1, *qkv.shape[1:])
    q, k, v = (per_head[:, i].reshape(-1, *qkv.shape[1:]) for i in range(3))
    return q, k, v


# --- GQA qkv (Qwen3 ...): HF q, k, v -> megatron's linear_qkv, interleaved per query group -------


def fuse_gqa_qkv(q: Tensor, k: Tensor, v: Tensor, num_query_groups: int) -> Tensor:
    """HF ``q [H*d, ...]``, ``k``/``v [G*d, ...]`` -> megatron's GQA ``linear_qkv`` rows: per
    query group ``g``, its ``H/G`` query heads, then key head ``g``, then value head ``g``
    (megatron-core ``SelfAttention.get_query_key_value_tensors``)."""
    parts = [x.reshape(num_query_groups, -1, *x.shape[1:]) for x in (q, k, v)]
    return torch.cat(parts, dim=1).reshape(-1, *q.shape[1:])


def split_gqa_qkv(qkv: Tensor, num_heads: int,
                  num_query_groups: int) -> tuple[Tensor, Tensor, Tensor]:
    """Inverse of :func:`fuse_gqa_qkv`."""
    rows, rest = qkv.shape[0], qkv.shape[1:]
    if rows % (num_heads + 2 * num_query_groups):
        raise ConversionError(f"has {rows} rows, not a multiple of heads + 2 x query groups = "
                              f"{num_heads + 2 * num_query_groups}")
    d = rows // (num_heads + 2 * num_query_groups)
    q_rows = num_heads // num_query_groups * d
    per_group = qkv.reshape(num_query_groups, q_rows + 2 * d, *rest)
    q = per_group[:, :q_rows].reshape(-1, *rest)
    k = per_group[:, q_rows:q_rows + d].reshape(-1, *rest)
    v = per_group[:, q_rows + d:].reshape(-1, *rest)
    return q, k, v


def _gqa_to_ours(ts: list[Tensor], ctx: ConvertContext) -> Tensor:
    q, k, v = ts
    groups = ctx.num_query_groups
    if not groups or k.shape[0] % groups or q.shape[0] % groups or k.shape != v.shape:
        raise ConversionError(f"q {list(q.shape)}, k {list(k.shape)}, v {list(v.shape)} do not "
                              f"split into {groups} query groups")
    return fuse_gqa_qkv(q, k, v, groups)


GQA_Q_K_V = Transform(
    "gqa_q_k_v",
    to_ours=_gqa_to_ours,
    to_hf=lambda t, ctx: list(split_gqa_qkv(t, ctx.num_heads, ctx.num_query_groups)),
)


# --- gate/up fusion: megatron's gated linear_fc1 is [gate; up] ----------------------------------

FUSE_GATE_UP = Transform(
    "fuse_gate_up",
    to_ours=lambda ts, ctx: torch.cat(ts, dim=0),
    to_hf=lambda t, ctx: list(t.chunk(2, dim=0)),
    blocks=lambda ts, ctx: list(ts),  # megatron stores gate and up as two chunks: no cat
)


# --- vocabulary padding: megatron pads the table to a multiple of 128 * tp ----------------------


def _pad_vocab(ts: list[Tensor], ctx: ConvertContext) -> Tensor:
    t = ts[0]
    if t.shape[0] != ctx.vocab_size:
        raise ConversionError(f"has {t.shape[0]} rows but the config's vocab_size is "
                              f"{ctx.vocab_size}")
    return F.pad(t, (0, 0, 0, ctx.padded_vocab_size - ctx.vocab_size))


PAD_VOCAB = Transform("pad_vocab", _pad_vocab, lambda t, ctx: [t[: ctx.vocab_size]])


# --- MLA rope rows: megatron rotates interleaved pairs (HF rope_interleave=True) ----------------


def _hf_rope_order(d_r: int) -> Tensor:
    """With ``rope_interleave=False`` HF pairs channel j with j + d_r/2: our row of each HF row."""
    return torch.cat([torch.arange(0, d_r, 2), torch.arange(1, d_r, 2)])


def _q_rows(t: Tensor, ctx: ConvertContext, to_ours: bool) -> Tensor:
    if ctx.rope_interleave:
        return t
    nope, d_r = ctx.qk_nope_head_dim, ctx.qk_rope_head_dim
    heads = t.reshape(ctx.num_heads, nope + d_r, -1).clone()
    order = _hf_rope_order(d_r)
    rope = heads[:, nope:].clone()
    if to_ours:
        heads[:, nope:][:, order] = rope
    else:
        heads[:, nope:] = rope[:, order]
    return heads.reshape(t.shape)


def _kv_a_rows(t: Tensor, ctx: ConvertContext, to_ours: bool) -> Tensor:
    if ctx.rope_interleave:
        return t
    out, lora = t.clone(), ctx.kv_lora_rank
    order = _hf_rope_order(ctx.qk_rope_head_dim)
    if to_ours:
        out[lora:][order] = t[lora:]
    else:
        out[lora:] = t[lora:][order]
    return out


ROPE_Q_ROWS = Transform(
    "mla_q_rope_rows",
    to_ours=lambda ts, ctx: _q_rows(ts[0], ctx, to_ours=True),
    to_hf=lambda t, ctx: [_q_rows(t, ctx, to_ours=False)],
)
ROPE_KV_A_ROWS = Transform(
    "mla_kv_a_rope_rows",
    to_ours=lambda ts, ctx: _kv_a_rows(ts[0], ctx, to_ours=True),
    to_hf=lambda t, ctx: [_kv_a_rows(t, ctx, to_ours=False)],
)


# --- ViT qkv: checkpoint wqkv = [q; k; v], ours per head [q_h; k_h; v_h] ------------------------

VIT_WQKV = Transform(
    "vit_wqkv",
    to_ours=lambda ts, ctx: fuse_qkv(*ts[0].chunk(3, dim=0), ctx.vision_num_heads),
    to_hf=lambda t, ctx: [torch.cat(split_qkv(t, ctx.vision_num_heads), dim=0)],
)
# SigLIP: separate q, k, v (no rope, so no permutation).
VIT_Q_K_V = Transform(
    "vit_q_k_v",
    to_ours=lambda ts, ctx: fuse_qkv(*ts, ctx.vision_num_heads),
    to_hf=lambda t, ctx: list(split_qkv(t, ctx.vision_num_heads)),
)
# SigLIP's learned position table is [H*W, D]; ours [H, W, D].
FLAT_POS_TABLE = Transform(
    "flat_pos_table",
    to_ours=lambda ts, ctx: ts[0].reshape(ctx.vision_pos_emb_shape),
    to_hf=lambda t, ctx: [t.flatten(0, 1)],
)


# --- aliases (import only) ----------------------------------------------------------------------


def vision_qkv_from_module(ts: list[Tensor], ctx: ConvertContext) -> list[Tensor]:
    """transformers' in-memory ``attn.{q,k,v}_proj`` (q/k rows rotate-half per head, after its
    load-time ``PermuteForRope``) -> the checkpoint's ``wqkv`` (interleaved pairs)."""
    q, k, v = ts
    heads = ctx.vision_num_heads
    return [torch.cat([rope_rows_half_to_interleaved(q, heads),
                       rope_rows_half_to_interleaved(k, heads), v], dim=0)]


def split_fused_gate_up(ts: list[Tensor], ctx: ConvertContext, e: int) -> list[Tensor]:
    """transformers' in-memory ``experts.gate_up_proj [E, 2I, H]`` -> expert e's gate, up."""
    return list(ts[0][e].chunk(2, dim=0))


def split_fused_down(ts: list[Tensor], ctx: ConvertContext, e: int) -> list[Tensor]:
    """transformers' in-memory ``experts.down_proj [E, H, I]`` -> expert e's down_proj."""
    return [ts[0][e]]

