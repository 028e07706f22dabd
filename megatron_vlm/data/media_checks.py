"""Media checks at preparation time: structure and headers by default, a full decode on request.

``check_media(kind, source, mode)`` rejects a file that training could not decode, before it is
written to a shard. Modes (``prepare_data --check-media``):

- ``structure`` (default): what a cut-off download, an empty file or garbage breaks, read from
  the file's structure without decoding pixels (~1% of a decode's cost).

  - JPEG: SOI, the marker segments up to the first scan (each length inside the file), a frame
    header (SOF) giving a non-zero size, a scan (SOS), and an EOI marker after the scan. A JPEG
    cut short loses its EOI (entropy-coded data never holds ``FF D9``); bytes after the EOI are
    allowed (PIL ignores them too).
  - PNG: the signature, IHDR first, every chunk inside the file with a matching CRC-32, IDAT, and
    IEND.
  - GIF: the header and the block structure to the trailer (``0x3B``), at least one image.
  - WebP: the RIFF size inside the file and the chunks filling it exactly, a VP8/VP8L/ANMF chunk.
  - other image formats (BMP, ...): a full decode (they are cheap or rare).
  - every image: PIL's header (format, size) and its decompression-bomb limit
    (``image_too_large``), as ``image.decode_image`` applies it. An image these checks find
    broken is decoded in full and rejected only if that fails too (``image.decode_image``,
    training's decoder): a PNG without IEND or a GIF without its trailer, which PIL reads, is
    kept. So the check never rejects an image training could read, and costs a decode only
    for the broken ones.
  - video: the container's top-level structure (MP4/MOV boxes, Matroska/WebM EBML elements, the
    AVI RIFF size) ends inside the file. Then, for an MP4/MOV whose video track's sample table
    ``mp4_boxes`` reads (what muxers write unfragmented): every sample lies inside the file (a
    cut-off ``faststart`` MP4 keeps its index but loses samples), the first samples of an
    H.264/HEVC track are whole length-prefixed NAL units (a garbage stream is not), the track
    has a size and non-zero sample durations; no demuxer or decoder is opened (~0.1 ms). Any
    other video (Matroska, WebM, AVI, fragmented MP4, zero durations) goes to PyAV: its probe
    must find a video stream with a pixel format and a size (the probe parses the first frames
    and decodes H.264's first frames: a garbage stream has neither), every packet is demuxed
    (no decoding) and their count equals the header's frame count when it has one, and the
    packet timestamps are checked as the loader checks them (``video.stream_timing``:
    ``bad_timestamps``); ~20 ms for a 720p clip, the probe's decode. The duration (frames /
    average rate, as PyAV reports them) is returned for clip spans.

- ``full``: ``image.decode_image`` / ``video.decode_video`` of every file, as training decodes
  them (the frames training samples, not every frame).
- ``none``: no check; bad files reach the shards and are skipped when training reads them.

What ``structure`` cannot see, and training then skips and counts by reason (the loader decodes
every sample inside ``SkipCounter``): damage *inside* entropy-coded data that leaves the structure
whole (bit flips in a JPEG's scan, in a WebP's VP8 data or in a GIF's LZW data; a PNG whose
deflate data is bad but whose CRCs match, which takes deliberate construction); a video
bitstream damaged inside its NAL units or after the first samples, or frames a decoder refuses
(an unsupported profile or codec); in an MP4, composition offsets (``ctts``) that make two frames'
timestamps equal; a truncated Matroska/WebM written as a live stream (unknown segment size, no
frame count); an EXIF orientation block that breaks ``exif_transpose``. ``full`` catches the
damaged data and refused frames among the frames training samples.
"""

from __future__ import annotations

import io
import os
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import PIL.Image

from megatron_vlm.data.media_errors import (
    BadSampleError,
    MediaDecodeError,
    MediaMissingError,
    SkipReason,
)
from megatron_vlm.data.mp4_boxes import VideoTrack, nal_units_tile, video_track

CHECK_MODES = ("structure", "full", "none")
"""``check_media`` values; ``True`` means ``structure``, ``False`` ``none``."""

