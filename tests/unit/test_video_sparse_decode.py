"""PyAV's sparse sampled decoding (``data/video_pyav.py``): frames placed by presentation
timestamp, non-reference frames skipped, keyframe seeks -- the same pixels as a full in-order
decode and as decord, and the in-order fallback when the index cannot place a frame.

Clips are H.264 with B-frames (x264 ``veryfast``: 3 B-frames, some used as references) and a
short GOP (a keyframe every 8 frames), 64x48 px of moving noise, so every frame differs.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest

from megatron_vlm.data import video as video_mod
from megatron_vlm.data.video import _decode_in_order, decode_video, read_timing
from megatron_vlm.data.video_pyav import decode_sampled

av = pytest.importorskip("av")
W, H, FPS, FRAMES = 64, 48, 30, 90


def make_clip(path: Path, gop: int) -> Path:
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (H, W * 3, 3), dtype=np.uint8)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        stream.options = {"preset": "veryfast", "crf": "20", "g": str(gop),
                          "keyint_min": str(gop), "bf": "3"}
        for i in range(FRAMES):
            img = base[:, i:i + W].copy()
            img[rng.integers(0, H), :] = 255  # a line that jumps: no two frames alike
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("sparse")
    return {"gop8": make_clip(d / "gop8.mp4", 8), "gop250": make_clip(d / "gop250.mp4", 250)}


def in_order(path: Path, indices: np.ndarray) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack(_decode_in_order(container, container.streams.video[0], indices))


@pytest.mark.parametrize("name", ["gop8", "gop250"])
@pytest.mark.parametrize("fps", [2.0, 7.0, 30.0])
def test_sparse_frames_equal_a_full_decode(clips, name, fps):
    timing = read_timing(clips[name])
    assert len(timing.frame_pts) == FRAMES and timing.keyframe_pts[0] == timing.frame_pts[0]
    assert len(timing.keyframe_pts) == (-(-FRAMES // 8) if name == "gop8" else 1)
    indices = video_mod.sample_frame_indices(FRAMES, FPS, fps, None)
    with av.open(str(clips[name])) as container:
        frames = decode_sampled(container, container.streams.video[0], indices,
                                timing.frame_pts, timing.keyframe_pts)
    assert frames is not None and len(frames) == len(indices)
    want = in_order(clips[name], indices)
    assert np.array_equal(np.stack(frames), want)
    # The frames differ from each other, so a wrong frame would not pass unnoticed.
    assert len({f.tobytes() for f in want}) == len(want)


def test_auto_picks_pyav_when_sparse_and_equals_decord(clips):
    pytest.importorskip("decord")
    sparse = decode_video(clips["gop8"], fps=2.0)
    assert sparse.backend == "pyav" and sparse.frame_indices.tolist() == [0, 15, 30, 45, 60, 75]
    dense = decode_video(clips["gop8"], fps=30.0, max_frames=None)
    assert dense.backend == "decord"  # every frame sampled: nothing to skip
    for name in clips:
        a = decode_video(clips[name], fps=2.0, backend="pyav")
        b = decode_video(clips[name], fps=2.0, backend="decord")
        assert np.array_equal(a.frames, b.frames)


def test_unplaceable_frames_fall_back_to_in_order(clips, monkeypatch):
    """An index whose timestamps the stream never shows (here: shifted by half a frame) makes
    the sparse decoder give up; the in-order decode still returns the right frames."""
    path = clips["gop8"]
    timing = read_timing(path)
    step = timing.frame_pts[1] - timing.frame_pts[0]
    shifted = tuple(p + step // 2 for p in timing.frame_pts)
    indices = video_mod.sample_frame_indices(FRAMES, FPS, 2.0, None)
    with av.open(str(path)) as container:
        assert decode_sampled(container, container.streams.video[0], indices, shifted,
                              timing.keyframe_pts) is None
    bad = dataclasses.replace(timing, frame_pts=shifted)
    monkeypatch.setattr(video_mod, "read_timing", lambda source: bad)
    out = decode_video(path, fps=2.0, backend="pyav")
    assert np.array_equal(out.frames, in_order(path, indices))


@pytest.mark.parametrize("name, codec, options", [
    ("open_gop.mkv", "libx264", {"preset": "veryfast",
                                 "x264-params": "keyint=10:open-gop=1:bframes=3"}),
    ("vp9.webm", "libvpx-vp9", {"g": "10", "lag-in-frames": "25", "auto-alt-ref": "1"}),
])
def test_other_containers_and_codecs(tmp_path, name, codec, options):
    """Matroska/WebM indexes, an open GOP (non-IDR keyframes) and VP9's hidden alt-ref frames:
    the sparse decoder places every sampled frame and returns the full decode's pixels."""
    path = tmp_path / name
    rng = np.random.default_rng(1)
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=FPS)
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        stream.options = options
        for i in range(40):
            img = rng.integers(0, 256, (H, W, 3), dtype=np.uint8) // 4 + (i * 5) % 192
            for packet in stream.encode(av.VideoFrame.from_ndarray(img.astype(np.uint8),
                                                                   format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    timing = read_timing(path)
    assert len(timing.keyframe_pts) >= 4
    indices = video_mod.sample_frame_indices(40, FPS, 7.0, None)
    with av.open(str(path)) as container:
        frames = decode_sampled(container, container.streams.video[0], indices,
                                timing.frame_pts, timing.keyframe_pts)
    assert frames is not None
    assert np.array_equal(np.stack(frames), in_order(path, indices))
