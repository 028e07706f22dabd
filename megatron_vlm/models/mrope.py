"""Multimodal RoPE (M-RoPE), our own: per-token rotary frequencies from 3-axis position ids.

Qwen2-VL's layout (Keye-VL, Qwen2.5-VL; FAMILIES.md §1): every token has a (t, h, w) position
(text: t = h = w = its 1D position). The ``d / 2`` rotary frequencies ``inv_freq[j] =
theta^(-2j/d)`` are split into ``mrope_section`` chunks (e.g. [16, 24, 24] at d = 128); chunk
``i`` rotates by the position on axis ``i % 3``. The angles are then duplicated as NeoX halves
(``[f, f]``, ``rotate_half``), exactly megatron's non-interleaved RoPE layout, so megatron's
``apply_rotary_pos_emb`` applies them unchanged. transformers 5.25 computes the same thing in
``Qwen2VLRotaryEmbedding.recomposition_frequencies`` (sections over ``d / 2``, then
``cat(freq, freq)``). With t = h = w every chunk uses the same position: the frequencies equal
1D RoPE's bit for bit.

``style="interleaved"`` is GLM-4.1V's variant (FAMILIES.md §2): the same sectioned angles, each
repeated for an adjacent (GPT-J) pair, ``[f0, f0, f1, f1, ...]`` -- megatron's layout for
``rotary_interleaved=True``, which the attention must then be configured with; with a partial
rotary dim (GLM: half the head) megatron rotates the first ``rotary_dim`` channels and passes
the rest, as GLM-4V does. Checked against transformers' ``Glm4vTextRotaryEmbedding``
(``tests/reference/test_mrope.py``) and whole GLM LLMs (``tests/reference/test_glm_llm.py``);
``LLMConfig.mrope_style`` picks the style and ``rotary_fraction`` the rotated part
(``models/llm.py`` sets megatron's ``rotary_interleaved`` to match).

Why not megatron-core 0.16.1's ``MultimodalRotaryEmbedding`` (FAMILIES.md §5): it allocates
``inv_freq`` on ``torch.cuda.current_device()`` (no CPU), its interleaved branch reshapes with
the wrong dimension, and it always CP-slices the frequencies (zigzag over the whole sequence) even
for packed THD batches, which then hit the no-offset branch of megatron's THD RoPE: wrong
positions under packing + CP.

Wiring (:class:`MRopeGPTModel`): megatron's ``GPTModel`` is built with
``position_embedding_type='none'`` and ``_preprocess`` (``models/gpt/gpt_model.py:284``) is
overridden to return our frequencies as its ``rotary_pos_emb`` (the tuple's second entry, which
``GPTModel.forward`` hands every decoder layer; megatron's own ``'mrope'`` branch at
``gpt_model.py:386`` is never used). The attention applies them with megatron's unfused
``apply_rotary_pos_emb`` (``apply_rope_fusion`` stays off: the fused THD kernel ignores
per-token positions). For packed THD batches we hand megatron frequencies for *every* token of
the packed sequence (``[S, 1, 1, d]`` with ``S == cu_seqlens_padded[-1]``): that selects the
exact-offset branch of ``_apply_rotary_pos_emb_thd`` (``rope_utils.py:208``, "CASE 1"), which
gives each token its own frequencies and, under context parallelism, picks this rank's two
chunks of every document -- the same chunks ``parallel/context.py`` keeps. Position ids may
come whole (``[3, S]``: the VLM, which splits its merged embeddings itself) or already split to
this CP rank's tokens (``[3, S / cp]``: a text-only model, ``training/step.py``); local ids are
placed back at their global indices (the other entries are never read).
"""

from __future__ import annotations

from typing import Literal

import torch
from megatron.core.models.gpt import GPTModel
from megatron.core.packed_seq_params import PackedSeqParams

MRopeStyle = Literal["neox", "interleaved"]


def rope_inv_freq(rotary_dim: int, theta: float, device=None) -> torch.Tensor:
    """``[rotary_dim / 2]`` fp32 inverse frequencies ``theta^(-2j / rotary_dim)`` (the formula of
    megatron's ``RotaryEmbedding`` and HF's default RoPE, in the same fp32 operations)."""
    if rotary_dim <= 0 or rotary_dim % 2:
        raise ValueError(f"rotary dim {rotary_dim} must be a positive even number")
    exponent = torch.arange(0, rotary_dim, 2, dtype=torch.float32, device=device) / rotary_dim
    return 1.0 / (theta ** exponent)


