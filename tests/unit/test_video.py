"""Video decoding (decord / PyAV), fps sampling, 4-frame chunks with a short last chunk, bad input.

Clips are H.264 encoded here with PyAV's bundled libx264 (offline): 64x48 px, a yellow 16x16 square
moving 2 px right per frame on a dark background.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hf_processor_fixture import kimi_processor_arrays, kimi_processor_fixture

from megatron_vlm.data import video as video_mod
from megatron_vlm.data.image import process_image
from megatron_vlm.data.media_errors import MediaDecodeError, SkipCounter, SkipReason
from megatron_vlm.data.video import (
    chunk_frames,
    decode_video,
    process_video,
    sample_frame_indices,
)

av = pytest.importorskip("av")
W, H = 64, 48
STEP = 2  # px per frame: the square stays inside the frame for 16 frames


def square_frame(i: int) -> np.ndarray:
    img = np.full((H, W, 3), 40, dtype=np.uint8)
    x = 4 + STEP * i
    img[10:26, x : x + 16] = (250, 200, 30)
    return img


def make_clip(path: Path, num_frames: int, fps: int) -> Path:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        stream.options = {"crf": "18", "preset": "ultrafast", "tune": "zerolatency"}
        for i in range(num_frames):
            frame = av.VideoFrame.from_ndarray(square_frame(i), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("clips")
    return {
        "six": make_clip(d / "six.mp4", 6, 2),
        "nine": make_clip(d / "nine.mp4", 9, 2),
        "sixteen_at_8fps": make_clip(d / "sixteen.mp4", 16, 8),
    }


def square_x(frame: np.ndarray) -> float:
    """Centre column of the yellow square (red > 150 only there)."""
    mask = frame[:, :, 0] > 150
    return float(np.nonzero(mask)[1].mean())


# ------------------------------------------------------------------------------------ decoding


def test_decord_equals_pyav(clips):
    pytest.importorskip("decord")
    for path in clips.values():
        a = decode_video(path, backend="decord")
        b = decode_video(path, backend="pyav")
        assert a.backend == "decord" and b.backend == "pyav"
        assert np.array_equal(a.frames, b.frames)
        assert np.array_equal(a.frame_indices, b.frame_indices)
        np.testing.assert_allclose(a.timestamps, b.timestamps, atol=5e-7)
        assert a.fps == b.fps and a.total_frames == b.total_frames


def test_frames_in_order_and_timestamps(clips):
    v = decode_video(clips["nine"])
    assert v.frames.shape == (9, H, W, 3) and v.frames.dtype == np.uint8
    assert v.total_frames == 9 and v.fps == 2.0
    np.testing.assert_allclose(v.timestamps, np.arange(9) * 0.5)
    xs = [square_x(f) for f in v.frames]
    np.testing.assert_allclose(xs, [4 + STEP * i + 7.5 for i in range(9)], atol=1.0)


def test_fps_sampling(clips):
    v = decode_video(clips["sixteen_at_8fps"], fps=2)
    # 16 frames at 8 fps = 2 s -> int(16 / 8 * 2) = 4 frames at arange(4) * 16 // 4.
    assert v.frame_indices.tolist() == [0, 4, 8, 12]
    np.testing.assert_allclose(v.timestamps, [0.0, 0.5, 1.0, 1.5])
    xs = [square_x(f) for f in v.frames]
    np.testing.assert_allclose(xs, [4 + STEP * i + 7.5 for i in (0, 4, 8, 12)], atol=1.0)
    # Frame budget caps the count with the same uniform rule.
    v2 = decode_video(clips["sixteen_at_8fps"], fps=8, max_frames=5)
    assert v2.frame_indices.tolist() == [0, 3, 6, 9, 12]


def test_sample_indices_equal_hf():
    video_utils = pytest.importorskip("transformers.video_utils")
    for total, src_fps, fps in [(16, 8.0, 2), (300, 29.97, 2), (1000, 30.0, 2), (7, 24.0, 2),
                                (121, 25.0, 1.5), (90, 30.0, 2)]:
        meta = video_utils.VideoMetadata(total_num_frames=total, fps=src_fps)
        want = video_utils.default_sample_indices_fn(meta, fps=fps)
        got = sample_frame_indices(total, src_fps, fps, max_frames=None)
        assert got.tolist() == list(want), (total, src_fps, fps)
        meta.frames_indices = want
        np.testing.assert_allclose(got / src_fps, meta.timestamps)
    # Target above the source rate: HF raises, we keep every frame.
    assert sample_frame_indices(5, 1.0, 2.0).tolist() == [0, 1, 2, 3, 4]


def test_pyav_fallback_when_decord_missing_or_failing(clips, monkeypatch):
    monkeypatch.setitem(sys.modules, "decord", None)  # import decord -> ImportError
    v = decode_video(clips["six"])
    assert v.backend == "pyav" and v.frames.shape[0] == 6

    def broken(*args, **kwargs):
        raise RuntimeError("decord broke")

    monkeypatch.setattr(video_mod, "_decode_decord", broken)
    assert decode_video(clips["six"]).backend == "pyav"


def test_decode_from_bytes(clips):
    data = clips["six"].read_bytes()
    a = decode_video(data)
    b = decode_video(clips["six"])
    assert np.array_equal(a.frames, b.frames)


# ------------------------------------------------------------------------------------ chunking


@pytest.mark.parametrize(
    "name, lengths, stamps", [("six", [4, 2], [0.0, 2.0]), ("nine", [4, 4, 1], [0.0, 2.0, 4.0])]
)
def test_chunks_short_last_chunk(clips, name, lengths, stamps):
    v = process_video(clips[name])
    # 64x48 px: 4*3 whole patches <= 4096 -> no resize; padded to 84x56 -> grid 4 x 6 patches.
    assert [c.grid_thw for c in v.chunks] == [(t, 4, 6) for t in lengths]
    assert [c.timestamp for c in v.chunks] == stamps
    assert [c.pixel_values.shape[0] for c in v.chunks] == [t * 24 for t in lengths]
    assert [c.num_tokens for c in v.chunks] == [6] * len(lengths)  # h*w/4 per chunk, any t
    assert v.num_tokens == 6 * len(lengths)
    assert v.num_patches == 24 * sum(lengths)
    # (frame, row, col) order: frame j of a chunk is that frame processed as an image.
    decoded = decode_video(clips[name])
    for c_idx, chunk in enumerate(v.chunks):
        for j in range(chunk.grid_thw[0]):
            frame = decoded.frames[4 * c_idx + j]
            want = process_image(frame, max_patches=4096).pixel_values
            assert np.array_equal(chunk.pixel_values[j * 24 : (j + 1) * 24].numpy(), want.numpy())
        assert chunk.frame_timestamps == tuple(decoded.timestamps[4 * c_idx : 4 * c_idx + 4])


@pytest.mark.parametrize("name, num_frames", [("six", 6), ("nine", 9)])
def test_six_and_nine_frame_videos_follow_the_hf_processor(clips, name, num_frames):
    """Frame sampling, chunk count, grids, patches, pixel values, placeholder tokens and the prompt
    text of real 6- and 9-frame clips equal transformers' Kimi K2.5 video processor and processor
    (tests/fixtures: the processors ran on the clip's frames with their 2 fps metadata)."""
    from megatron_vlm.data.templates import VIDEO_PLACEHOLDER, render_text

    fixture = kimi_processor_fixture()
    (case,) = [c for c in fixture["videos"] if c["name"] == name]
    rules = fixture["video_processor"]
    assert (rules["fps"], rules["max_patches"], rules["temporal_patch_size"]) == (2, 4096, 4)
    v = process_video(clips[name])
    assert v.frame_indices.tolist() == case["frames_indices"]
    assert [list(c.grid_thw) for c in v.chunks] == case["video_grid_thw"]
    assert len(v.chunks) == case["num_chunks_per_video"][0] == -(-num_frames // 4)
    assert render_text([v]) == case["prompt_text"]
    assert v.num_tokens == case["prompt_text"].count(VIDEO_PLACEHOLDER)
    # Pixels: the same frames (before the codec) through our chunker equal HF's, bit for bit
    # up to float rounding; the decoded clip is lossy, so this uses the source frames.
    frames = np.stack([square_frame(i) for i in range(num_frames)])
    chunks = chunk_frames(frames, list(range(num_frames)), max_patches=rules["max_patches"])
    ours = torch.cat([c.pixel_values for c in chunks])
    want = torch.from_numpy(kimi_processor_arrays()[f"video_{name}_pixels"])
    assert ours.shape == want.shape
    torch.testing.assert_close(ours, want, atol=1e-6, rtol=0)
    assert v.num_patches == want.shape[0]


def test_chunk_budget_is_per_frame():
    # 448x448 px = 32x32 = 1024 patches per frame; budget 256 -> scale 0.5 -> 224 px -> 16x16.
    frames = np.zeros((5, 448, 448, 3), dtype=np.uint8)
    chunks = chunk_frames(frames, [0, 1, 2, 3, 4], max_patches=256)
    assert [c.grid_thw for c in chunks] == [(4, 16, 16), (1, 16, 16)]
    assert [c.num_patches for c in chunks] == [4 * 256, 256]
    assert [c.num_tokens for c in chunks] == [64, 64]


# ----------------------------------------------------------------------------------- bad input


def test_corrupt_videos_exact_skip_counts(clips, tmp_path):
    rng = np.random.default_rng(0)
    good = clips["nine"].read_bytes()
    samples, expected_ok = [], 0
    expected = {SkipReason.VIDEO_DECODE: 0, SkipReason.MISSING_FILE: 0}
    for i in range(12):
        kind = i % 4
        if kind == 0:
            samples.append(good)
            expected_ok += 1
        elif kind == 1:
            cut = int(len(good) * rng.uniform(0.2, 0.9))
            samples.append(good[:cut])  # truncated MP4
            expected[SkipReason.VIDEO_DECODE] += 1
        elif kind == 2:
            samples.append(rng.bytes(int(rng.integers(1, 4000))))  # random bytes
            expected[SkipReason.VIDEO_DECODE] += 1
        else:
            samples.append(tmp_path / f"missing_{i}.mp4")
            expected[SkipReason.MISSING_FILE] += 1
    counter = SkipCounter(warn_every=0)
    out = [counter.guard(process_video, s) for s in samples]
    assert sum(o is not None for o in out) == expected_ok
    assert dict(counter.counts) == expected


def test_truncated_pyav_only_raises_decode_error(clips):
    data = clips["nine"].read_bytes()
    with pytest.raises(MediaDecodeError) as err:
        decode_video(data[: len(data) // 2], backend="pyav")
    assert err.value.reason == SkipReason.VIDEO_DECODE
