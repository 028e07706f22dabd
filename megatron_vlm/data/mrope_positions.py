"""Multi-axis (M-RoPE) position ids in the packed batch: the family-neutral part.

A family whose LLM uses M-RoPE (Keye-VL 1.5, GLM-4.5V, ...) gives every token a ``(t, h, w)``
position built per document by the family's *position rule*, a pure function

    ``rule(tokens: np.ndarray [L] int64, blocks: Sequence[VisionBlock]) -> np.ndarray [3, L] int64``

over the document's token layout (its token ids and where its vision blocks sit). The rule lives in
the family's package (``families/<name>/positions.py``); the data side never imports families: the
loader receives the rule as a callable and :func:`pack_mrope_position_ids` applies it per document.

A *vision block* is one image or ONE video frame: ``rows x cols`` consecutive placeholder tokens
(the merged grid, ``h/2 x w/2`` ViT patches) in raster order. A media item whose placeholder span
holds several frames' tokens (``t*h*w/4``, Keye's per-frame tokens) is several consecutive blocks;
an item whose frames are pooled into one grid of tokens (Kimi's ``h*w/4`` for ``t`` frames) is one
block (:func:`vision_blocks`).

Layout in ``PackedBatch.mrope_position_ids`` (``[3, S]`` int64, axis 0 = t, h, w): each
document's span gets the rule's ids for its real tokens; its own padding *continues* as text would
(``1 + max`` of the document's ids, then +1 per token, equal on the three axes), and the tail after
the last document counts from 0 on all three axes, as the 1D ``position_ids`` do
(``data/packing.py``). Continuing rather than writing 0 keeps the 1D convention: for a text-only
pack the three rows equal ``position_ids`` exactly, padding included, so M-RoPE with equal axes
reduces to 1D RoPE on every token. Padding is never attended by real tokens, so its values only need
to be valid rotary indices; a document's ids never exceed its token index (a block of ``n`` tokens
takes at most ``n`` ids), so every id stays below S.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from megatron_vlm.data.templates import TokenizedSample

MERGE = 2
"""ViT patches per LLM token along each side (the 2x2 merge)."""


@dataclass(frozen=True)
class VisionBlock:
    """One image or one video frame in a document: ``rows x cols`` placeholder tokens in raster
    order, the first at index ``start`` of the document."""

    start: int
    """Index in the document of the block's first placeholder token."""
    rows: int
    """Merged grid rows (ViT patch rows / 2)."""
    cols: int
    """Merged grid columns (ViT patch columns / 2)."""

    @property
    def num_tokens(self) -> int:
        """``rows * cols`` placeholder tokens."""
        return self.rows * self.cols


PositionRule = Callable[[np.ndarray, Sequence[VisionBlock]], np.ndarray]
"""``(tokens [L] int64, blocks in document order) -> [3, L] int64`` (t, h, w) ids of one
document."""


def check_blocks(length: int, blocks: Sequence[VisionBlock]) -> None:
    """``ValueError`` unless the blocks have positive grids, lie inside a document of ``length``
    tokens and come in order without overlapping."""
    cursor = 0
    for i, block in enumerate(blocks):
        if block.rows < 1 or block.cols < 1:
            raise ValueError(f"vision block {i} has merged grid {block.rows}x{block.cols}; rows "
                             "and cols must be >= 1")
        if block.start < cursor:
            raise ValueError(f"vision block {i} starts at token {block.start}, before the end "
                             f"({cursor}) of the previous block or the document start; give "
                             "blocks in document order without overlap")
        cursor = block.start + block.num_tokens
        if cursor > length:
            raise ValueError(f"vision block {i} ({block.rows}x{block.cols} at token "
                             f"{block.start}) ends at {cursor}, past the document's {length} "
                             "tokens")


def vision_blocks(sample: TokenizedSample) -> list[VisionBlock]:
    """The vision blocks of a tokenised document, in order: each placeholder span of an item with
    ViT grid ``(t, h, w)`` is ``span.length / (h/2 * w/2)`` consecutive ``h/2 x w/2`` blocks (one
    per frame when every frame has its own tokens, one in all when frames are pooled)."""
    blocks: list[VisionBlock] = []
    for span in sample.placeholder_spans:
        _, h, w = sample.items[span.item_index].grid_thw
        rows, cols = h // MERGE, w // MERGE
        per_block = rows * cols
        if per_block < 1 or span.length % per_block:
            raise ValueError(f"placeholder span of {span.length} tokens at {span.start} is not a "
                             f"whole number of {rows}x{cols} blocks (item grid {(_, h, w)})")
        blocks.extend(VisionBlock(start=span.start + k * per_block, rows=rows, cols=cols)
                      for k in range(span.length // per_block))
    return blocks


def document_mrope_ids(sample: TokenizedSample, rule: PositionRule) -> np.ndarray:
    """``[3, len(sample)]`` int64 ids of one document by ``rule`` (shape and dtype checked)."""
    ids = np.asarray(rule(sample.tokens, vision_blocks(sample)))
    if ids.shape != (3, len(sample)) or ids.dtype != np.int64:
        raise ValueError(f"position rule returned {ids.dtype} {ids.shape} for a document of "
                         f"{len(sample)} tokens; it must return int64 [3, {len(sample)}]")
    return ids


def pack_mrope_position_ids(samples: Sequence[TokenizedSample],
                            cu_seqlens_padded: torch.Tensor | Sequence[int], seq_length: int,
                            rule: PositionRule) -> torch.Tensor:
    """``[3, S]`` int64 M-RoPE ids of a pack laid out at ``cu_seqlens_padded`` (module docstring:
    rule ids on real tokens, a document's padding continues from ``1 + max``, the tail counts
    from 0)."""
    cu = [int(x) for x in (cu_seqlens_padded.tolist() if isinstance(cu_seqlens_padded,
                                                                   torch.Tensor)
                           else cu_seqlens_padded)]
    if len(cu) != len(samples) + 1:
        raise ValueError(f"{len(samples)} documents but {len(cu) - 1} spans in cu_seqlens_padded")
    out = np.zeros((3, seq_length), dtype=np.int64)
    for sample, start, end in zip(samples, cu[:-1], cu[1:]):
        n = len(sample)
        ids = document_mrope_ids(sample, rule)
        out[:, start : start + n] = ids
        first = int(ids.max()) + 1 if n else 0
        out[:, start + n : end] = np.arange(first, first + end - start - n)
    out[:, cu[-1] :] = np.arange(seq_length - cu[-1])
    return torch.from_numpy(out)
