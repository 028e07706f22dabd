"""Broken video timing (issue 17 item 5) and clip spans (Panda-70M): real clips written here.

Every clip is encoded with PyAV (libx264 or MJPEG); frame ``i`` is a flat grey of level
``LEVEL * i`` so a decoded frame tells which source frame it is. A zero-timestamp clip has the
pts/dts of every packet set to 0 before muxing (MP4 accepts it): ffmpeg then derives the average
rate from the tiny duration (20 frames read as 200 fps) and, before the repair, the sampler kept
one frame.
"""

from __future__ import annotations

import io
import json

import numpy as np
import pytest

from megatron_vlm.data.kimi_tokenizer import SpecialTokensTokenizer
from megatron_vlm.data.media_errors import BadSampleError, SkipReason
from megatron_vlm.data.mm_encode import EncodeSettings, decode_document, plan_document
from megatron_vlm.data.shards import FORMAT
from megatron_vlm.data.video import decode_video

av = pytest.importorskip("av")
H, W = 48, 64
LEVEL = 6


class _Bytes:
    vocab_size, eos_id, pad_id = 258, 256, 257

    def encode(self, text: str) -> list[int]:
        return list(text.encode())


def encode_clip(num_frames: int, rate: int, codec: str = "libx264",
                zero_pts: bool = False, fmt: str = "mp4") -> bytes:
    buf = io.BytesIO()
    with av.open(buf, mode="w", format=fmt) as container:
        stream = container.add_stream(codec, rate=rate)
        stream.height, stream.width = H, W
        stream.pix_fmt = "yuvj420p" if codec == "mjpeg" else "yuv420p"
        if codec == "libx264":
            stream.options = {"crf": "10", "preset": "ultrafast", "threads": "1"}

        def mux(packets) -> None:
            for packet in packets:
                if zero_pts:
                    packet.pts = packet.dts = 0
                container.mux(packet)

        for i in range(num_frames):
            frame = np.full((H, W, 3), LEVEL * i, np.uint8)
            mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        mux(stream.encode())
    return buf.getvalue()


def source_index(frame: np.ndarray) -> int:
    """Which source frame a decoded frame is (its grey level / LEVEL)."""
    return int(round(float(frame.mean()) / LEVEL))


