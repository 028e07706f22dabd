"""Keye-VL 1.5 M-RoPE position ids (issue 19 item 4) against hand-written expectations.

Every expected array below is written out by hand from the rule (text sequential; a vision block
takes t = s, h = s + r, w = s + c over its merged grid with s = 1 + the largest id so far; the
next token resumes at 1 + the block's largest id), not computed by the code under test.
"""

from __future__ import annotations

import numpy as np
import pytest

from megatron_vlm.data.mrope_positions import VisionBlock
from megatron_vlm.families.keye.positions import keye_position_ids

# Token ids only fill the layout (the rule reads positions, not ids); Qwen2-VL's are used where
# known, the frame/fast marker ids are stand-ins.
TEXT, V_START, V_END, IMG, VID = 100, 151652, 151653, 151655, 151656
FRAME, FAST_START, FAST_END, DIGIT, DOT = 151660, 151661, 151662, 15, 13


def _ids(tokens: list[int], blocks: list[VisionBlock]) -> np.ndarray:
    out = keye_position_ids(np.asarray(tokens, dtype=np.int64), blocks)
    assert out.dtype == np.int64 and out.shape == (3, len(tokens))
    return out


def test_text_only_is_sequential_on_all_axes():
    out = _ids([TEXT] * 5, [])
    np.testing.assert_array_equal(out, [[0, 1, 2, 3, 4]] * 3)


def test_image_between_text():
    # text, <|vision_start|>, 2x3 image, <|vision_end|>, text
    tokens = [TEXT, V_START] + [IMG] * 6 + [V_END, TEXT]
    out = _ids(tokens, [VisionBlock(start=2, rows=2, cols=3)])
    # s = 2; rows r = 0,0,0,1,1,1; cols c = 0,1,2,0,1,2; largest id 4 -> text resumes at 5
    np.testing.assert_array_equal(out, [
        [0, 1, 2, 2, 2, 2, 2, 2, 5, 6],
        [0, 1, 2, 2, 2, 3, 3, 3, 5, 6],
        [0, 1, 2, 3, 4, 2, 3, 4, 5, 6],
    ])


def test_two_images_back_to_back():
    # text, a 1x2 image, then directly a 2x1 image (no text between), text
    tokens = [TEXT, IMG, IMG, IMG, IMG, TEXT]
    out = _ids(tokens, [VisionBlock(start=1, rows=1, cols=2), VisionBlock(start=3, rows=2, cols=1)])
    # first: s = 1, ids (1,1,1) (1,1,2), largest 2; second: s = 3, ids (3,3,3) (3,4,3), largest 4
    np.testing.assert_array_equal(out, [
        [0, 1, 1, 3, 3, 5],
        [0, 1, 1, 3, 4, 5],
        [0, 1, 2, 3, 3, 5],
    ])


def test_video_two_slow_frames_and_a_fast_frame_with_timestamps():
    # Keye's video layout: <|vision_start|>, per frame <|frame|> + timestamp text ("0.0" as
    # 3 tokens here) + pads (a fast frame's pads wrapped in the fast markers), <|vision_end|>.
    tokens = (
        [TEXT, V_START]
        + [FRAME, DIGIT, DOT, DIGIT] + [VID] * 4                           # slow 2x2, index 6
        + [FRAME, DIGIT, DOT, DIGIT] + [VID] * 4                           # slow 2x2, index 14
        + [FRAME, DIGIT, DOT, DIGIT, FAST_START] + [VID] * 2 + [FAST_END]  # fast 1x2, index 23
        + [V_END, TEXT]
    )
    blocks = [VisionBlock(start=6, rows=2, cols=2), VisionBlock(start=14, rows=2, cols=2),
              VisionBlock(start=23, rows=1, cols=2)]
    out = _ids(tokens, blocks)
    # text 0..5 | frame 0: s=6 -> t 6666, h 6677, w 6767 (max 7) | text 8..11 |
    # frame 1: s=12 -> t 12x4, h 12 12 13 13, w 12 13 12 13 (max 13) | text 14..18 (incl.
    # <|fast_start|>) | fast frame: s=19 -> t 19 19, h 19 19, w 19 20 | <|fast_end|> 21,
    # <|vision_end|> 22, text 23
    t = [0, 1, 2, 3, 4, 5, 6, 6, 6, 6, 8, 9, 10, 11, 12, 12, 12, 12,
         14, 15, 16, 17, 18, 19, 19, 21, 22, 23]
    h = [0, 1, 2, 3, 4, 5, 6, 6, 7, 7, 8, 9, 10, 11, 12, 12, 13, 13,
         14, 15, 16, 17, 18, 19, 19, 21, 22, 23]
    w = [0, 1, 2, 3, 4, 5, 6, 7, 6, 7, 8, 9, 10, 11, 12, 13, 12, 13,
         14, 15, 16, 17, 18, 19, 20, 21, 22, 23]
    np.testing.assert_array_equal(out, [t, h, w])


def test_document_starting_with_an_image():
    out = _ids([IMG] * 4 + [TEXT, TEXT], [VisionBlock(start=0, rows=2, cols=2)])
    # s = 0 at the document start; largest 1 -> text at 2, 3
    np.testing.assert_array_equal(out, [
        [0, 0, 0, 0, 2, 3],
        [0, 0, 1, 1, 2, 3],
        [0, 1, 0, 1, 2, 3],
    ])


def test_tall_block_resumes_after_its_row_count():
    # 3x1: largest id is s + 2 (the rows), not s + 0 (the cols)
    out = _ids([TEXT, IMG, IMG, IMG, TEXT], [VisionBlock(start=1, rows=3, cols=1)])
    np.testing.assert_array_equal(out, [
        [0, 1, 1, 1, 4],
        [0, 1, 2, 3, 4],
        [0, 1, 1, 1, 4],
    ])


@pytest.mark.parametrize("blocks", [
    [VisionBlock(start=3, rows=2, cols=2)],                                     # past the end
    [VisionBlock(start=0, rows=1, cols=2), VisionBlock(start=1, rows=1, cols=1)],  # overlap
    [VisionBlock(start=2, rows=1, cols=1), VisionBlock(start=0, rows=1, cols=1)],  # order
    [VisionBlock(start=0, rows=0, cols=2)],                                     # empty grid
])
def test_bad_blocks_are_refused(blocks):
    with pytest.raises(ValueError, match="vision block"):
        keye_position_ids(np.zeros(5, dtype=np.int64), blocks)