MediaSource = bytes | str | os.PathLike


def check_mode(value: bool | str) -> str:
    """The mode named by ``value`` (``True`` -> ``structure``, ``False`` -> ``none``).

    Raises:
        ValueError: Not a bool nor one of ``CHECK_MODES``.
    """
    if value is True:
        return "structure"
    if value is False:
        return "none"
    if value not in CHECK_MODES:
        raise ValueError(f"check_media={value!r}: use one of {CHECK_MODES} (--check-media)")
    return value


def check_media(kind: str, source: MediaSource, mode: str = "structure") -> float | None:
    """Check one image or video; a video's duration in seconds (None: unknown, or an image).

    Args:
        kind: ``image`` or ``video``.
        source: The file's bytes or its path.
        mode: ``structure`` or ``full`` (see the module docstring); ``none`` checks nothing.

    Raises:
        MediaDecodeError: The file is broken (reasons ``image_decode``, ``image_too_large``,
            ``video_decode``, ``video_empty``).
        MediaMissingError: A path that does not exist.
        BadSampleError: A video with broken timestamps and no nominal rate (``bad_timestamps``).
    """
    mode = check_mode(mode)
    if mode == "none":
        return None
    if mode == "full":
        if kind == "image":
            from megatron_vlm.data.image import decode_image

            decode_image(source)
            return None
        from megatron_vlm.data.video import decode_video

        video = decode_video(source)
        return video.total_frames / video.fps if video.fps > 0 else None
    if kind == "image":
        data = _read(source)
        try:
            check_image(data)
        except MediaDecodeError as exc:
            if exc.reason != SkipReason.IMAGE_DECODE:
                raise
            _confirm_by_decoding(data, exc)
        return None
    return check_video(source)


def _confirm_by_decoding(data: bytes, exc: MediaDecodeError) -> None:
    """Decode an image the structure check found broken: it is rejected (with the structure
    check's message) only if the decoder training uses fails too, so the default check never
    rejects an image training could read (a PNG without IEND, a GIF without its trailer)."""
    from megatron_vlm.data.image import decode_image

    try:
        decode_image(data)
    except MediaDecodeError:
        raise exc from None


def _read(source: MediaSource) -> bytes:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return bytes(source)
    path = Path(source)
    if not path.is_file():
        raise MediaMissingError(f"media file not found: {path}")
    return path.read_bytes()


# -------------------------------------------------------------------------------------- images


def _bad_image(message: str) -> MediaDecodeError:
    return MediaDecodeError(f"cannot decode image: {message}", reason=SkipReason.IMAGE_DECODE)


def check_image(data: bytes) -> tuple[int, int]:
    """Structure check of image bytes (module docstring); returns (width, height).

    Raises:
        MediaDecodeError: Broken (``image_decode``) or over PIL's pixel limit
            (``image_too_large``).
    """
    try:
        with warnings.catch_warnings():  # as image.decode_image: the bomb warning is an error
            warnings.simplefilter("error", PIL.Image.DecompressionBombWarning)
            with PIL.Image.open(io.BytesIO(data)) as img:  # the header only
                fmt, size = img.format, img.size
                if fmt not in _STRUCTURE:
                    img.load()
    except (PIL.Image.DecompressionBombError, PIL.Image.DecompressionBombWarning) as exc:
        raise MediaDecodeError(f"image too large to decode: {exc}",
                               reason=SkipReason.IMAGE_TOO_LARGE) from None
    except (OSError, ValueError, SyntaxError, EOFError, IndexError, TypeError,
            struct.error) as exc:
        raise _bad_image(f"{type(exc).__name__}: {exc}") from None
    if fmt in _STRUCTURE:
        _STRUCTURE[fmt](data)
    if size[0] < 1 or size[1] < 1:
        raise _bad_image(f"{fmt} header gives size {size[0]}x{size[1]}")
    return size


_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_STANDALONE = {0x01, *range(0xD0, 0xD8)}  # TEM, RST0-7: no length field