def uniform(frames: list[int], source_fps: float, fps: float) -> list[int]:
    """HF's uniform rule over a list of source frames (written out here, not imported)."""
    n = min(max(1, int(len(frames) / source_fps * fps)), len(frames))
    return [frames[k * len(frames) // n] for k in range(n)]


def video_record(clip: list[float] | None = None) -> tuple[dict, dict]:
    meta = {"type": "video", "ext": "mp4"}
    if clip is not None:
        meta["clip"] = clip
    record = {"format": FORMAT, "media": [meta],
              "segments": [{"media": 0}, {"text": "grey frames getting lighter"}]}
    return record, {"json": json.dumps(record).encode()}


SETTINGS = EncodeSettings(seq_length=4096, max_patches=8192)
TOK = SpecialTokensTokenizer(_Bytes())


def plan_and_decode(data: bytes, clip: list[float] | None = None):
    record, members = video_record(clip)
    members["m0.mp4"] = data
    doc, media = plan_document(record, members, SETTINGS, TOK, TOK.media_token_ids())
    return doc, media, decode_document(doc, media, SETTINGS)  # raises if plan != decode


@pytest.fixture(scope="module")
def zero_h264() -> bytes:
    return encode_clip(20, 10, zero_pts=True)


@pytest.mark.parametrize("backend", ["auto", "decord", "pyav"])
def test_zero_timestamp_clip_is_repaired_from_the_nominal_rate(zero_h264, backend) -> None:
    """20 frames, pts all 0, H.264 declaring 10 fps: 2 s at 2 fps -> 4 frames 0, 5, 10, 15 at
    0.0, 0.5, 1.0, 1.5 s (one frame before the repair), the right pixels from any backend."""
    with av.open(io.BytesIO(zero_h264)) as c:  # the clip really is broken
        assert {p.pts for p in c.demux(video=0) if p.size} == {0}
    want = uniform(list(range(20)), 10.0, 2.0)
    assert want == [0, 5, 10, 15]
    video = decode_video(zero_h264, backend=backend)
    assert video.timestamps_repaired and video.fps == 10.0
    assert video.frame_indices.tolist() == want
    assert np.allclose(video.timestamps, [i / 10.0 for i in want])
    assert [source_index(f) for f in video.frames] == want


@pytest.mark.parametrize("fmt", ["mp4", "matroska"])
def test_repaired_clip_plans_and_decodes_all_frames(zero_h264, fmt) -> None:
    """Planning sees the repair too: from the MP4 header and demux, and from a decode where
    the header has no frame count (Matroska)."""
    data = zero_h264 if fmt == "mp4" else encode_clip(20, 10, zero_pts=True, fmt=fmt)
    doc, media, decoded = plan_and_decode(data)
    assert media[0].timestamps_repaired
    chunks = [decoded.items[i] for i in media[0].item_indices]
    assert [c.grid_thw[0] for c in chunks] == [4]
    assert chunks[0].frame_timestamps == (0.0, 0.5, 1.0, 1.5)


def test_zero_timestamp_clip_without_a_rate_is_rejected() -> None:
    """MJPEG in MP4 declares no frame rate of its own: nothing to rebuild timestamps from."""
    data = encode_clip(20, 10, codec="mjpeg", zero_pts=True)
    for call in (lambda: decode_video(data), lambda: plan_and_decode(data)):
        with pytest.raises(BadSampleError) as err:
            call()
        assert err.value.reason == SkipReason.BAD_TIMESTAMPS


def test_healthy_clip_is_not_marked_repaired() -> None:
    video = decode_video(encode_clip(20, 10))
    assert not video.timestamps_repaired
    assert video.frame_indices.tolist() == [0, 5, 10, 15]


# --------------------------------------------------------------------------------- clip spans


@pytest.mark.parametrize("backend", ["decord", "pyav"])
def test_clip_span_samples_only_inside_the_span(backend) -> None:
    """40 frames at 10 fps; span [1.25, 3.1) s holds frames 13..30 (18 frames, 1.8 s): 3 frames
    at 2 fps, timestamps from the source's start."""
    data = encode_clip(40, 10)
    inside = [i for i in range(40) if 1.25 <= i / 10 < 3.1]
    want = uniform(inside, 10.0, 2.0)
    assert want == [13, 19, 25]
    video = decode_video(data, backend=backend, clip=(1.25, 3.1))
    assert video.frame_indices.tolist() == want
    assert np.allclose(video.timestamps, [i / 10 for i in want])
    assert [source_index(f) for f in video.frames] == want
    doc, media, decoded = plan_and_decode(data, clip=[1.25, 3.1])
    assert media[0].clip == (1.25, 3.1)
    (chunk,) = [decoded.items[i] for i in media[0].item_indices]
    assert chunk.grid_thw[0] == 3 and np.allclose(chunk.frame_timestamps, [1.3, 1.9, 2.5])


def test_clip_span_outside_the_video_is_skipped() -> None:
    with pytest.raises(BadSampleError) as err:
        plan_and_decode(encode_clip(10, 10), clip=[5.0, 6.0])
    assert err.value.reason == SkipReason.VIDEO_EMPTY


def test_repaired_clips_are_counted_in_the_loader_metrics(tmp_path, zero_h264) -> None:
    """One zero-timestamp clip among healthy ones: prepared, packed and counted once."""
    from megatron_vlm.config.data_mm import MultimodalDataConfig, StageMix
    from megatron_vlm.data.corpus import bundled_corpus_dir
    from megatron_vlm.data.mm_loader import MultimodalLoader
    from megatron_vlm.data.shards import prepare_dataset
    from megatron_vlm.data.tokenizer import get_or_train_tokenizer

    raw = tmp_path / "raw"
    raw.mkdir()
    (raw / "zero.mp4").write_bytes(zero_h264)
    (raw / "ok.mp4").write_bytes(encode_clip(20, 10))
    records = [{"id": "z", "video": "zero.mp4", "caption": "zero clip"},
               {"id": "a", "video": "ok.mp4", "caption": "healthy clip"},
               {"id": "b", "video": "ok.mp4", "caption": "healthy again"}]
    (raw / "v.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    prepare_dataset({"train": [raw / "v.jsonl"]}, tmp_path / "ds" / "v", name="v",
                    progress=False, verbose=False)
    spm = get_or_train_tokenizer(bundled_corpus_dir(), tmp_path / "spm", 1024, 0)
    cfg = MultimodalDataConfig(root=str(tmp_path / "ds"), num_workers=0, shuffle_buffer_size=1,
                               packing_buffer_size=8, mixes={"s": StageMix(weights={"v": 1})},
                               stage="s")
    with MultimodalLoader(cfg, SpecialTokensTokenizer(spm), seq_length=1024,
                          global_batch_size=1, dp_rank=0, dp_size=1, seed=0,
                          one_pass=True) as loader:
        ids = [i for pack in loader.packs() for i in pack.sample_ids]
        metrics = loader.metrics()
    assert sorted(ids) == ["a", "b", "z"]
    assert metrics["data/repaired_timestamps"] == 1.0
    assert metrics["data/samples/video"] == 3.0
