"""Vision probes: frame reversal plays each whole video backwards (re-cut into the same chunk
sizes), is a no-op exactly where time carries nothing (static or palindromic videos), never
touches images; the direction-word loss mask picks the right positions.

Videos are built with the data pipeline's own chunker (``chunk_frames``) and packer
(``pack_tokenized``), so the chunk membership the probe reads is the one training batches carry;
the expected pixels come from reversing the raw frames and chunking them again.
"""

from __future__ import annotations

import copy
import io

import numpy as np
import PIL.Image
import pytest
import torch

from megatron_vlm.data.contract import PackedBatch
from megatron_vlm.data.image import ProcessedImage, process_image
from megatron_vlm.data.mm_packing import pack_tokenized
from megatron_vlm.data.templates import MediaTokenIds, Text, tokenize_interleaved
from megatron_vlm.data.video import ProcessedVideo, chunk_frames
from megatron_vlm.training.probes import (
    count_changed_items,
    only_changed_documents,
    phrase_targets,
    restrict_loss,
    reverse_frames,
    shuffle_media,
    video_items,
)

IDS = MediaTokenIds(media_begin=900, media_content=901, media_end=902, image_placeholder=903,
                    video_placeholder=904)


class _Tok:
    """Characters as ids (enough for the templates)."""

    def encode(self, text: str) -> list[int]:
        return [ord(c) % 800 for c in text]


def _frames(kind: str, num: int, seed: int = 0) -> np.ndarray:
    """[num, 56, 56, 3] uint8: ``moving`` (a square sliding right), ``static``, ``palindrome``."""
    rng = np.random.default_rng(seed)
    background = rng.integers(0, 256, size=(56, 56, 3), dtype=np.uint8)
    frames = np.repeat(background[None], num, axis=0)
    if kind == "moving":
        for f in range(num):
            frames[f, 20:36, 4 + 6 * f : 20 + 6 * f] = 255
    elif kind == "palindrome":
        for f in range(num):
            x = 4 + 6 * min(f, num - 1 - f)
            frames[f, 20:36, x : x + 16] = 255
    return frames


def _video(frames: np.ndarray) -> ProcessedVideo:
    chunks = chunk_frames(frames, np.arange(len(frames)) / 2.0, max_patches=64)
    return ProcessedVideo(chunks=chunks, fps=2.0, total_frames=len(frames))


def _doc(*media):
    segments = [Text("a document with media:")]
    for m in media:
        segments += [m, Text(" and")]
    return tokenize_interleaved(segments, _Tok(), IDS)


def _batch(*media) -> PackedBatch:
    return pack_tokenized([_doc(*media)], 512, pad_id=0)


def _image(seed: int) -> ProcessedImage:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    PIL.Image.fromarray(rng.integers(0, 256, (56, 84, 3), dtype=np.uint8)).save(buf, "PNG")
    return process_image(buf.getvalue(), max_patches=256)


def test_six_frame_video_is_played_backwards_in_the_same_chunk_sizes():
    moving = _frames("moving", 6)
    image = _image(1)
    batch = _batch(image, _video(moving), _video(_frames("moving", 5, seed=2)))
    vision = batch.vision
    assert vision.grid_thw[:, 0].tolist() == [1, 4, 2, 4, 1]  # image, 4+2, 4+1
    assert vision.media_index.tolist() == [0, 1, 1, 2, 2]
    assert video_items(vision) == [[1, 2], [3, 4]]

    (rev,) = reverse_frames([batch])
    # Expected: the raw frames reversed (6,5,4,3 | 2,1) and chunked by the data pipeline again.
    second = _frames("moving", 5, 2)
    want = torch.cat([c.pixel_values for c in _video(moving[::-1].copy()).chunks]
                     + [c.pixel_values for c in _video(second[::-1].copy()).chunks])
    bounds = vision.cu_seqlens.tolist()
    assert torch.equal(rev.vision.pixel_values[bounds[1]:], want)
    assert torch.equal(rev.vision.pixel_values[: bounds[1]], vision.pixel_values[: bounds[1]])
    assert torch.equal(rev.vision.grid_thw, vision.grid_thw)
    assert torch.equal(rev.tokens, batch.tokens) and torch.equal(rev.loss_mask, batch.loss_mask)
    # The reversed video's first chunk is not the old first chunk with its frames flipped
    # (what reversing inside each chunk would give): the chunk order changed too.
    first = vision.pixel_values[bounds[1] : bounds[2]].reshape(4, -1, 3, 14, 14)
    assert not torch.equal(rev.vision.pixel_values[bounds[1] : bounds[2]],
                           first.flip(0).reshape(-1, 3, 14, 14))
    assert count_changed_items([batch], [rev]) == 4  # all four chunks, not the image
    # Twice is the identity.
    assert torch.equal(reverse_frames([rev])[0].vision.pixel_values, vision.pixel_values)


