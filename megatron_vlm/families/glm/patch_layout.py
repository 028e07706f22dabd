"""GLM patches: the packed batch's layout -> the Glm4v tower's (torch only; data and model sides
may both import this module, it imports nothing of the package).

The packed batch (``data/contract.py``, ``families/glm/media.py``) carries every GLM item as
``2*h*w`` patches ``[3, 14, 14]`` in raster order (frame, row, col) with grid ``(2, h, w)`` in
FRAMES: an image (its frame twice) or one temporal patch of a video. The Glm4v tower
(``vision.py``) takes transformers' layout: rows ``[h*w, 3*2*14*14]`` per temporal patch,
BLOCK-MAJOR (the 2x2 patches of one LLM token consecutive, blocks in raster order; a row is
channel, frame, y, x) with grid ``(1, h, w)`` in temporal patches, as ``Glm4vImageProcessorPil``
and ``Glm4vVideoProcessor`` emit them (``tests/reference/test_glm_processing.py``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

MERGE_SIZE = 2
"""Patches per LLM token along each side."""
TEMPORAL_PATCH_SIZE = 2
"""Frames per temporal patch."""


def hf_patch_rows(patches: torch.Tensor, grid_thw: Sequence[int]) -> torch.Tensor:
    """One item's ``[t*h*w, C, p, p]`` raster patches (``t`` frames, even) as transformers'
    ``pixel_values`` rows ``[t/2*h*w, C*2*p*p]`` (module docstring: block-major)."""
    t, h, w = (int(v) for v in grid_thw)
    m, tp = MERGE_SIZE, TEMPORAL_PATCH_SIZE
    if t % tp or h % m or w % m:
        raise ValueError(f"GLM item grid {(t, h, w)} must have an even frame count and even "
                         "sides")
    c, p = patches.shape[1], patches.shape[2]
    x = patches.reshape(t // tp, tp, h // m, m, w // m, m, c, p, p)
    # [T, tp, bh, mh, bw, mw, C, p, p] -> [T, bh, bw, mh, mw, C, tp, p, p]
    x = x.permute(0, 2, 4, 3, 5, 6, 1, 7, 8)
    return x.reshape(t // tp * h * w, c * tp * p * p)


def tower_inputs(pixel_values: torch.Tensor,
                 grid_thw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A packed batch's GLM media as the tower takes them.

    Args:
        pixel_values: ``[N, 3, 14, 14]`` every item's raster patches, items in order.
        grid_thw: ``[M, 3]`` ``(2, h, w)`` per item, in frames.

    Returns:
        ``([N/2, 3*2*14*14]`` block-major rows, ``[M, 3]`` ``(1, h, w)`` grids in temporal
        patches``)``.
    """
    rows, first = [], 0
    for t, h, w in grid_thw.tolist():
        rows.append(hf_patch_rows(pixel_values[first : first + t * h * w], (t, h, w)))
        first += t * h * w
    if first != pixel_values.shape[0]:
        raise ValueError(f"grids cover {first} patches but pixel_values holds "
                         f"{pixel_values.shape[0]}")
    grid = grid_thw.clone()
    grid[:, 0] //= TEMPORAL_PATCH_SIZE
    if not rows:
        width = TEMPORAL_PATCH_SIZE * math.prod(pixel_values.shape[1:])
        return pixel_values.new_zeros(0, width), grid
    return torch.cat(rows), grid


__all__ = ["hf_patch_rows", "tower_inputs"]
