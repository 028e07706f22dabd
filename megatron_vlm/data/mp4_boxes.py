"""An MP4/MOV video track's sample table, read from the boxes (no demuxer, no decoder).

``video_track(read_at, size)`` finds the first video track (``hdlr`` ``vide``) in ``moov`` and
returns its codec, size, frame count, duration and every sample's byte range, from ``stsd``,
``mdhd``, ``stts``, ``stsc``, ``stsz`` and ``stco``/``co64``; the frame rate is ffmpeg's
(``sample count * timescale / sum of stts durations``), so the duration equals
``stream.frames / stream.average_rate`` as PyAV reports them. ``media_checks`` uses it to check a
video without opening a decoder (PyAV's probe decodes the first frames: ~20 ms for a 720p clip).

It returns None, and the caller falls back to PyAV, for whatever it does not model: fragmented
files (``moof``; no samples in ``moov``), ``stz2`` sizes, sample-to-chunk tables that do not add
up, zero sample durations (broken timestamps: PyAV repairs or rejects them), or no size.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

ReadAt = Callable[[int, int], bytes]
"""``read_at(offset, count)``: bytes of the file (fewer at its end)."""

NAL_CODECS = {b"avc1": b"avcC", b"avc3": b"avcC", b"hvc1": b"hvcC", b"hev1": b"hvcC"}
"""Sample entries whose samples are length-prefixed NAL units -> their configuration box."""


@dataclass
class VideoTrack:
    codec: bytes
    """Sample entry type (``avc1``, ``hvc1``, ``mp4v``, ...)."""
    width: int
    height: int
    num_frames: int
    duration_s: float
    """Sum of the ``stts`` sample durations, in seconds."""
    offsets: np.ndarray
    """Byte offset of every sample in the file (int64)."""
    sizes: np.ndarray
    """Byte size of every sample (int64)."""
    nal_length_size: int | None
    """Bytes of each NAL unit's length prefix (H.264/HEVC), None for other codecs."""


def _boxes(buf: bytes, start: int, end: int) -> dict[bytes, list[tuple[int, int]]]:
    """Child boxes of ``buf[start:end]``: type -> [(payload start, payload end)]."""
    out: dict[bytes, list[tuple[int, int]]] = {}
    pos = start
    while pos + 8 <= end:
        size, kind = struct.unpack_from(">I4s", buf, pos)
        header = 8
        if size == 1 and pos + 16 <= end:
            size, header = struct.unpack_from(">Q", buf, pos + 8)[0], 16
        elif size == 0:
            size = end - pos
        if size < header or pos + size > end:
            raise ValueError(f"box {kind!r} at {pos} overruns its parent")
        out.setdefault(kind, []).append((pos + header, pos + size))
        pos += size
    return out


def _one(boxes: dict, kind: bytes) -> tuple[int, int]:
    if kind not in boxes:
        raise KeyError(kind)
    return boxes[kind][0]


def _table(buf: bytes, box: tuple[int, int], fmt: str, width: int) -> np.ndarray:
    """Entries of a full box ``version/flags, entry_count, entries`` as an array."""
    (count,) = struct.unpack_from(">I", buf, box[0] + 4)
    start = box[0] + 8
    if start + count * width * np.dtype(fmt).itemsize > box[1]:
        raise ValueError("table overruns its box")
    return np.frombuffer(buf, dtype=fmt, count=count * width, offset=start).reshape(count, width)


def _find_moov(read_at: ReadAt, size: int) -> bytes | None:
    pos = 0
    while pos + 8 <= size:
        head = read_at(pos, 16)
        length, kind = struct.unpack_from(">I4s", head)
        header = 8
        if length == 1:
            length, header = struct.unpack_from(">Q", head, 8)[0], 16
        elif length == 0:
            length = size - pos
        if length < header:
            return None
        if kind == b"moov":
            return read_at(pos, length)
        pos += length
    return None