@pytest.mark.parametrize("kind,num", [("static", 6), ("palindrome", 7), ("palindrome", 8)])
def test_reversal_is_a_no_op_where_time_carries_nothing(kind, num):
    batch = _batch(_video(_frames(kind, num)), _image(3))
    (rev,) = reverse_frames([batch])
    assert count_changed_items([batch], [rev]) == 0
    assert torch.equal(rev.vision.pixel_values, batch.vision.pixel_values)


def test_a_video_of_two_frame_sizes_reverses_each_size_among_its_slots():
    # SlowFast (Keye): one video's slow and fast frames have different grids. Built here as
    # two clips of different sizes recorded as one video: each size's frames are played
    # backwards in its own slots, exactly as if they were two videos.
    small = _frames("moving", 6)
    big = np.repeat(np.repeat(_frames("moving", 5, seed=2), 2, axis=1), 2, axis=2)
    two_videos = _batch(_video(small), _video(big))
    assert len({tuple(g) for g in two_videos.vision.grid_thw[:, 1:].tolist()}) == 2
    one_video = copy.deepcopy(two_videos)
    one_video.vision.media_index = torch.zeros_like(one_video.vision.media_index)
    assert video_items(one_video.vision) == [[0, 1], [2, 3]]
    (rev,) = reverse_frames([one_video])
    (want,) = reverse_frames([two_videos])
    assert count_changed_items([one_video], [rev]) == 4
    assert torch.equal(rev.vision.pixel_values, want.vision.pixel_values)


def test_reversal_refuses_batches_without_video_membership():
    batch = _batch(_video(_frames("moving", 6)))
    batch.vision.media_index = None
    with pytest.raises(ValueError, match="media_index"):
        reverse_frames([batch])


def test_shuffle_moves_media_between_samples_only_within_a_grid():
    batches = [_batch(_image(k), _video(_frames("moving", 6, seed=k))) for k in range(3)]
    shuffled = shuffle_media(batches)
    assert count_changed_items(batches, shuffled) == 9  # 3 images + 3 x 2 chunks all moved
    pool = {bytes(b.vision.pixel_values.numpy()) for b in batches}
    assert all(torch.equal(s.vision.grid_thw, b.vision.grid_thw)
               for s, b in zip(shuffled, batches))
    assert pool != {bytes(s.vision.pixel_values.numpy()) for s in shuffled}


def test_phrase_targets_mark_the_positions_that_predict_the_word():
    tokens = torch.tensor([5, 1, 2, 7, 8, 1, 2, 9, 1, 3, 7, 8])
    # prefix [1, 2]; words [7, 8] and [9]: targets at 3-4 and 7 -> input positions 2-3 and 6.
    mask = phrase_targets(tokens, [1, 2], [[7, 8], [9]])
    assert mask.nonzero().flatten().tolist() == [2, 3, 6]


def test_restrict_loss_keeps_only_those_positions_already_in_the_loss():
    batch = _batch(_image(0))
    text = batch.tokens[0].tolist()
    prefix, word = _Tok().encode("with"), _Tok().encode(" media")
    only = restrict_loss([batch], prefix, [word])[0]
    kept = only.loss_mask[0].nonzero().flatten().tolist()
    start = next(j for j in range(len(text)) if text[j : j + len(prefix + word)] == prefix + word)
    first = start + len(prefix) - 1  # predicts the word's first token
    assert kept == list(range(first, first + len(word)))
    assert torch.equal(batch.loss_mask[0, kept], torch.ones(len(kept)))
    assert only.vision is batch.vision and torch.equal(only.tokens, batch.tokens)


def test_only_changed_documents_keeps_the_loss_of_documents_whose_media_moved():
    docs = [_doc(_image(0)), _doc(_video(_frames("moving", 6))), _doc(_video(_frames("static", 5)))]
    batch = pack_tokenized(docs, 1024, pad_id=0)
    (rev,) = reverse_frames([batch])
    (kept,) = only_changed_documents([batch], [rev])
    bounds = batch.cu_seqlens_padded.tolist()
    inside = torch.zeros_like(batch.loss_mask)
    inside[0, bounds[1] : bounds[2]] = 1  # only the moving video's document changed
    assert torch.equal(kept.loss_mask, batch.loss_mask * inside)
    assert 0 < kept.num_loss_tokens < batch.num_loss_tokens