def _check_jpeg(data: bytes) -> None:
    """SOI, marker segments inside the file, SOF with a size, SOS, EOI after the scan."""
    n = len(data)
    if data[:2] != b"\xff\xd8":
        raise _bad_image("JPEG without an SOI marker")
    pos, size = 2, None
    while True:
        if pos + 4 > n or data[pos] != 0xFF:
            raise _bad_image(f"JPEG header cut short or damaged at byte {pos} of {n}")
        while pos + 4 <= n and data[pos + 1] == 0xFF:  # fill bytes before a marker
            pos += 1
        marker = data[pos + 1]
        pos += 2
        if marker in _STANDALONE:
            continue
        if marker == 0xD9:
            raise _bad_image("JPEG ends (EOI) before any scan")
        length = int.from_bytes(data[pos:pos + 2], "big")
        if length < 2 or pos + length > n:
            raise _bad_image(f"JPEG marker 0x{marker:02X} segment of {length} bytes at byte "
                             f"{pos} runs past the end ({n} bytes): truncated")
        if marker in _SOF and length >= 7:
            size = int.from_bytes(data[pos + 5:pos + 7], "big"), int.from_bytes(
                data[pos + 3:pos + 5], "big")
        if marker == 0xDA:
            break
        pos += length
    if size is None or 0 in size:
        raise _bad_image(f"JPEG scan without a frame header giving its size ({size})")
    if data.rfind(b"\xff\xd9", pos + length) < 0:
        raise _bad_image(f"JPEG without an EOI marker after its scan data ({n} bytes): "
                         "truncated")


def _check_png(data: bytes) -> None:
    """Signature, IHDR first, chunks inside the file with matching CRC-32s, IDAT, IEND."""
    n = len(data)
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise _bad_image("PNG without its signature")
    pos, first, seen_idat = 8, True, False
    view = memoryview(data)
    while True:
        if pos + 12 > n:
            raise _bad_image(f"PNG ends at byte {n} without an IEND chunk: truncated")
        length, ctype = struct.unpack_from(">I4s", data, pos)
        end = pos + 12 + length
        if end > n:
            raise _bad_image(f"PNG chunk {ctype!r} of {length} bytes at byte {pos} runs past the "
                             f"end ({n} bytes): truncated")
        (crc,) = struct.unpack_from(">I", data, end - 4)
        if zlib.crc32(view[pos + 4:end - 4]) != crc:
            raise _bad_image(f"PNG chunk {ctype!r} at byte {pos}: CRC mismatch (damaged)")
        if first and ctype != b"IHDR":
            raise _bad_image(f"PNG starts with chunk {ctype!r}, not IHDR")
        first = False
        seen_idat |= ctype == b"IDAT"
        if ctype == b"IEND":
            break
        pos = end
    if not seen_idat:
        raise _bad_image("PNG without image data (IDAT)")


def _check_gif(data: bytes) -> None:
    """Header, blocks (extensions and images with their sub-blocks) up to the trailer."""
    n = len(data)
    if data[:6] not in (b"GIF87a", b"GIF89a") or n < 13:
        raise _bad_image("GIF without its header")
    pos = 13 + _colour_table(data[10])
    images = 0
    try:
        while True:
            block = data[pos]
            if block == 0x3B:
                break
            if block == 0x21:  # extension: label, then sub-blocks
                pos += 2
            elif block == 0x2C:  # image: descriptor, local colour table, LZW code size
                pos += 10 + _colour_table(data[pos + 9]) + 1
                images += 1
            else:
                raise _bad_image(f"GIF block 0x{block:02X} at byte {pos} is not a GIF block")
            while data[pos]:  # sub-blocks until a zero length
                pos += data[pos] + 1
            pos += 1
    except IndexError:
        raise _bad_image(f"GIF ends at byte {n} without its trailer: truncated") from None
    if not images:
        raise _bad_image("GIF without an image")


def _colour_table(flags: int) -> int:
    """Bytes of the colour table a GIF screen/image descriptor's flags announce."""
    return 3 << ((flags & 7) + 1) if flags & 0x80 else 0