def as_three_axes(position_ids: torch.Tensor) -> torch.Tensor:
    """``[3, B, S]`` int positions from ``[3, S]`` (one sequence), ``[3, B, S]``, or ``[1, S]``
    (1D text positions, used for all three axes)."""
    if position_ids.dim() == 2:
        if position_ids.shape[0] == 1:  # text only: t = h = w
            return position_ids.expand(3, -1)[:, None, :]
        if position_ids.shape[0] == 3:
            return position_ids[:, None, :]
    elif position_ids.dim() == 3 and position_ids.shape[0] == 3:
        return position_ids
    raise ValueError(
        f"M-RoPE position ids must be [3, S] or [3, B, S] (t, h, w per token), or [1, S] for "
        f"text only; got shape {tuple(position_ids.shape)}")


def mrope_freqs(position_ids: torch.Tensor, inv_freq: torch.Tensor, mrope_section: list[int],
                style: MRopeStyle = "neox") -> torch.Tensor:
    """Rotary angles ``[S, B, 1, 2 * len(inv_freq)]`` (megatron's ``freqs`` layout) for 3-axis
    ``position_ids`` (see :func:`as_three_axes`).

    Args:
        position_ids: (t, h, w) position of every token.
        inv_freq: ``[d / 2]`` inverse frequencies (:func:`rope_inv_freq`).
        mrope_section: frequencies per chunk, summing to ``d / 2``; chunk ``i`` uses axis
            ``i % 3``.
        style: ``neox`` (Qwen2-VL, GLM-4.5V: angles as NeoX halves ``[f, f]``) or ``interleaved``
            (GLM-4.1V: each angle for an adjacent pair, ``[f0, f0, f1, f1, ...]``; needs
            megatron's ``rotary_interleaved=True``).
    """
    half = inv_freq.shape[0]
    if sum(mrope_section) != half:
        raise ValueError(f"mrope_section {list(mrope_section)} sums to {sum(mrope_section)}, "
                         f"not the {half} rotary frequencies (head dim / 2)")
    pos = as_three_axes(position_ids).to(device=inv_freq.device, dtype=torch.float32)
    angles = pos[..., None] * inv_freq  # [3, B, S, d/2], fp32 as megatron and HF
    chunks = angles.split(list(mrope_section), dim=-1)
    freqs = torch.cat([chunk[i % 3] for i, chunk in enumerate(chunks)], dim=-1)  # [B, S, d/2]
    if style == "neox":
        emb = torch.cat((freqs, freqs), dim=-1)
    elif style == "interleaved":
        emb = freqs.repeat_interleave(2, dim=-1)
    else:
        raise ValueError(f"M-RoPE style {style!r}: choose neox or interleaved")
    return emb.transpose(0, 1)[:, :, None, :].contiguous()  # [S, B, 1, d]


class MultimodalRoPE(torch.nn.Module):
    """Per-token M-RoPE angles from 3-axis position ids; no parameters, no CP slicing (the ids
    are the tokens this rank computes, or the whole sequence: see :class:`MRopeGPTModel`)."""

    def __init__(self, rotary_dim: int, theta: float, mrope_section: list[int],
                 style: MRopeStyle = "neox") -> None:
        super().__init__()
        self.mrope_section = list(mrope_section)
        self.style = style
        # A plain fp32 attribute, as megatron's RotaryEmbedding keeps it: never in checkpoints,
        # and never cast by ``model.bfloat16()`` (bf16 angles would be far off at long context).
        self.inv_freq = rope_inv_freq(rotary_dim, theta)
        if sum(self.mrope_section) != rotary_dim // 2:
            raise ValueError(f"mrope_section {self.mrope_section} must sum to rotary dim / 2 = "
                             f"{rotary_dim // 2}")

    def forward(self, position_ids: torch.Tensor) -> torch.Tensor:
        """``[S, B, 1, rotary_dim]`` fp32 angles, on ``position_ids``' device."""
        if self.inv_freq.device != position_ids.device:
            self.inv_freq = self.inv_freq.to(position_ids.device)
        return mrope_freqs(position_ids, self.inv_freq, self.mrope_section, self.style)


def _thd_total(params: PackedSeqParams) -> int:
    """Tokens of the whole packed sequence: the last (padded) boundary."""
    cu = params.cu_seqlens_q_padded
    cu = params.cu_seqlens_q if cu is None else cu
    return int(cu[-1])