def video_track(read_at: ReadAt, size: int) -> VideoTrack | None:
    """The first video track's sample table, or None where the boxes are not modelled (see the
    module docstring).

    Raises:
        ValueError: Boxes that overrun their parent or tables that overrun their box (damage).
    """
    moov = _find_moov(read_at, size)
    if moov is None:
        return None
    try:
        for trak in _boxes(moov, 8, len(moov)).get(b"trak", []):
            mdia = _boxes(moov, *_one(_boxes(moov, *trak), b"mdia"))
            hdlr = _one(mdia, b"hdlr")
            if moov[hdlr[0] + 8:hdlr[0] + 12] == b"vide":
                return _track(moov, mdia)
    except KeyError:  # a box the track needs is missing: leave it to the demuxer
        return None
    return None


def _track(buf: bytes, mdia: dict) -> VideoTrack | None:
    mdhd = _one(mdia, b"mdhd")
    timescale_at = mdhd[0] + (20 if buf[mdhd[0]] == 1 else 12)
    (timescale,) = struct.unpack_from(">I", buf, timescale_at)
    stbl = _boxes(buf, *_one(_boxes(buf, *_one(mdia, b"minf")), b"stbl"))
    stsd = _one(stbl, b"stsd")
    entry = stsd[0] + 8
    codec = buf[entry + 4:entry + 8]
    width, height = struct.unpack_from(">HH", buf, entry + 32)
    nal_length_size = None
    if codec in NAL_CODECS:
        entry_end = entry + struct.unpack_from(">I", buf, entry)[0]
        config = _boxes(buf, entry + 86, entry_end).get(NAL_CODECS[codec])
        if config:
            at = config[0][0] + (4 if codec.startswith(b"avc") else 21)
            nal_length_size = (buf[at] & 3) + 1
    if b"stsz" not in stbl or not timescale or not width or not height:
        return None
    stsz = _one(stbl, b"stsz")
    uniform, count = struct.unpack_from(">II", buf, stsz[0] + 4)
    if count == 0:
        return None
    if uniform:
        sizes = np.full(count, uniform, dtype=np.int64)
    else:
        if stsz[0] + 12 + 4 * count > stsz[1]:
            raise ValueError("stsz overruns its box")
        sizes = np.frombuffer(buf, ">u4", count, stsz[0] + 12).astype(np.int64)
    stts = _table(buf, _one(stbl, b"stts"), ">u4", 2).astype(np.int64)
    if stts[:, 0].sum() != count or (stts[stts[:, 0] > 0, 1] == 0).any():
        return None  # broken timestamps: PyAV's timing repairs or rejects them
    chunks = (_table(buf, stbl[b"stco"][0], ">u4", 1) if b"stco" in stbl
              else _table(buf, _one(stbl, b"co64"), ">u8", 1))[:, 0].astype(np.int64)
    stsc = _table(buf, _one(stbl, b"stsc"), ">u4", 3).astype(np.int64)
    first = np.append(stsc[:, 0], len(chunks) + 1)
    runs = np.diff(first)
    if len(stsc) == 0 or stsc[0, 0] != 1 or (runs < 0).any():
        return None
    per_chunk = np.repeat(stsc[:, 1], runs)
    if per_chunk.sum() != count:
        return None
    chunk_of = np.repeat(np.arange(len(chunks)), per_chunk)
    before = np.cumsum(sizes) - sizes  # bytes of the samples before each, in table order
    first_sample = np.cumsum(per_chunk) - per_chunk  # of each chunk (== count if it is empty)
    chunk_start = np.append(before, 0)[first_sample][chunk_of]
    offsets = chunks[chunk_of] + before - chunk_start
    return VideoTrack(codec=codec, width=width, height=height, num_frames=count,
                      duration_s=float((stts[:, 0] * stts[:, 1]).sum()) / timescale,
                      offsets=offsets, sizes=sizes, nal_length_size=nal_length_size)


def nal_units_tile(sample: bytes, length_size: int) -> bool:
    """Whether ``sample`` is a whole number of length-prefixed NAL units, each with a zero
    forbidden bit (garbage or a cut sample almost never is)."""
    pos, end = 0, len(sample)
    while pos < end:
        if pos + length_size >= end:
            return False
        n = int.from_bytes(sample[pos:pos + length_size], "big")
        pos += length_size
        if n == 0 or pos + n > end or sample[pos] & 0x80:
            return False
        pos += n
    return end > 0