def _check_webp(data: bytes) -> None:
    """RIFF size inside the file, chunks filling it exactly, an image chunk."""
    n = len(data)
    if data[:4] != b"RIFF" or data[8:12] != b"WEBP":
        raise _bad_image("WebP without its RIFF/WEBP header")
    end = 8 + int.from_bytes(data[4:8], "little")
    if end > n:
        raise _bad_image(f"WebP RIFF size says {end} bytes, the file has {n}: truncated")
    pos, kinds = 12, set()
    while pos < end:
        if pos + 8 > end:
            raise _bad_image(f"WebP chunk header at byte {pos} runs past the RIFF end")
        kinds.add(data[pos:pos + 4])
        pos += 8 + int.from_bytes(data[pos + 4:pos + 8], "little")
        pos += pos & 1  # chunks are padded to even sizes
        if pos > end:
            raise _bad_image(f"WebP chunk {sorted(kinds)[-1]!r} runs past the RIFF end: truncated")
    if not kinds & {b"VP8 ", b"VP8L", b"ANMF"}:
        raise _bad_image(f"WebP without image data (chunks {sorted(kinds)})")


_STRUCTURE = {"JPEG": _check_jpeg, "MPO": _check_jpeg, "PNG": _check_png, "GIF": _check_gif,
              "WEBP": _check_webp}
"""PIL format -> structure check; other formats are decoded whole."""


# -------------------------------------------------------------------------------------- videos


def _bad_video(message: str, reason: str = SkipReason.VIDEO_DECODE) -> MediaDecodeError:
    return MediaDecodeError(f"cannot decode video: {message}", reason=reason)


def _container_end(head: bytes, size: int, read_at) -> None:
    """The top-level structure of an MP4/MOV, Matroska/WebM or AVI ends inside the file.

    ``head`` holds the first bytes; ``read_at(offset, count)`` reads more (MP4 box headers).
    Other containers are left to PyAV.
    """
    if head[4:8] in _MP4_TOP:
        pos = 0
        while pos < size:
            box = read_at(pos, 16)
            if len(box) < 8:
                raise _bad_video(f"MP4 box header at byte {pos} cut short ({size} bytes)")
            length, name = struct.unpack_from(">I4s", box)
            if length == 1 and len(box) == 16:
                length = struct.unpack_from(">Q", box, 8)[0]
            elif length == 0:  # the last box runs to the end of the file
                return
            if length < 8 or pos + length > size:
                raise _bad_video(f"MP4 box {name!r} of {length} bytes at byte {pos} runs past "
                                 f"the end ({size} bytes): truncated")
            pos += length
    elif head[:4] == b"\x1aE\xdf\xa3":
        pos = _ebml_element_end(head, 0, size)  # the EBML header
        if head[pos:pos + 4] != b"\x18\x53\x80\x67":  # Segment
            return
        if _ebml_element_end(head, pos, size, unknown_ok=True) > size:
            raise _bad_video(f"Matroska segment runs past the end ({size} bytes): truncated")
    elif head[:4] == b"RIFF" and head[8:12] == b"AVI ":
        if 8 + int.from_bytes(head[4:8], "little") > size:
            raise _bad_video(f"AVI RIFF size runs past the end ({size} bytes): truncated")


def _ebml_element_end(data: bytes, pos: int, size: int, unknown_ok: bool = False) -> int:
    """End offset of the EBML element at ``pos`` (``size`` when its size is unknown)."""
    def vint(at: int, keep_marker: bool) -> tuple[int, int]:
        first = data[at]
        width = 9 - first.bit_length() if first else 9
        if width > 8 or at + width > len(data):
            raise _bad_video(f"Matroska element at byte {pos} is damaged")
        value = int.from_bytes(data[at:at + width], "big")
        return (value if keep_marker else value & ((1 << (7 * width)) - 1)), width

    _, id_width = vint(pos, True)
    length, width = vint(pos + id_width, False)
    if unknown_ok and length == (1 << (7 * width)) - 1:
        return size
    return pos + id_width + width + length