def thd_freqs_for_megatron(freqs: torch.Tensor, params: PackedSeqParams, cp_size: int = 1,
                           cp_rank: int = 0) -> torch.Tensor:
    """Per-token angles ``[n, 1, 1, d]`` of a packed THD micro-batch in the form megatron's
    ``_apply_rotary_pos_emb_thd`` gives every token its own row: one row per token of the whole
    packed sequence (``S = cu_seqlens_padded[-1]``), its exact-offset branch.

    ``n == S``: the angles of every token (returned as they are). ``n == S / cp_size``: this CP
    rank's tokens in ``parallel/context.py``'s local order; they are placed at their global
    indices (rows of other ranks stay zero and are never read: megatron picks this rank's two
    chunks of every document, the ones ``parallel/context.py`` keeps).
    """
    if freqs.shape[1] != 1:
        raise ValueError("packed THD micro-batches hold one sequence (B = 1)")
    total, n = _thd_total(params), freqs.shape[0]
    if n == total:
        return freqs
    if cp_size > 1 and n * cp_size == total:
        from megatron_vlm.models.attention import cp_layout_for

        layout = cp_layout_for(params, total, cp_size, cp_rank, freqs.device)
        full = freqs.new_zeros((total, *freqs.shape[1:]))
        return full.index_copy(0, layout.local_index.to(freqs.device), freqs)
    raise ValueError(
        f"M-RoPE position ids cover {n} tokens but the packed sequence has {total} "
        f"(cu_seqlens_padded[-1]; context_parallel_size={cp_size}): give ids for every token, "
        "or this CP rank's share; build PackedSeqParams with models.attention."
        "thd_packed_seq_params so that the last boundary covers the tail")


class MRopeGPTModel(GPTModel):
    """megatron's ``GPTModel`` whose decoder rotates by our M-RoPE: build it with
    ``position_embedding_type='none'`` plus ``mrope_theta`` / ``mrope_section``; ``forward``
    takes ``position_ids`` ``[3, S]`` (or ``[3, B, S]``; ``[1, S]`` = text only).
    ``rotary_dim``: the rotated q/k channels (None: the whole head, ``kv_channels``)."""

    def __init__(self, *args, mrope_theta: float, mrope_section: list[int],
                 mrope_style: MRopeStyle = "neox", rotary_dim: int | None = None,
                 **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.position_embedding_type != "none" or self.config.multi_latent_attention:
            raise ValueError("MRopeGPTModel needs position_embedding_type='none' and non-MLA "
                             "attention (it supplies the rotary frequencies itself)")
        if self.config.apply_rope_fusion:
            raise ValueError("M-RoPE needs apply_rope_fusion=False: the fused THD RoPE ignores "
                             "per-token positions")
        if (mrope_style == "interleaved") != self.config.rotary_interleaved:
            raise ValueError(f"mrope_style={mrope_style} needs megatron's rotary_interleaved="
                             f"{mrope_style == 'interleaved'} (the attention's rotate layout)")
        # Partial rotary (GLM: half the head): megatron's apply_rotary_pos_emb rotates the first
        # freqs.shape[-1] channels and passes the rest through.
        rotary_dim = rotary_dim or self.config.kv_channels
        self.mrope = MultimodalRoPE(rotary_dim, mrope_theta, mrope_section, mrope_style)

    def _preprocess(self, input_ids, position_ids, decoder_input=None, inference_context=None,
                    packed_seq_params=None, padding_mask=None):
        """megatron's ``_preprocess`` (embedding, no rotary: type 'none') with our M-RoPE angles
        as ``rotary_pos_emb`` (the second entry of its tuple)."""
        out = super()._preprocess(
            input_ids=input_ids, position_ids=position_ids, decoder_input=decoder_input,
            inference_context=inference_context, packed_seq_params=packed_seq_params,
            padding_mask=padding_mask)
        if position_ids is None:
            raise ValueError("an M-RoPE model needs position_ids [3, S] on every pipeline stage")
        if inference_context is not None:
            raise NotImplementedError("M-RoPE inference (KV cache) is not implemented")
        freqs = self.mrope(position_ids)
        freqs = self._for_megatron(freqs, packed_seq_params)
        return (out[0], freqs, *out[2:])

    def _for_megatron(self, freqs: torch.Tensor, params: PackedSeqParams | None) -> torch.Tensor:
        """Angles in the form megatron's ``apply_rotary_pos_emb`` reads them (module docstring):
        THD: one row per token of the whole packed sequence; sbhd: one row per local token."""
        cp = self.config.context_parallel_size
        if params is None or params.qkv_format != "thd":
            if cp > 1:
                raise NotImplementedError(
                    "M-RoPE with context parallelism needs packed THD micro-batches")
            return freqs
        rank = self.pg_collection.cp.rank() if cp > 1 else 0
        return thd_freqs_for_megatron(freqs, params, cp, rank)
