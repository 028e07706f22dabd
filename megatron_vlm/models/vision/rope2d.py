"""MoonViT's 2D rotary position embedding, and the megatron attention that applies it.

Layout (SPEC §2; transformers 5.23 ``Kimi_K25VisionRotaryEmbedding`` is the reference): a head of
``d`` channels is ``d/2`` *interleaved* pairs ``(2p, 2p+1)``; pair ``p = 2i`` rotates by
``col * f_i`` and pair ``p = 2i + 1`` by ``row * f_i``, with ``f_i = theta^(-4i/d)``, ``i < d/4``.
The same rotation is repeated for every frame of a video chunk (no temporal rotary).

This is the layout of the released checkpoint's ``wqkv``. transformers permutes q/k rows per head
on load to a rotate-half layout; ``hf_weights`` undoes that, so our weights equal the checkpoint's.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.attention import SelfAttention
from torch import Tensor


def rope_2d_angles(grid_thw: Tensor, head_dim: int, theta: float) -> Tensor:
    """Per-patch rotation angles ``[N, head_dim/2]`` (fp32, on CPU) for patches in raster order
    (frame, row, col) of every item of ``grid_thw [M, 3]``; entry ``p`` is pair ``p``'s angle."""
    half = head_dim // 2
    inv_freq = 1.0 / (theta ** (torch.arange(0, half, 2, dtype=torch.float) / half))  # [d/4]
    rows, cols = [], []
    for t, h, w in grid_thw.tolist():
        r, c = torch.meshgrid(torch.arange(h), torch.arange(w), indexing="ij")
        rows.append(r.flatten().repeat(t))
        cols.append(c.flatten().repeat(t))
    row = torch.cat(rows).float()[:, None] * inv_freq  # [N, d/4]
    col = torch.cat(cols).float()[:, None] * inv_freq
    return torch.stack([col, row], dim=-1).flatten(1)  # [N, d/2]: col_0, row_0, col_1, row_1...


def apply_rope_2d(x: Tensor, angles: Tensor) -> Tensor:
    """Rotate interleaved pairs of ``x [N, ..., d]`` by ``angles [N, d/2]``; math in fp32 (as the
    reference does), result in ``x``'s dtype."""
    shape = (angles.shape[0],) + (1,) * (x.dim() - 2) + (angles.shape[1],)
    cos, sin = angles.cos().view(shape), angles.sin().view(shape)
    pairs = x.float().unflatten(-1, (-1, 2))
    x1, x2 = pairs[..., 0], pairs[..., 1]
    out = torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    return out.flatten(-2).to(x.dtype)


class Rope2DSelfAttention(SelfAttention):
    """megatron ``SelfAttention`` that rotates q and k with per-patch 2D RoPE angles.

    The layer receives the angles ``[N, d/2]`` as ``rotary_pos_emb`` and passes ``None`` on to
    megatron, then rotates q/k right after the qkv split (before core attention). Why not
    megatron's own RoPE (megatron-core 0.16.1 ``models/common/embeddings/rope_utils.py``): its
    THD path (``_apply_rotary_pos_emb_thd``, :178) only maps per-token frequencies when they
    cover exactly ``cu_seqlens[-1]`` tokens (:211; otherwise it slices every document from 0,
    wrong for 2D grids), it does so with a host sync per document per layer (``.item()``, :218),
    computes cos/sin in the activation dtype, and with ``apply_rope_fusion`` the Transformer
    Engine THD kernel (:290) indexes frequencies from 0 in every document. Rotating here is one
    vectorised op over the packed sequence in fp32, like the reference.
    """

    _rope_angles: Tensor | None = None

    def forward(
        self,
        hidden_states: Tensor,
        attention_mask: Tensor | None,
        key_value_states: Tensor | None = None,
        inference_context=None,
        rotary_pos_emb: Tensor | None = None,
        **kwargs,
    ):
        """Megatron's forward; ``rotary_pos_emb`` carries our angles ``[N, d/2]`` (on the
        activations' device)."""
        self._rope_angles = rotary_pos_emb
        try:
            return super().forward(
                hidden_states, attention_mask, key_value_states=key_value_states,
                inference_context=inference_context, rotary_pos_emb=None, **kwargs,
            )
        finally:
            self._rope_angles = None

    def get_query_key_value_tensors(self, hidden_states: Tensor, *args, **kwargs):
        """q, k, v ``[s, b, np, hn]`` from megatron, with q and k rotated."""
        out = super().get_query_key_value_tensors(hidden_states, *args, **kwargs)
        if self._rope_angles is None:
            return out
        # megatron asks for the unsplit qkv only with fused_single_qkv_rope and a rotary_pos_emb,
        # and we always hand it rotary_pos_emb=None.
        assert kwargs.get("split_qkv", True), "Rope2DSelfAttention needs split q, k, v"
        query, key, *rest = out
        angles = self._rope_angles
        if angles.shape[0] != query.shape[0]:
            raise RuntimeError(
                f"2D RoPE angles cover {angles.shape[0]} tokens but attention sees "
                f"{query.shape[0]} (sequence-parallel padding must pad the angles too)"
            )
        return (apply_rope_2d(query, angles), apply_rope_2d(key, angles), *rest)
