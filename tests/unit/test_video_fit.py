"""Videos fitted to the micro-batch budgets instead of dropped (issue 17 item 3).

Real H.264 clips (PyAV libx264, low bitrate) under the ``kimi_k25`` recipe's data budgets
(4,096 tokens, 8,192 patches, 1,024 patches per frame, 2 fps). The expected per-frame grid and
frame count are found here by a plain scan over the resize rule (``navit_resize``, HF's rule,
tested against HF elsewhere) and HF's uniform sampling written out, not by the search under test.
"""

from __future__ import annotations

import hashlib
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from tiny_runs import load_tool

from megatron_vlm.data.image import PATCH_SIZE, navit_resize
from megatron_vlm.data.kimi_tokenizer import SpecialTokensTokenizer
from megatron_vlm.data.media_errors import BadSampleError, SkipReason
from megatron_vlm.data.mm_encode import EncodeSettings, decode_document, plan_document
from megatron_vlm.data.shards import FORMAT, MANIFEST_NAME
from megatron_vlm.data.video_fit import drop_report
from megatron_vlm.recipes import get_recipe

av = pytest.importorskip("av")
CAPTION = "a yellow box slides to the right"


class _Bytes:
    vocab_size, eos_id, pad_id = 258, 256, 257

    def encode(self, text: str) -> list[int]:
        return list(text.encode())


TOK = SpecialTokensTokenizer(_Bytes())


