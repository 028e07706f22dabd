"""Two-budget packing of tokenised multimodal documents into the packed-batch contract (SPEC §11).

A micro-batch holds whole documents (``TokenizedSample``) and is bounded by two budgets:

- ``seq_length`` (S) LLM tokens, each document's span padded to ``pad_to_multiple`` (2·cp·tp);
- ``max_patches`` (P) ViT patches over all its images and video chunks (a video token costs 16
  patches, an image token 4), so one long video cannot blow up the encoder.

``select_packs`` chooses which documents of a buffer go together (two-dimensional bin packing),
every document in exactly one pack (energon's packing stage drops documents a pre-packer leaves
out, so leftovers cannot wait for the next buffer).
``pack_tokenized`` lays one pack out with ``packing.pack_documents`` (same conventions as text:
positions restart per document, each span padded, tail padding) and adds the vision part:

- ``loss_mask`` comes from each document's target mask: 0 on media placeholders, masked prompt
  spans, padding and each document's last token; ``labels`` hold ``pad_id`` wherever the loss
  mask is 0 (so a placeholder id outside the vocabulary never reaches the loss as a label);
- ``VisionInputs`` lists every image / video chunk in sequence order (document order, then order
  inside the document); ``placeholder_starts`` index the packed sequence;
- with a family's M-RoPE ``position_rule`` (a callable: data never imports families),
  ``mrope_position_ids`` ``[3, S]`` holds its ids per document (``data/mrope_positions.py``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from megatron_vlm.data.contract import PackedBatch, VisionInputs
from megatron_vlm.data.mrope_positions import PositionRule, pack_mrope_position_ids
from megatron_vlm.data.packing import pack_documents, padded_length
from megatron_vlm.data.templates import TokenizedSample
from megatron_vlm.data.video import VideoChunk


def document_cost(sample: TokenizedSample, pad_to_multiple: int = 1) -> tuple[int, int]:
    """(padded LLM tokens, ViT patches) one document takes in a pack."""
    return padded_length(len(sample), pad_to_multiple), sample.num_patches


def _place(
    costs: Sequence[tuple[int, int]],
    order: list[int],
    seq_length: int,
    max_patches: int,
    num_packs: int | None,
) -> list[list[int]] | None:
    """Place documents in ``order``. ``num_packs=None``: best fit (smallest normalised residual,
    L2), opening packs as needed. Else exactly ``num_packs`` packs, worst fit (the pack whose
    scarcer resource stays most free: balanced packs); None if a document does not fit."""
    free_t = [seq_length] * (num_packs or 0)
    free_p = [max_patches] * (num_packs or 0)
    members: list[list[int]] = [[] for _ in range(num_packs or 0)]
    scale_p = max(max_patches, 1)
    for i in order:
        tokens, patches = costs[i]
        best, best_key = -1, 0.0
        for b in range(len(members)):
            if free_t[b] >= tokens and free_p[b] >= patches:
                rt, rp = (free_t[b] - tokens) / seq_length, (free_p[b] - patches) / scale_p
                key = rt * rt + rp * rp if num_packs is None else -min(rt, rp)
                if best < 0 or key < best_key:
                    best, best_key = b, key
        if best < 0:
            if num_packs is not None:
                return None
            free_t.append(seq_length)
            free_p.append(max_patches)
            members.append([])
            best = len(members) - 1
        free_t[best] -= tokens
        free_p[best] -= patches
        members[best].append(i)
    return members


def select_packs(
    costs: Sequence[tuple[int, int]], seq_length: int, max_patches: int
) -> list[list[int]]:
    """Group documents into packs within both budgets, with few packs.

    Vector bin packing over (tokens / S, patches / P): first best-fit decreasing (by the sum of
    both fractions; the pack left with the smallest residual vector), then, for pack counts from
    the lower bound ``ceil(max(sum tokens / S, sum patches / P))`` up to one below best fit's,
    a balanced worst-fit placement into exactly that many packs; the first count that fits wins.
    On LLaVA-like mixes where both budgets bind, the second step roughly halves the padding
    (see ``packing_efficiency``).

    Args:
        costs: ``(tokens, patches)`` per document (``document_cost``).
        seq_length: Token budget S of a pack.
        max_patches: Patch budget P of a pack.

    Returns:
        Packs as lists of document indices, ascending inside a pack (stream order); packs ordered
        by their first index. Every index appears exactly once; no pack is empty.

    Raises:
        ValueError: A document alone exceeds a budget (filter those out first).
    """
    if seq_length < 1 or max_patches < 0:
        raise ValueError(f"need seq_length >= 1 and max_patches >= 0, got {seq_length}, "
                         f"{max_patches}")
    for i, (tokens, patches) in enumerate(costs):
        if tokens > seq_length or patches > max_patches:
            raise ValueError(
                f"document {i} needs {tokens} tokens / {patches} patches, over the budgets "
                f"{seq_length} / {max_patches}; skip it before packing"
            )
    if not costs:
        return []
    scale_p = max(max_patches, 1)
    order = sorted(range(len(costs)),
                   key=lambda i: (-(costs[i][0] / seq_length + costs[i][1] / scale_p), i))
    members = _place(costs, order, seq_length, max_patches, None)
    lower = max(1, math.ceil(max(sum(t for t, _ in costs) / seq_length,
                                 sum(p for _, p in costs) / scale_p)))
    for k in range(lower, len(members)):
        balanced = _place(costs, order, seq_length, max_patches, k)
        if balanced is not None:
            members = balanced
            break
    packs = [sorted(m) for m in members if m]
    packs.sort(key=lambda m: m[0])
    return packs


def pack_tokenized(
    samples: Sequence[TokenizedSample],
    seq_length: int,
    pad_id: int,
    pad_to_multiple: int = 1,
    position_rule: PositionRule | None = None,
) -> PackedBatch:
    """Lay out documents (with decoded media) as one packed micro-batch with ``VisionInputs``.

    Args:
        samples: Documents in pack order; every media item must carry its pixel patches.
        seq_length: S.
        pad_id: Padding id (tokens and masked labels).
        pad_to_multiple: Each document span is padded to a multiple of this.
        position_rule: The family's M-RoPE rule (``families/<name>/positions.py``) to fill
            ``mrope_position_ids``; None (1D RoPE families) leaves it None.

    Raises:
        ValueError: Empty document, documents over S, or an item whose patches do not match
            its grid.
    """
    batch = pack_documents([s.tokens.tolist() for s in samples], seq_length, pad_id,
                           pad_to_multiple)
    starts = batch.cu_seqlens_padded[:-1].tolist()
    loss = np.zeros(seq_length, dtype=np.float32)
    pixels: list[torch.Tensor] = []
    grids: list[tuple[int, int, int]] = []
    placeholder_starts: list[int] = []
    is_video: list[bool] = []
    is_fast: list[bool] = []
    media_index: list[int] = []
    for sample, start in zip(samples, starts):
        prev_chunk = -1  # chunk_index of the previous item of this document if a video chunk
        loss[start : start + len(sample)] = sample.loss_mask()
        for span in sample.placeholder_spans:
            item = sample.items[span.item_index]
            if tuple(item.pixel_values.shape[1:]) != (3, 14, 14) or (
                item.pixel_values.shape[0] != item.num_patches
            ):
                raise ValueError(
                    f"media item with grid {item.grid_thw} has pixel_values "
                    f"{tuple(item.pixel_values.shape)}; expected [{item.num_patches}, 3, 14, 14] "
                    "(decode media before packing)"
                )
            pixels.append(item.pixel_values)
            grids.append(tuple(item.grid_thw))
            placeholder_starts.append(start + span.start)
            is_video.append(isinstance(item, VideoChunk))
            # A chunk continues a video when it directly follows that video's previous chunk.
            chunk = item.chunk_index if isinstance(item, VideoChunk) else -1
            continues = chunk > 0 and chunk == prev_chunk + 1
            media_index.append(media_index[-1] + int(not continues) if media_index else 0)
            prev_chunk = chunk
            is_fast.append(bool(getattr(item, "is_fast", False)))
    batch.loss_mask = torch.from_numpy(loss).unsqueeze(0)
    batch.labels = torch.where(batch.loss_mask > 0, batch.labels, torch.full_like(batch.labels,
                                                                                  pad_id))
    if position_rule is not None:
        batch.mrope_position_ids = pack_mrope_position_ids(
            samples, batch.cu_seqlens_padded, seq_length, position_rule)
    if grids:
        batch.vision = VisionInputs(
            pixel_values=torch.cat(pixels).to(torch.float32),
            grid_thw=torch.tensor(grids, dtype=torch.int64),
            placeholder_starts=torch.tensor(placeholder_starts, dtype=torch.int64),
            is_video=torch.tensor(is_video, dtype=torch.bool),
            is_fast=torch.tensor(is_fast, dtype=torch.bool),
            media_index=torch.tensor(media_index, dtype=torch.int64),
        )
    return batch


def packing_efficiency(
    docs: Sequence[tuple[int, int]],
    seq_length: int,
    max_patches: int,
    buffer_size: int,
    pad_to_multiple: int = 1,
) -> dict[str, float]:
    """Padding of ``select_packs`` over a stream cut into buffers of ``buffer_size`` documents
    (how energon's packing stage calls it), for sizing the buffer and reporting.

    Args:
        docs: ``(real tokens, patches)`` per document, in stream order.
        seq_length: S.
        max_patches: P.
        buffer_size: Documents per call of ``select_packs``.
        pad_to_multiple: Document span multiple.

    Returns:
        ``padding_fraction`` (1 - real tokens / (packs · S): span and tail padding),
        ``docs_per_pack``, ``patch_fill`` (patches / (packs · P)) and ``num_packs``.
    """
    num_packs = real = patches = 0
    for start in range(0, len(docs), buffer_size):
        chunk = docs[start : start + buffer_size]
        costs = [(padded_length(t, pad_to_multiple), p) for t, p in chunk]
        num_packs += len(select_packs(costs, seq_length, max_patches))
        real += sum(t for t, _ in chunk)
        patches += sum(p for _, p in chunk)
    total = max(num_packs, 1)
    return {
        "padding_fraction": 1.0 - real / (total * seq_length),
        "docs_per_pack": len(docs) / total,
        "patch_fill": patches / (total * max(max_patches, 1)),
        "num_packs": float(num_packs),
    }