class _DemuxTap:
    """A container stand-in for ``video.stream_timing``: counts the packets it demuxes."""

    def __init__(self, container) -> None:
        self.container = container
        self.packets = 0

    def demux(self, stream):
        for packet in self.container.demux(stream):
            self.packets += bool(packet.size)
            yield packet


def check_video(source: MediaSource) -> float | None:
    """Structure check of a video (module docstring); its duration in seconds, or None.

    Raises:
        MediaDecodeError: Broken (``video_decode``) or without frames (``video_empty``).
        MediaMissingError: A path that does not exist.
        BadSampleError: Broken timestamps and no nominal rate (``bad_timestamps``).
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        data = bytes(source)
        return _check_video(len(data), lambda at, k: data[at:at + k], io.BytesIO(data))
    path = Path(_exists(source))
    with open(path, "rb") as f:
        def read_at(at: int, k: int) -> bytes:
            f.seek(at)
            return f.read(k)

        return _check_video(path.stat().st_size, read_at, str(path))


def _check_video(size: int, read_at, uri) -> float | None:
    head = read_at(0, 4096)
    _container_end(head, size, read_at)
    if head[4:8] in _MP4_TOP:
        try:
            track = video_track(read_at, size)
        except ValueError as exc:
            raise _bad_video(f"MP4 boxes damaged: {exc}") from None
        if track is not None:
            return _check_mp4_samples(track, size, read_at)
    return _probe(uri)


_MP4_TOP = (b"ftyp", b"moov", b"mdat", b"free", b"wide", b"skip")
NAL_SAMPLES_CHECKED = 4
"""Leading samples of an H.264/HEVC MP4 track whose NAL units must tile them exactly."""


def _check_mp4_samples(track: VideoTrack, size: int, read_at) -> float:
    """Every sample inside the file, the first samples whole NAL units; the duration."""
    ends = track.offsets + track.sizes
    if (ends > size).any() or (track.offsets < 0).any():
        cut = int(np.argmax(ends > size))
        raise _bad_video(f"MP4 sample {cut} of {track.num_frames} ends at byte {int(ends[cut])}, "
                         f"after the end of the file ({size} bytes): truncated")
    if track.nal_length_size is not None:
        for i in range(min(NAL_SAMPLES_CHECKED, track.num_frames)):
            sample = read_at(int(track.offsets[i]), int(track.sizes[i]))
            if not nal_units_tile(sample, track.nal_length_size):
                raise _bad_video(f"MP4 sample {i} ({track.codec.decode(errors='replace')}) is "
                                 "not a sequence of NAL units: damaged")
    if not track.duration_s > 0:
        raise _bad_video(f"{track.num_frames} frames lasting 0 s", SkipReason.VIDEO_EMPTY)
    return track.duration_s


def _probe(uri) -> float:
    """PyAV's probe, a demux of every packet (no decoding) and the loader's timing check."""
    import av

    from megatron_vlm.data.video import stream_timing

    try:
        with av.open(uri) as container:
            if not container.streams.video:
                raise _bad_video("no video stream", SkipReason.VIDEO_EMPTY)
            stream = container.streams.video[0]
            tap = _DemuxTap(container)
            timing = stream_timing(tap, stream)
            frames = timing.total_frames or tap.packets
            if frames < 1 or not timing.fps > 0:
                raise _bad_video(f"no frames (frames={frames}, fps={timing.fps})",
                                 SkipReason.VIDEO_EMPTY)
            if timing.total_frames and tap.packets != timing.total_frames:
                raise _bad_video(f"{tap.packets} packets of the {timing.total_frames} frames "
                                 "the header lists: truncated")
            codec = stream.codec_context
            if codec.pix_fmt is None or not codec.width or not codec.height:
                raise _bad_video("the stream's first frames do not decode (PyAV's probe found "
                                 "no pixel format or size)")
    except BadSampleError:
        raise
    except Exception as exc:  # av.error.* (InvalidDataError is a ValueError), OSError
        raise _bad_video(f"pyav: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}") \
            from None
    return frames / timing.fps


def _exists(source: MediaSource) -> MediaSource:
    if not Path(source).is_file():
        raise MediaMissingError(f"video file not found: {source}")
    return source