def h264(num_frames: int, rate: int, height: int, width: int, codec: str = "libx264",
         zero_pts: bool = False) -> bytes:
    """A real clip: a yellow box moving right on grey, ~200 kb/s."""
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream(codec, rate=rate)
        stream.height, stream.width = height, width
        stream.pix_fmt = "yuvj420p" if codec == "mjpeg" else "yuv420p"
        stream.bit_rate = 200_000
        if codec == "libx264":
            stream.options = {"preset": "ultrafast", "threads": "1"}
        for i in range(num_frames):
            frame = np.full((height, width, 3), 40, np.uint8)
            x = (i * 16) % max(width - 64, 1)
            frame[height // 3 : height // 3 + 64, x : x + 64] = (250, 200, 30)
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                if zero_pts:
                    packet.pts = packet.dts = 0
                container.mux(packet)
        for packet in stream.encode():
            if zero_pts:
                packet.pts = packet.dts = 0
            container.mux(packet)
    return buf.getvalue()


def kimi_settings(**changes) -> EncodeSettings:
    data = get_recipe("kimi_k25").data
    s = EncodeSettings.from_config(data.multimodal, data.seq_length, data.pad_to_multiple)
    return EncodeSettings(**{**s.__dict__, **changes})


def grid(height: int, width: int, frame_max_patches: int) -> tuple[int, int]:
    _, (ph, pw) = navit_resize(height, width, max_patches=frame_max_patches)
    return ph // PATCH_SIZE, pw // PATCH_SIZE


def uniform(total: int, source_fps: float, fps: float) -> list[int]:
    n = min(max(1, int(total / source_fps * fps)), total)
    return [k * total // n for k in range(n)]


def sample(data: bytes, caption: str = CAPTION) -> tuple[dict, dict]:
    record = {"format": FORMAT, "media": [{"type": "video", "ext": "mp4"}],
              "segments": [{"media": 0}, {"text": caption}]}
    return record, {"json": json.dumps(record).encode(), "m0.mp4": data}


def plan(data: bytes, settings: EncodeSettings):
    record, members = sample(data)
    return plan_document(record, members, settings, TOK, TOK.media_token_ids())


@pytest.fixture(scope="module")
def clip_720p_10s() -> bytes:
    return h264(40, 4, 720, 1280)  # 10 s at 4 fps: 20 frames at the recipe's 2 fps


def test_720p_10s_clip_under_kimi_k25_is_fitted_by_resolution(clip_720p_10s) -> None:
    s = kimi_settings()
    assert (s.seq_length, s.max_patches, s.video_chunk_max_patches) == (4096, 8192, 1024)
    frames = uniform(40, 4.0, 2.0)
    assert len(frames) == 20
    h0, w0 = grid(720, 1280, 1024)
    assert 20 * h0 * w0 > s.max_patches  # 22,880 patches: skipped before fitting
    budget = max(b for b in range(256, 1025) if 20 * np.prod(grid(720, 1280, b)) <= 8192)
    h, w = grid(720, 1280, budget)
    doc, media = plan(clip_720p_10s, s)
    (m,) = media
    assert (m.fit, m.frame_max_patches, m.fps) == ("resolution", budget, 2.0)
    assert doc.num_patches == 20 * h * w <= 8192 and len(doc) <= 4096
    decoded = decode_document(doc, media, s)  # raises if the decode disagrees with the plan
    chunks = [decoded.items[i] for i in m.item_indices]
    assert [c.grid_thw for c in chunks] == [(4, h, w)] * 5
    assert [t for c in chunks for t in c.frame_timestamps] == [i / 4.0 for i in frames]
    assert chunks[0].pixel_values.shape == (4 * h * w, 3, PATCH_SIZE, PATCH_SIZE)


def test_clip_over_the_budget_at_min_resolution_is_fitted_by_rate(clip_720p_10s) -> None:
    """At 256 patches per frame the 20 frames still exceed the budget: the highest rate whose
    frame count fits (7 frames over 10 s: 0.7 fps); one frame less than 0.5 fps allows is
    too_long."""
    g = int(np.prod(grid(720, 1280, 256)))
    s = kimi_settings(max_patches=7 * g + g // 2)
    assert 20 * g > s.max_patches
    doc, (m,) = plan(clip_720p_10s, s)
    want = uniform(40, 4.0, 0.7)
    assert len(want) == 7 and (m.fit, m.frame_max_patches) == ("fps", 256)
    assert uniform(40, 4.0, m.fps) == want and doc.num_patches == 7 * g
    decoded = decode_document(doc, [m], s)
    stamps = [t for i in m.item_indices for t in decoded.items[i].frame_timestamps]
    assert stamps == [i / 4.0 for i in want]
    assert [decoded.items[i].grid_thw[0] for i in m.item_indices] == [4, 3]
    with pytest.raises(BadSampleError) as err:  # 0.5 fps: 5 frames, one patch short
        plan(clip_720p_10s, kimi_settings(max_patches=5 * g - 1))
    assert err.value.reason == SkipReason.TOO_LONG


def test_video_within_the_budgets_is_unchanged() -> None:
    """A 2 s 720p clip (4 frames x 1,144 patches) plans exactly as before fitting existed."""
    s = kimi_settings()
    doc, (m,) = plan(h264(4, 2, 720, 1280), s)
    h, w = grid(720, 1280, 1024)
    assert (h, w) == (26, 44)
    assert (m.fit, m.frame_max_patches, m.fps) == ("unchanged", 1024, 2.0)
    assert doc.num_patches == 4 * h * w


def _prepared(root: Path, samples: list[tuple[dict, dict]]) -> Path:
    """A minimal prepared dataset: one shard of canonical samples and its manifest."""
    (root / "train").mkdir(parents=True)
    with tarfile.open(root / "train" / "shard-000000.tar", "w") as tar:
        for k, (_record, members) in enumerate(samples):
            for ext, data in members.items():
                info = tarfile.TarInfo(f"train_{k:09d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    shard = root / "train" / "shard-000000.tar"
    manifest = {"format": FORMAT, "name": root.name, "splits": {"train": {
        "samples": len(samples), "shards": [
            {"path": "train/shard-000000.tar", "samples": len(samples),
             "bytes": shard.stat().st_size,
             "sha256": hashlib.sha256(shard.read_bytes()).hexdigest()}]}}}
    (root / MANIFEST_NAME).write_text(json.dumps(manifest))
    return root


def test_drop_report_counts_a_recipes_outcomes(tmp_path, clip_720p_10s) -> None:
    """Under kimi_k25: a small clip is unchanged, the 720p 10 s clip fitted by resolution, a
    30 s 720p clip by rate (30 frames x 308 patches > 8,192 at 256 patches per frame), a clip
    with 5,000 bytes of text and a zero-timestamp clip without a rate dropped; an image sample
    is not counted."""
    image = {"format": FORMAT, "media": [{"type": "image", "ext": "png"}],
             "segments": [{"media": 0}]}
    samples = [
        sample(h264(8, 4, 272, 640)),
        sample(clip_720p_10s),
        sample(h264(30, 1, 720, 1280)),
        sample(h264(8, 4, 112, 112), caption="x" * 5000),
        sample(h264(8, 4, 112, 112, codec="mjpeg", zero_pts=True)),
        (image, {"json": json.dumps(image).encode(), "m0.png": b"not read"}),
    ]
    report = drop_report(_prepared(tmp_path / "ds", samples), "kimi_k25")
    assert report["videos"] == 5
    assert (report["unchanged"], report["fitted_resolution"], report["fitted_fps"]) == (1, 1, 1)
    assert report["dropped"] == 2 and report["dropped_fraction"] == pytest.approx(0.4)
    assert report["by_reason"] == {SkipReason.BAD_TIMESTAMPS: 1, SkipReason.TOO_LONG: 1}
    assert drop_report(tmp_path / "ds", "kimi_k25", max_samples=2)["videos"] == 2
    # the same numbers from the tool: prepare_data --verify DIR --recipe NAME
    import io
    from contextlib import redirect_stdout

    tool = load_tool("prepare_data")
    out = io.StringIO()
    with redirect_stdout(out):
        assert tool.main(["--verify", str(tmp_path / "ds"), "--recipe", "kimi_k25"]) == 0
    assert ("kimi_k25: 5 video samples: 1 unchanged, 1 fitted by resolution, 1 by fps, "
            "2 still dropped (40.0%: bad_timestamps 1, too_long 1)") in out.getvalue()


@pytest.mark.parametrize("key, value", [("video_min_patches_per_frame", 0),
                                        ("video_min_fps", 0.0)])
def test_fit_settings_are_validated_by_their_config_key(key, value) -> None:
    from megatron_vlm.config.data_mm import MultimodalDataConfig

    with pytest.raises(ValueError, match=f"data.multimodal.{key}"):
        MultimodalDataConfig(**{key: value})
