"""Clip spans stored as stream-copied segments (video_remux.py, records.py).

Real libx264 clips with B-frames (``bf=2``) and 8-frame GOPs (4 GOPs in 3.2 s at 10 fps), in MP4
and Matroska: the frames decoded for a span from its segment equal (pixels and count) those
decoded from the whole file, by every backend, for spans in the middle, at the start and at the
end; a segment holds only the GOPs the span needs. Each frame carries its index as a grey marker,
so the decoded frames are checked to be the right source frames independently of the code.
"""

from __future__ import annotations

import csv
import io
import json

import numpy as np
import pytest

from megatron_vlm.data import records
from megatron_vlm.data.records import normalize_record
from megatron_vlm.data.sources import iter_input
from megatron_vlm.data.video import clip_frame_range, decode_video
from megatron_vlm.data.video_remux import cut_clip, rebased_clip

FPS, FRAMES, GOP = 10, 32, 8
BACKENDS = ("pyav", "decord")


def _frames() -> np.ndarray:
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (64, 96, 3), dtype=np.uint8)  # noise: frames cost real bytes
    out = np.stack([np.roll(base, 3 * i, axis=1) for i in range(FRAMES)])
    out[:, :16, :16] = (np.arange(FRAMES) * 7)[:, None, None, None]  # frame index marker
    return out


def _encode(fmt: str) -> bytes:
    """libx264 with 2 B-frames and a fixed 8-frame GOP (closed, no scene cuts)."""
    import av

    buf = io.BytesIO()
    with av.open(buf, "w", format=fmt) as container:
        stream = container.add_stream("libx264", rate=FPS)
        stream.height, stream.width = 64, 96
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "18", "preset": "veryfast", "threads": "1", "g": str(GOP),
                          "keyint_min": str(GOP), "bf": "2", "sc_threshold": "0"}
        for frame in _frames():
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


@pytest.fixture(scope="module")
def sources() -> dict[str, bytes]:
    return {"mp4": _encode("mp4"), "mkv": _encode("matroska")}


def _packets(data: bytes) -> list[tuple[int, bool]]:
    import av

    with av.open(io.BytesIO(data)) as container:
        return [(p.pts, p.is_keyframe) for p in container.demux(container.streams.video[0])
                if p.size]


def _format(data: bytes) -> str:
    import av

    with av.open(io.BytesIO(data)) as container:
        return container.format.name


# (clip, source frames in the span, first source frame of the segment = its keyframe)
SPANS = {"middle": ((1.25, 2.05), range(13, 21), 8),
         "start": ((0.0, 0.55), range(0, 6), 0),
         "end": ((2.6, 9.0), range(26, 32), 24)}


