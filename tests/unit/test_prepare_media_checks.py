"""Preparation's media checks (issue 18 item 5): the default ``structure`` check rejects what a full
decode rejects on cut-off, garbage and empty files (same reasons), reads no pixels for JPEG, PNG
and GIF, gives a video's duration as the full decode does, and ``--check-media`` reaches the
slice settings."""

from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path

import av
import numpy as np
import PIL.Image
import PIL.ImageFile
import pytest
from tiny_runs import load_tool

from megatron_vlm.data import media_checks
from megatron_vlm.data.media_checks import check_media, check_mode
from megatron_vlm.data.media_errors import BadSampleError, MediaMissingError
from megatron_vlm.data.mm_corpus import encode_h264
from megatron_vlm.data.prepare import prepare_dataset

IMAGE_FORMATS = {"jpg": ("JPEG", {"quality": 90}), "progressive": ("JPEG", {"progressive": True}),
                 "png": ("PNG", {}), "webp": ("WEBP", {"quality": 80}), "gif": ("GIF", {}),
                 "bmp": ("BMP", {})}


def _photo(width: int = 160, height: int = 120, seed: int = 0) -> PIL.Image.Image:
    rng = np.random.default_rng(seed)
    low = rng.integers(0, 256, (height // 8 + 1, width // 8 + 1, 3)).astype(np.uint8)
    return PIL.Image.fromarray(low).resize((width, height), PIL.Image.BICUBIC)


@pytest.fixture(scope="module")
def images() -> dict[str, bytes]:
    out = {}
    for name, (fmt, kwargs) in IMAGE_FORMATS.items():
        buf = io.BytesIO()
        _photo().save(buf, fmt, **kwargs)
        out[name] = buf.getvalue()
    return out


def _frames(num: int = 12, width: int = 64, height: int = 48) -> np.ndarray:
    rng = np.random.default_rng(1)
    return rng.integers(0, 256, (num, height, width, 3), dtype=np.uint8)


def _encode_file(path: Path, fmt: str, options: dict | None = None, fps: int = 6,
                 codec: str = "libx264", zero_pts: bool = False) -> bytes:
    frames = _frames()
    with av.open(str(path), "w", format=fmt, options=options or {}) as container:
        stream = container.add_stream(codec, rate=fps)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuvj420p" if codec == "mjpeg" else "yuv420p"
        if codec == "libx264":
            stream.options = {"preset": "veryfast", "threads": "1"}
        for frame in [*(av.VideoFrame.from_ndarray(f, "rgb24") for f in frames), None]:
            for packet in stream.encode(frame):
                if zero_pts:  # every timestamp 0: broken timing
                    packet.pts = packet.dts = 0
                container.mux(packet)
    return path.read_bytes()


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> dict[str, bytes]:
    tmp = tmp_path_factory.mktemp("videos")
    return {"mp4": encode_h264(_frames(), 6),  # moov after the media data
            "faststart": _encode_file(tmp / "f.mp4", "mp4", {"movflags": "+faststart"}),
            "mkv": _encode_file(tmp / "v.mkv", "matroska")}


def _reason(kind: str, data, mode: str) -> str:
    try:
        check_media(kind, data, mode)
    except BadSampleError as exc:
        return exc.reason
    return "ok"


def test_good_images_pass_without_decoding_pixels(images, monkeypatch):
    for data in images.values():
        assert _reason("image", data, "structure") == _reason("image", data, "full") == "ok"

    def no_decode(self):
        raise AssertionError("pixels decoded")

    monkeypatch.setattr(PIL.ImageFile.ImageFile, "load", no_decode)
    for name in ("jpg", "progressive", "png", "gif"):
        check_media("image", images[name], "structure")
    with pytest.raises(AssertionError, match="pixels decoded"):  # BMP: decoded whole
        check_media("image", images["bmp"], "structure")


def test_cut_garbage_and_empty_images_rejected_like_a_full_decode(images):
    rng = np.random.default_rng(0)
    for name, data in images.items():
        for frac in (*rng.uniform(0.05, 0.95, 6), 0.5):
            cut = data[:int(len(data) * frac)]
            assert _reason("image", cut, "structure") == _reason("image", cut, "full") == \
                "image_decode", (name, frac)
    for junk in (b"", rng.integers(0, 256, 4000, dtype=np.uint8).tobytes(),
                 b"\xff\xd8\xff\xe0 not really a jpeg" * 4, b"\xff\xd8\xffjunk",
                 b"\x89PNG\r\n\x1a\n" + bytes(40), b"GIF89a" + bytes(20), b"RIFF\0\0\0\0WEBP"):
        assert _reason("image", junk, "structure") == _reason("image", junk, "full") == \
            "image_decode", junk[:12]


def test_structure_details(images):
    jpg = images["jpg"]
    assert check_media("image", jpg + b"trailing bytes after EOI") is None  # PIL ignores them
    # a JPEG cut right after its last scan byte, before EOI: structure says truncated
    assert _reason("image", jpg[:-2], "structure") == "image_decode"
    # a broken structure is confirmed by a full decode: a PNG cut just before IEND and a GIF
    # without its trailer are read by PIL (and by training), so they are kept
    for name, cut in (("png", 12), ("gif", 1)):
        assert _reason("image", images[name][:-cut], "full") == "ok"
        assert _reason("image", images[name][:-cut], "structure") == "ok"
    png = bytearray(images["png"])
    idat = png.index(b"IDAT")
    png[idat + 20] ^= 0xFF  # one byte of the deflate data: its chunk CRC no longer matches
    assert _reason("image", bytes(png), "structure") == "image_decode"
    # more pixels than PIL's bomb limit: image_too_large from the header, both modes
    ihdr = struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0)
    def chunk(ctype: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + ctype + data
                + struct.pack(">I", zlib.crc32(ctype + data)))

    bomb = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0"))
            + chunk(b"IEND", b""))
    assert _reason("image", bomb, "structure") == _reason("image", bomb, "full") == \
        "image_too_large"


