"""M-RoPE ids in the packed batch (``PackedBatch.mrope_position_ids``, ``data/mrope_positions.py``):
a family's rule per document, padding continuing, the tail from 0, None without a rule; and their
context-parallel split with the tokens. Expectations are written out by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from megatron_vlm.data.image import ProcessedImage
from megatron_vlm.data.mm_packing import pack_tokenized
from megatron_vlm.data.mrope_positions import VisionBlock, pack_mrope_position_ids, vision_blocks
from megatron_vlm.data.prepacked import batch_from_dict, batch_to_dict
from megatron_vlm.data.templates import PlaceholderSpan, TokenizedSample
from megatron_vlm.data.video import VideoChunk
from megatron_vlm.families.keye.positions import keye_position_ids
from megatron_vlm.parallel.context import (
    context_parallel_layout,
    split_for_context_parallel,
    unsplit_context_parallel,
)

PAD, TEXT, IMG, VID = 0, 11, 5, 6


def _doc(tokens: list[int], spans: list[tuple[int, int]], items: list) -> TokenizedSample:
    """A document with placeholder spans ``(start, length)``, span k holding ``items[k]``."""
    return TokenizedSample(
        tokens=np.asarray(tokens, dtype=np.int64),
        target_mask=np.asarray([t == TEXT for t in tokens]),
        placeholder_spans=[PlaceholderSpan(start=s, length=n, item_index=k,
                                           is_video=isinstance(items[k], VideoChunk))
                           for k, (s, n) in enumerate(spans)],
        items=items)


def _image(h: int, w: int) -> ProcessedImage:
    return ProcessedImage(torch.zeros(h * w, 3, 14, 14), (1, h, w), (h * 14, w * 14),
                          (h * 14, w * 14))


def _chunk(t: int, h: int, w: int) -> VideoChunk:
    return VideoChunk(torch.zeros(t * h * w, 3, 14, 14), (t, h, w), 0.0)


def _image_doc() -> TokenizedSample:
    # text, a 2x2-token image (ViT grid 4x4), text: 6 tokens
    return _doc([TEXT, IMG, IMG, IMG, IMG, TEXT], [(1, 4)], [_image(4, 4)])


def test_pack_fills_rule_ids_continues_document_padding_and_restarts_the_tail():
    docs = [_image_doc(), _doc([TEXT] * 3, [], [])]
    batch = pack_tokenized(docs, 16, PAD, pad_to_multiple=4, position_rule=keye_position_ids)
    # doc 0: span 8 = 6 real (image s=1: t 1111, h 1122, w 1212; text at 3) + 2 padding (4, 5);
    # doc 1: span 4 = 3 real + 1 padding; tail: 4 tokens from 0
    expected = torch.tensor([
        [0, 1, 1, 1, 1, 3, 4, 5, 0, 1, 2, 3, 0, 1, 2, 3],
        [0, 1, 1, 2, 2, 3, 4, 5, 0, 1, 2, 3, 0, 1, 2, 3],
        [0, 1, 2, 1, 2, 3, 4, 5, 0, 1, 2, 3, 0, 1, 2, 3],
    ])
    assert batch.mrope_position_ids.dtype == torch.int64
    torch.testing.assert_close(batch.mrope_position_ids, expected, rtol=0, atol=0)


def test_text_only_pack_rows_equal_the_1d_position_ids():
    docs = [_doc([TEXT] * 5, [], []), _doc([TEXT] * 2, [], [])]
    batch = pack_tokenized(docs, 12, PAD, pad_to_multiple=4, position_rule=keye_position_ids)
    one_d = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3])  # spans 8, 4; no tail
    torch.testing.assert_close(batch.position_ids[0], one_d, rtol=0, atol=0)
    torch.testing.assert_close(batch.mrope_position_ids, one_d.expand(3, -1), rtol=0, atol=0)


def test_without_a_rule_the_field_is_none():
    batch = pack_tokenized([_image_doc()], 8, PAD)
    assert batch.mrope_position_ids is None
    assert batch.vision is not None


def test_vision_blocks_one_per_frame_or_one_per_pooled_chunk():
    # Keye-style: a 2-frame item with its own tokens per frame (t*h*w/4 = 2 * 2 placeholders)
    keye = _doc([TEXT] + [VID] * 4, [(1, 4)], [_chunk(2, 2, 4)])
    assert vision_blocks(keye) == [VisionBlock(start=1, rows=1, cols=2),
                                   VisionBlock(start=3, rows=1, cols=2)]
    # Kimi-style: 4 frames pooled into one grid of h*w/4 = 2 placeholders
    kimi = _doc([TEXT] + [VID] * 2 + [TEXT], [(1, 2)], [_chunk(4, 2, 4)])
    assert vision_blocks(kimi) == [VisionBlock(start=1, rows=1, cols=2)]
    bad = _doc([TEXT] + [VID] * 3, [(1, 3)], [_chunk(2, 2, 4)])
    with pytest.raises(ValueError, match="whole number"):
        vision_blocks(bad)


def test_a_rule_returning_the_wrong_shape_is_refused():
    def flat_rule(tokens, blocks):
        return np.arange(len(tokens), dtype=np.int64)[None]

    with pytest.raises(ValueError, match=r"int64 \[3, 6\]"):
        pack_mrope_position_ids([_image_doc()], [0, 8], 8, flat_rule)


def test_cp2_split_keeps_each_token_with_its_ids():
    # two documents of spans 8 and 8 (multiples of 2*cp = 4): chunks of 2 tokens per document;
    # rank 0 holds chunks 0 and 3 of each, rank 1 chunks 1 and 2
    docs = [_image_doc(), _doc([TEXT] * 7, [], [])]
    batch = pack_tokenized(docs, 16, PAD, pad_to_multiple=4, position_rule=keye_position_ids)
    ids = batch.mrope_position_ids  # [3, 16]
    local = {0: [0, 1, 6, 7, 8, 9, 14, 15], 1: [2, 3, 4, 5, 10, 11, 12, 13]}
    for rank in (0, 1):
        layout = context_parallel_layout(batch.cu_seqlens_padded, 16, 2, rank)
        assert layout.local_index.tolist() == local[rank]
        mine = split_for_context_parallel(ids, layout.local_index, dim=-1)
        assert mine.shape == (3, 8)
        torch.testing.assert_close(mine, ids[:, local[rank]], rtol=0, atol=0)
        # the tokens at those places are the ones these ids belong to
        tokens = split_for_context_parallel(batch.tokens, layout.local_index, dim=1)
        torch.testing.assert_close(tokens[0], batch.tokens[0, local[rank]], rtol=0, atol=0)
    # the ids written out: rank 0 holds doc 0's tokens 0,1 (text 0, image (1,1,1)) and 6,7
    # (padding 4, 5), doc 1's tokens 0,1,6,7; rank 1 doc 0's tokens 2..5 (image (1,1,2),
    # (1,2,1), (1,2,2), text 3) and doc 1's tokens 2..5
    expected = {
        0: [[0, 1, 4, 5, 0, 1, 6, 7], [0, 1, 4, 5, 0, 1, 6, 7], [0, 1, 4, 5, 0, 1, 6, 7]],
        1: [[1, 1, 1, 3, 2, 3, 4, 5], [1, 2, 2, 3, 2, 3, 4, 5], [2, 1, 2, 3, 2, 3, 4, 5]],
    }
    parts = []
    for rank in (0, 1):
        index = context_parallel_layout(batch.cu_seqlens_padded, 16, 2, rank).local_index
        parts.append(split_for_context_parallel(ids, index, dim=-1))
        torch.testing.assert_close(parts[-1], torch.tensor(expected[rank]), rtol=0, atol=0)
    torch.testing.assert_close(unsplit_context_parallel(parts, batch.cu_seqlens_padded, 16, -1),
                               ids, rtol=0, atol=0)


def test_prepacked_files_keep_the_ids():
    batch = pack_tokenized([_image_doc()], 8, PAD, position_rule=keye_position_ids)
    back = batch_from_dict(batch_to_dict(batch))
    torch.testing.assert_close(back.mrope_position_ids, batch.mrope_position_ids, rtol=0, atol=0)
    assert batch_from_dict(batch_to_dict(pack_tokenized([_image_doc()], 8, PAD))
                           ).mrope_position_ids is None