@pytest.mark.parametrize("ext", ["mp4", "mkv"])
@pytest.mark.parametrize("where", list(SPANS))
def test_segment_decodes_the_same_frames(sources, ext, where):
    clip, want, seg_first = SPANS[where]
    data = sources[ext]
    pts_decode_order = [p for p, _ in _packets(data)]
    assert pts_decode_order != sorted(pts_decode_order)  # B-frames: decode order != display
    segment, new_clip = cut_clip(data, ext, clip)
    assert _format(segment) == _format(data)  # same container
    assert new_clip[0] == pytest.approx(max(0.0, clip[0] - seg_first / FPS))
    assert new_clip[1] == pytest.approx(clip[1] - seg_first / FPS)
    gops = -(-(want[-1] + 1 - seg_first) // GOP)  # GOPs from the keyframe to the span's end
    assert len(_packets(segment)) == gops * GOP and _packets(segment)[0] == (0, True)
    for backend in BACKENDS:
        whole = decode_video(data, fps=FPS, max_frames=None, backend=backend, clip=clip)
        cut = decode_video(segment, fps=FPS, max_frames=None, backend=backend, clip=new_clip)
        assert whole.frame_indices.tolist() == list(want)
        assert cut.frame_indices.tolist() == [i - seg_first for i in want]
        assert cut.fps == whole.fps == FPS
        assert cut.frames.shape == whole.frames.shape and np.array_equal(cut.frames, whole.frames)
        markers = cut.frames[:, 4:12, 4:12].mean(axis=(1, 2, 3))
        assert np.abs(markers - np.array(want) * 7).max() < 4  # the right source frames
        # the uniform 2 fps rule over the span samples the same source frames
        sampled = decode_video(segment, fps=2.0, max_frames=None, backend=backend, clip=new_clip)
        ref = decode_video(data, fps=2.0, max_frames=None, backend=backend, clip=clip)
        assert (sampled.frame_indices + seg_first).tolist() == ref.frame_indices.tolist()
        assert np.array_equal(sampled.frames, ref.frames)


def test_mid_span_is_small_and_whole_file_fallbacks(sources):
    data = sources["mp4"]
    segment, new_clip = cut_clip(data, "mp4", (0.9, 1.5))  # frames 9..14: the second GOP only
    assert len(_packets(segment)) == GOP
    assert len(segment) < 0.6 * len(data)
    assert len(segment) < 0.4 * len(data)  # one GOP of four (plus the container's header)
    assert cut_clip(data, "mp4", (0.0, 3.2)) is None  # every GOP needed: stored whole
    assert cut_clip(data, "avi", (0.9, 1.5)) is None  # a container we do not remux
    assert cut_clip(data[:2000], "mp4", (0.9, 1.5)) is None  # no index to cut by


def test_rebased_clip_nudged_when_rounding_moves_a_frame():
    fps = 30000 / 1001
    clip = (0.36703336670000003, 2.3670333667)  # start a hair past frame 11's 1e-6 tolerance
    first, end = clip_frame_range(10**6, fps, clip)
    assert (first, end) == (12, 71)
    # plain subtraction rounds the start back across the tolerance: frame 3 (= 11) comes in
    assert clip_frame_range(10**6, fps, (clip[0] - 8 / fps, clip[1] - 8 / fps)) == (3, 63)
    nudged = rebased_clip(clip, fps, first, end, seg_first=8, seg_frames=10**6)
    assert nudged == pytest.approx((3.5 / fps, 62.5 / fps))
    assert clip_frame_range(10**6, fps, nudged) == (4, 63)
    exact = rebased_clip((1.25, 2.05), 10.0, 13, 21, seg_first=8, seg_frames=16)
    assert exact == (1.25 - 0.8, 2.05 - 0.8)


def test_panda_spans_store_segments(tmp_path, sources, monkeypatch):
    (tmp_path / "vid.mp4").write_bytes(sources["mp4"])
    with open(tmp_path / "panda.csv", "w", newline="") as f:
        csv.writer(f).writerows([
            ["videoID", "url", "timestamp", "caption"],
            ["vid", "u", "[['0:00:01.250', '0:00:02.050'], ['0:00:00.000', '0:00:00.550']]",
             "['mid', 'first']"]])
    calls = {"check": 0}
    real_check = records.run_media_check

    def counting_check(*args, **kwargs):
        calls["check"] += 1
        return real_check(*args, **kwargs)

    monkeypatch.setattr(records, "run_media_check", counting_check)
    records._CHECKED_FILES.clear()
    samples = [normalize_record(load(), tmp_path) for _, load in iter_input(tmp_path / "panda.csv")]
    assert calls["check"] == 1  # one media check for the file, however many spans
    for sample, (clip, want, seg_first) in zip(samples, (SPANS["middle"], SPANS["start"])):
        item = sample.media[0]
        assert len(item.data) < 0.6 * len(sources["mp4"])
        meta = json.loads(sample.to_members("k")["k.json"])["media"][0]
        assert meta["clip"] == pytest.approx([max(0.0, clip[0] - seg_first / FPS),
                                              clip[1] - seg_first / FPS])
        cut = decode_video(item.data, fps=FPS, max_frames=None, backend="pyav",
                          clip=tuple(meta["clip"]))
        whole = decode_video(sources["mp4"], fps=FPS, max_frames=None, backend="pyav", clip=clip)
        assert np.array_equal(cut.frames, whole.frames) and len(cut.frames) == len(want)