def test_videos_structure_matches_full_decode(videos, tmp_path):
    for name, data in videos.items():
        duration = check_media("video", data, "structure")
        assert duration == pytest.approx(check_media("video", data, "full")), name
        assert duration == pytest.approx(12 / 6), name
        path = tmp_path / f"v.{'mkv' if name == 'mkv' else 'mp4'}"
        path.write_bytes(data)
        assert check_media("video", path, "structure") == pytest.approx(duration)
        for frac in (0.2, 0.5, 0.9):
            cut = data[:int(len(data) * frac)]
            assert _reason("video", cut, "structure") == "video_decode", (name, frac)
    # an mdat "to the end of the file" (size 0) passes the box walk; the sample table (and,
    # in PyAV's probe, the fallback for MP4s the table reader does not model, the packet
    # count) catches the cut
    fast = bytearray(videos["faststart"])
    mdat = fast.index(b"mdat") - 4
    fast[mdat:mdat + 4] = bytes(4)
    assert check_media("video", bytes(fast), "structure") == pytest.approx(2.0)
    cut = bytes(fast[:int(len(fast) * 0.7)])
    for check in (lambda v: check_media("video", v, "structure"), _probe):
        with pytest.raises(BadSampleError, match="truncated") as err:
            check(cut)
        assert err.value.reason == "video_decode"
    # a whole container around a garbage stream: its samples are not NAL units (the probe
    # finds no pixel format)
    noise = np.random.default_rng(1).integers(0, 256, len(fast) - mdat - 8, dtype=np.uint8)
    fast[mdat + 8:] = noise.tobytes()
    for check in (lambda v: check_media("video", v, "full"),
                  lambda v: check_media("video", v, "structure"), _probe):
        with pytest.raises(BadSampleError) as err:
            check(bytes(fast))
        assert err.value.reason == "video_decode"
    junk = np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8).tobytes()
    for bad in (b"", junk):
        assert _reason("video", bad, "structure") == _reason("video", bad, "full") == \
            "video_decode"
    with pytest.raises(MediaMissingError):
        check_media("video", tmp_path / "nope.mp4", "structure")


def _probe(data: bytes) -> float:
    return media_checks._probe(io.BytesIO(data))


def test_mp4_sample_table_matches_pyav_and_leaves_broken_timing_to_it(videos, tmp_path):
    """The MP4 sample table gives PyAV's frames / average rate; zero timestamps go to PyAV's
    timing check: repaired from H.264's declared rate, rejected without one (MJPEG)."""
    for name in ("mp4", "faststart"):
        assert check_media("video", videos[name]) == pytest.approx(_probe(videos[name]))
    zero = _encode_file(tmp_path / "z.mp4", "mp4", zero_pts=True)
    assert check_media("video", zero) == pytest.approx(check_media("video", zero, "full"))
    mjpeg = _encode_file(tmp_path / "m.mp4", "mp4", codec="mjpeg", zero_pts=True)
    assert _reason("video", mjpeg, "structure") == _reason("video", mjpeg, "full") == \
        "bad_timestamps"


def test_cut_videos_full_decode_agrees_where_it_notices(videos):
    """A full decode rejects an MP4 whose index is gone; the structure check rejects it too,
    and also the cut-off faststart MP4 and Matroska files a sparse decode may still read."""
    cut = videos["mp4"][:len(videos["mp4"]) // 2]
    assert _reason("video", cut, "full") == _reason("video", cut, "structure") == "video_decode"


def test_check_modes_and_prepare_settings(tmp_path, images):
    assert [check_mode(v) for v in (True, False, "full")] == ["structure", "none", "full"]
    with pytest.raises(ValueError, match="--check-media"):
        check_mode("fast")
    (tmp_path / "good.jpg").write_bytes(images["jpg"])
    (tmp_path / "cut.jpg").write_bytes(images["jpg"][:-500])
    (tmp_path / "in.jsonl").write_text("".join(
        json.dumps({"id": n, "image": f"{n}.jpg", "caption": "c"}) + "\n"
        for n in ("good", "cut")))
    counts = {}
    for mode in ("structure", "full", "none"):
        summary = prepare_dataset({"train": [tmp_path / "in.jsonl"]}, tmp_path / mode, name="d",
                                  check_media=mode, progress=False, verbose=False, workers=1)
        counts[mode] = (summary.written["train"], dict(summary.rejected))
    assert counts == {"structure": (1, {"image_decode": 1}), "full": (1, {"image_decode": 1}),
                      "none": (2, {})}
    tool = load_tool("prepare_data")
    out = tmp_path / "cli"
    assert tool.main(["--name", "d", "--train", str(tmp_path / "in.jsonl"), "--out", str(out),
                      "--check-media", "full", "--shard", "0/1", "--no-progress",
                      "--workers", "1"]) == 0
    settings = json.loads(next((out / ".slices").glob("slice_*.json")).read_text())["settings"]
    assert settings["check_media"] == "full"
