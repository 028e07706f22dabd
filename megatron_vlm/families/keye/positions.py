"""Keye-VL 1.5's 3-axis M-RoPE position ids of one document (issue 19 item 4).

The rule, as vLLM's ``KeyeVL1_5ForConditionalGeneration.get_mrope_input_positions``
(``vllm/model_executor/models/keye_vl1_5.py``) and the HF port's ``get_rope_index`` compute it
(FAMILIES.md §1 "pos ids"):

* text tokens (every token outside a vision block: ``<|vision_start|>``/``<|vision_end|>``,
  ``<|frame|>``, the timestamp digits, the fast markers) take sequential ids, equal on the three
  axes (t = h = w);
* a vision block -- an image, or ONE video frame (a video grid ``(T, h, w)`` is split into ``T``
  blocks ``(1, h, w)``) -- of ``rows x cols`` merged tokens in raster order takes
  ``t = s, h = s + r, w = s + c`` for token ``(r, c)``, with ``s = 1 +`` the largest id so far in
  the document (0 at its start). Time is not on the t axis: every frame restarts at t = s; frame
  order reaches the model through the ``<|frame|>`` + timestamp text before each frame;
* the next token after a block starts at ``1 +`` the block's largest id, ``s + max(rows, cols)``.

vLLM phrases ``s`` as "start of the preceding text run + its length"; it is the same number.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from megatron_vlm.data.mrope_positions import VisionBlock, check_blocks


def keye_position_ids(tokens: np.ndarray, blocks: Sequence[VisionBlock]) -> np.ndarray:
    """``[3, L]`` int64 (t, h, w) ids of one Keye document (the module docstring's rule).

    Args:
        tokens: ``[L]`` token ids of the document (only its length matters to the rule).
        blocks: Its vision blocks in document order (one per image or video frame).

    Raises:
        ValueError: A block outside the document, overlapping another, or out of order.
    """
    length = int(np.asarray(tokens).shape[0])
    check_blocks(length, blocks)
    ids = np.empty((3, length), dtype=np.int64)
    cursor = 0  # next token index to fill
    next_id = 0  # 1 + the largest id so far
    for block in blocks:
        text = block.start - cursor
        ids[:, cursor : block.start] = np.arange(next_id, next_id + text)
        s = next_id + text
        rows, cols = np.divmod(np.arange(block.num_tokens), block.cols)
        end = block.start + block.num_tokens
        ids[0, block.start : end] = s
        ids[1, block.start : end] = s + rows
        ids[2, block.start : end] = s + cols
        next_id = s + max(block.rows, block.cols)
        cursor = end
    ids[:, cursor:] = np.arange(next_id, next_id + length - cursor)
    return ids
