"""GLM-4.1V / GLM-4.5V 3-axis M-RoPE position ids of one document (issue 20 item 3, data side).

The rule as transformers 5.25's ``Glm4vModel.get_rope_index`` / ``Glm4vMoeModel.get_rope_index``
computes it (``models/glm4v*/modeling_glm4v*.py``; FAMILIES.md §2 "Pos ids"):

* the document is cut into runs of equal ``mm_token_type_ids`` (0 text, 1 image, 2 video): every
  token outside a vision block -- ``<|begin_of_image|>``, ``<|end_of_image|>``, the video
  wrappers, the timestamp digits after each temporal patch -- is text and takes sequential ids
  from ``current_pos``, equal on the three axes;
* a vision block -- an image, or ONE temporal patch of a video (``video_grid_thw`` ``(T, h, w)``
  is split into ``T`` grids ``(1, h, w)``) -- of ``rows x cols`` merged tokens in raster order
  takes ``t = s, h = s + r, w = s + c`` for token ``(r, c)`` with ``s = current_pos``. Time is not
  on the t axis (``t // temp_merge_size`` is 0 for a one-patch grid): frame order reaches the
  model through the ``str(int(ts))`` text after each temporal patch;
* then ``current_pos += max(rows, cols)``: the next token starts at ``1 +`` the block's largest
  id.

In ``data/mrope_positions`` terms (``PositionRule``): ``s`` is ``1 +`` the largest id so far (0 at
the document start), the same rule as Keye-VL 1.5's (``families/keye/positions.py``) phrased as
transformers phrases GLM's. Blocks come from the placeholder spans: one per image or temporal
patch (the media rules make each its own item, ``families/glm/media.py``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from megatron_vlm.data.mrope_positions import VisionBlock, check_blocks


def glm_position_ids(tokens: np.ndarray, blocks: Sequence[VisionBlock]) -> np.ndarray:
    """``[3, L]`` int64 (t, h, w) ids of one GLM document (the module docstring's rule).

    Args:
        tokens: ``[L]`` token ids of the document (only its length matters to the rule).
        blocks: Its vision blocks in document order (one per image or temporal patch).

    Raises:
        ValueError: A block outside the document, overlapping another, or out of order.
    """
    length = int(np.asarray(tokens).shape[0])
    check_blocks(length, blocks)
    ids = np.empty((3, length), dtype=np.int64)
    cursor = 0  # next token index to fill
    current_pos = 0  # transformers' running start
    for block in blocks:
        num_text = block.start - cursor
        ids[:, cursor : block.start] = np.arange(current_pos, current_pos + num_text)
        current_pos += num_text
        rows, cols = np.divmod(np.arange(block.num_tokens), block.cols)
        end = block.start + block.num_tokens
        ids[0, block.start : end] = current_pos
        ids[1, block.start : end] = current_pos + rows
        ids[2, block.start : end] = current_pos + cols
        current_pos += max(block.rows, block.cols)
        cursor = end
    ids[:, cursor:] = np.arange(current_pos, current_pos + length - cursor)
    return ids


__all__ = ["glm_position_ids"]
