"""Videos for MoonViT-3D (SPEC §2, §10): decode, sample at a target fps, size, chunk, patchify.

Follows transformers 5.23 ``Kimi_K25VideoProcessor`` + ``video_utils`` (torchvision-free):

- Sampling (HF ``default_sample_indices_fn``): ``n = max(1, int(total / video_fps * fps))``
  frames at indices ``arange(n) * total // n``; timestamps are ``index / video_fps`` seconds
  (HF ``VideoMetadata.timestamps``). Two additions of ours: a frame budget ``max_frames`` caps ``n``
  (same uniform formula), and a target fps above the source fps takes every frame instead of
  raising as HF does.
- Chunks of ``temporal_patch_size = 4`` consecutive sampled frames; the **last chunk is short**
  (t = remainder), never padded.
- Each frame is sized like an image by ``navit_resize`` with ``max_patches = 4096``: the budget
  bounds ONE frame's grid h*w, so a 4-frame chunk feeds the ViT 4*h*w patches and the LLM h*w/4
  tokens (one frame's worth: MoonViT-3D averages over time).
- Per chunk: ``pixel_values [t*h*w, 3, 14, 14]`` in (frame, row, col) order, grid (t, h, w), and the
  timestamp of its first frame.

Two more additions of ours:

- Clip spans (Panda-70M: one source video, several captioned spans cut at decode time):
  ``clip=(start_s, end_s)`` samples only the source frames ``i`` with ``start_s <= i / fps <
  end_s`` (``clip_frame_range``), by the same uniform rule applied to the span's frames;
  timestamps stay relative to the start of the file decoded. Preparation stores a span as its
  stream-copied segment (``video_remux.cut_clip``) with the clip rebased into it, so for a
  prepared sample they count from the segment's first frame (a keyframe at or before the span).
- Broken timing: a stream whose packet timestamps are all equal (e.g. all zero) or repeat has a
  meaningless average frame rate (ffmpeg derives it from the duration: 20 frames with pts 0 read
  as 200 fps, so the sampler kept ONE frame). ``read_timing`` checks the timestamps (a demux, no
  decoding); such a stream is timed by its nominal rate (the codec's declared frame rate, else
  the container's base rate) and decoded by PyAV in decode order (``timestamps_repaired``), or
  rejected (``bad_timestamps``) when it declares no rate.

Decoding (``auto``) picks by measurement (``benchmarks/media_floor.py``): PyAV's sparse decoder
(``video_pyav``: skips the non-reference frames it does not need, seeks to keyframes) for sparse
sampling or frames of 640x360 and up, decord for dense sampling of small frames; either falls
back to the other when missing or failing. A file neither can decode completely raises
``MediaDecodeError`` (reason ``video_decode``): decord raises ``RuntimeError``/``DECORDError``,
PyAV ``av.error.InvalidDataError`` (sometimes after yielding the frames before the damage), and a
cut-off stream may simply yield fewer frames than its header claims -- all three end up as the one
error type.
"""

from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from megatron_vlm.data.image import (
    MAX_PATCHES_PER_SIDE,
    MERGE_SIZE,
    PATCH_SIZE,
    MediaGrid,
    frames_to_patches,
    navit_resize,
)
from megatron_vlm.data.media_errors import (
    BadSampleError,
    MediaDecodeError,
    MediaMissingError,
    SkipReason,
)
from megatron_vlm.data.video_pyav import decode_sampled

VIDEO_FPS = 2.0
"""Default sampling rate in frames per second (HF ``Kimi_K25VideoProcessor.fps``)."""
VIDEO_MAX_FRAMES = 128
"""Default frame budget per video (ours; HF has none): 32 chunks of 4."""
VIDEO_CHUNK_MAX_PATCHES = 4096
"""Patch budget of one frame of a chunk (HF ``Kimi_K25VideoProcessor.max_patches``)."""
TEMPORAL_PATCH_SIZE = 4
"""Frames per chunk (HF ``temporal_patch_size``)."""

VideoSource = str | os.PathLike | bytes
Clip = tuple[float, float]
"""A span ``(start_s, end_s)`` of the source video, in seconds from its start."""


@dataclass
class DecodedVideo:
    """Sampled RGB frames of one video and where they came from."""

    frames: np.ndarray
    """[T, H, W, 3] uint8 sampled frames."""
    frame_indices: np.ndarray
    """[T] int64 indices of the sampled frames in the source."""
    timestamps: np.ndarray
    """[T] float64 seconds: ``index / fps`` (HF ``VideoMetadata.timestamps``)."""
    fps: float
    """Average frame rate of the source."""
    total_frames: int
    """Frames in the source."""
    backend: str
    """``"decord"`` or ``"pyav"``."""
    timestamps_repaired: bool = False
    """The stream's own timestamps were broken (all equal / repeating): frames were timed by
    its nominal frame rate instead (see ``read_timing``)."""


@dataclass
class VideoChunk(MediaGrid):
    """Up to 4 consecutive sampled frames: one item of ``VisionInputs``."""

    pixel_values: torch.Tensor
    """[t*h*w, 3, 14, 14] float32 normalised patches, order (frame, row, col)."""
    grid_thw: tuple[int, int, int]
    """(t, h, w): t in 1..4 frames, h and w in patches (even)."""
    timestamp: float
    """Seconds of the chunk's first frame (written before the chunk in the prompt)."""
    frame_timestamps: tuple[float, ...] = ()
    """Seconds of every frame of the chunk."""
    chunk_index: int = 0
    """Position of the chunk in its video (0 = first); ``chunk_frames`` numbers them."""
    is_fast: bool = False
    """A SlowFast fast chunk (reduced grid; see slowfast.py); False on the uniform path."""


@dataclass
class ProcessedVideo:
    """A video as chunks, in order."""

    chunks: list[VideoChunk]
    fps: float
    total_frames: int
    frame_indices: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))

    @property
    def num_tokens(self) -> int:
        """LLM placeholder tokens over all chunks."""
        return sum(c.num_tokens for c in self.chunks)

    @property
    def num_patches(self) -> int:
        """ViT patches over all chunks."""
        return sum(c.num_patches for c in self.chunks)


# ---------------------------------------------------------------------------------------- sampling


def clip_frame_range(total_frames: int, video_fps: float, clip: Clip | None) -> tuple[int, int]:
    """Source frames ``[first, end)`` of a clip span: frame ``i`` (shown at ``i / video_fps``)
    is inside when ``start_s <= i / video_fps < end_s`` (1e-6 frame of float tolerance).

    Raises:
        MediaDecodeError: A span that holds no frame of the video (reason ``video_empty``).
    """
    if clip is None:
        return 0, total_frames
    start_s, end_s = float(clip[0]), float(clip[1])
    first = max(0, math.ceil(start_s * video_fps - 1e-6))
    end = min(total_frames, math.ceil(end_s * video_fps - 1e-6))
    if end <= first:
        raise MediaDecodeError(
            f"clip span [{start_s:g}, {end_s:g}) s holds no frame of a {total_frames}-frame "
            f"video at {video_fps:g} fps", reason=SkipReason.VIDEO_EMPTY)
    return first, end


def sample_frame_indices(
    total_frames: int,
    video_fps: float,
    fps: float = VIDEO_FPS,
    max_frames: int | None = VIDEO_MAX_FRAMES,
    clip: Clip | None = None,
) -> np.ndarray:
    """Indices of the frames to keep: HF's uniform rule at ``fps``, capped by ``max_frames``.

    Args:
        total_frames: Frames in the source (> 0).
        video_fps: Source frame rate (> 0).
        fps: Target rate.
        max_frames: Frame budget (None: no cap).
        clip: Sample only inside this span (``clip_frame_range``): the same rule over the
            span's frames, offset by its first frame (indices stay those of the source).

    Returns:
        [n] int64 increasing indices, ``n >= 1``.
    """
    if total_frames < 1:
        raise ValueError(f"total_frames must be >= 1, got {total_frames}")
    if not video_fps > 0:
        raise ValueError(f"video_fps must be > 0, got {video_fps}")
    first, end = clip_frame_range(total_frames, video_fps, clip)
    span = end - first
    num = max(1, int(span / video_fps * fps))
    num = min(num, span)  # HF raises here; a low-fps source just keeps every frame
    if max_frames is not None:
        num = min(num, max(1, max_frames))
    return first + np.arange(num, dtype=np.int64) * span // num


# ----------------------------------------------------------------------------------- timing


@dataclass(frozen=True)
class VideoTiming:
    """What the PyAV header and a demux (no decoding) say about a stream's timing."""

    total_frames: int
    """Frame count in the header (0: the container does not say)."""
    fps: float
    """Rate to time frames by: the average rate, or the nominal rate when repaired."""
    repaired: bool
    """The packet timestamps were broken and ``fps`` is the nominal rate."""
    height: int
    width: int
    frame_pts: tuple[int, ...] = ()
    """Sorted presentation timestamps of the frames (packets the decoder keeps): frame ``i`` is
    shown at ``frame_pts[i]``. Empty when the timestamps were repaired."""
    keyframe_pts: tuple[int, ...] = ()
    """Sorted presentation timestamps of the keyframes (where decoding can start)."""


def nominal_rate(stream) -> float:
    """The rate a stream declares apart from its timestamps: the codec's frame rate (H.264 VUI,
    MPEG-4 time base), else the container's base rate (e.g. Matroska's default duration)."""
    for rate in (stream.codec_context.framerate, stream.base_rate):
        if rate and float(rate) > 0:
            return float(rate)
    return 0.0


def stream_timing(container, stream) -> VideoTiming:
    """Timing of an open PyAV stream; demuxes it to the end (reopen or seek to decode).

    Packet timestamps (presentation, any order) must be present and distinct; all zero or
    repeating ones are repaired from ``nominal_rate``.

    Raises:
        BadSampleError: Broken timestamps and no nominal rate (reason ``bad_timestamps``).
    """
    rate = stream.average_rate or stream.guessed_rate
    fps = float(rate) if rate else 0.0
    total = int(stream.frames)
    height, width = stream.codec_context.height, stream.codec_context.width
    packets = [(p.pts, p.is_keyframe, p.is_discard) for p in container.demux(stream) if p.size]
    pts = [t for t, _, _ in packets]
    broken = len(pts) >= 2 and (None in pts or len(set(pts)) < len(pts))
    if not broken:
        shown = [(t, key) for t, key, discard in packets if t is not None and not discard]
        return VideoTiming(total_frames=total, fps=fps, repaired=False, height=height,
                           width=width, frame_pts=tuple(sorted(t for t, _ in shown)),
                           keyframe_pts=tuple(sorted(t for t, key in shown if key)))
    nominal = nominal_rate(stream)
    if nominal <= 0:
        shown = sorted({p for p in pts if p is not None})[:4]
        raise BadSampleError(
            f"{len(pts)} frames with broken timestamps (distinct pts {shown}...) and no "
            "nominal frame rate to rebuild them from", reason=SkipReason.BAD_TIMESTAMPS)
    return VideoTiming(total_frames=total, fps=nominal, repaired=True, height=height,
                       width=width)


def read_timing(source: VideoSource) -> VideoTiming | None:
    """``stream_timing`` of a file or bytes; None when PyAV cannot read it (the decoders then
    report the damage) or PyAV is missing.

    Raises:
        BadSampleError: Broken timestamps and no nominal rate (reason ``bad_timestamps``).
    """
    try:
        import av
    except ImportError:
        return None
    uri, _ = _open_arg(source)
    try:
        with av.open(uri) as container:
            if not container.streams.video:
                return None
            return stream_timing(container, container.streams.video[0])
    except BadSampleError:
        raise
    except Exception:  # av.error.* on damaged input: left to the decoders' own reports
        return None


# ---------------------------------------------------------------------------------------- decoding


def _open_arg(source: VideoSource) -> tuple[str | io.BytesIO, str]:
    if isinstance(source, (bytes, bytearray, memoryview)):
        return io.BytesIO(bytes(source)), f"<{len(source)} bytes>"
    path = Path(source)
    if not path.is_file():
        raise MediaMissingError(f"video file not found: {path}")
    return str(path), str(path)


_DECORD_QUIET = False


def _quiet_decord(decord_module) -> None:
    """Silence decord's bundled ffmpeg log (one line per corrupt file otherwise; our
    ``SkipCounter`` reports skips). decord's own C++ ``LOG(ERROR)`` lines cannot be silenced."""
    global _DECORD_QUIET
    if not _DECORD_QUIET:
        decord_module.logging.set_level(decord_module.logging.QUIET)
        _DECORD_QUIET = True


def _decode_decord(
    source: VideoSource, fps: float, max_frames: int | None, num_threads: int,
    clip: Clip | None = None,
) -> DecodedVideo:
    import decord  # optional: PyAV takes over when it is missing

    _quiet_decord(decord)
    uri, _ = _open_arg(source)
    reader = decord.VideoReader(uri, ctx=decord.cpu(0), num_threads=num_threads)
    total = len(reader)
    video_fps = float(reader.get_avg_fps())
    if total < 1 or not video_fps > 0:
        raise MediaDecodeError(
            f"decord: no frames (frames={total}, fps={video_fps})", reason=SkipReason.VIDEO_EMPTY
        )
    indices = sample_frame_indices(total, video_fps, fps, max_frames, clip)
    frames = reader.get_batch(indices.tolist()).asnumpy()
    if frames.shape[0] != len(indices):
        raise MediaDecodeError(f"decord returned {frames.shape[0]} of {len(indices)} frames")
    return DecodedVideo(
        frames=np.ascontiguousarray(frames, dtype=np.uint8),
        frame_indices=indices,
        timestamps=indices / video_fps,
        fps=video_fps,
        total_frames=total,
        backend="decord",
    )


def _decode_pyav(
    source: VideoSource, fps: float, max_frames: int | None, clip: Clip | None = None,
    timing: VideoTiming | None = None,
) -> DecodedVideo:
    """PyAV decode: frame ``i`` is the i-th frame out of the decoder. With ``timing``'s index
    (intact timestamps) only what the sampled frames need is decoded (``video_pyav``), else the
    stream is decoded in order; a repaired ``timing`` replaces the stream's own frame rate."""
    import av

    uri, _ = _open_arg(source)
    with av.open(uri) as container:
        if not container.streams.video:
            raise MediaDecodeError("pyav: no video stream", reason=SkipReason.VIDEO_EMPTY)
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate
        video_fps = float(rate) if rate else 0.0
        if timing is not None and timing.repaired:
            video_fps = timing.fps
        total = int(stream.frames)
        if total <= 0:  # containers without a frame count: count with a first pass (no RGB)
            total = sum(1 for _ in container.decode(stream))
            container.seek(0)
        if total < 1 or not video_fps > 0:
            raise MediaDecodeError(
                f"pyav: no frames (frames={total}, fps={video_fps})", reason=SkipReason.VIDEO_EMPTY
            )
        indices = sample_frame_indices(total, video_fps, fps, max_frames, clip)
        frames = None
        if timing is not None and timing.frame_pts:
            frames = decode_sampled(container, stream, indices, timing.frame_pts,
                                    timing.keyframe_pts)
            if frames is None:  # the index could not place every frame: decode in order
                container.seek(0)
        if frames is None:
            frames = _decode_in_order(container, stream, indices)
    if len(frames) != len(indices):  # stream ended early: truncated without an error
        raise MediaDecodeError(
            f"pyav: stream ended after {len(frames)} of {len(indices)} sampled frames "
            f"(header says {total} frames)"
        )
    return DecodedVideo(
        frames=np.stack(frames).astype(np.uint8, copy=False),
        frame_indices=indices,
        timestamps=indices / video_fps,
        fps=video_fps,
        total_frames=total,
        backend="pyav",
        timestamps_repaired=timing is not None and timing.repaired,
    )


def _decode_in_order(container, stream, indices: np.ndarray) -> list[np.ndarray]:
    """Frame ``i`` is the i-th frame out of the decoder; decodes up to the last sampled one."""
    wanted = set(indices.tolist())
    last = int(indices[-1])
    frames = []
    for i, frame in enumerate(container.decode(stream)):
        if i in wanted:
            frames.append(frame.to_ndarray(format="rgb24"))
        if i >= last:
            break
    return frames


def decode_video(
    source: VideoSource,
    fps: float = VIDEO_FPS,
    max_frames: int | None = VIDEO_MAX_FRAMES,
    backend: str = "auto",
    num_threads: int = 1,
    clip: Clip | None = None,
) -> DecodedVideo:
    """Decode and sample a video from a path or encoded bytes.

    Args:
        source: File path or the file's bytes.
        fps: Target sampling rate.
        max_frames: Frame budget (None: no cap).
        backend: ``"auto"`` (by measurement: PyAV first for sparse sampling or large frames,
            see ``SPARSE_SAMPLING``, decord first otherwise; the other one when the first is
            missing or fails), ``"decord"`` or ``"pyav"``. A stream with repaired timestamps is
            always decoded by PyAV (decord seeks by timestamp and returns wrong frames for it).
        num_threads: decord decoding threads (1 suits DataLoader workers).
        clip: Sample only inside this span of the source (``sample_frame_indices``).

    Raises:
        MediaMissingError: A path that does not exist.
        MediaDecodeError: Neither backend decodes every sampled frame (reason ``video_decode``,
            or ``video_empty`` for a stream without frames or a span without frames).
        BadSampleError: Broken timestamps and no nominal frame rate (``bad_timestamps``).
    """
    if backend not in ("auto", "decord", "pyav"):
        raise ValueError(f"backend must be 'auto', 'decord' or 'pyav', got {backend!r}")
    _open_arg(source)  # missing file -> MediaMissingError before any decoder runs
    timing = read_timing(source)
    if timing is not None and timing.repaired:
        order = ["pyav"]
    elif backend != "auto":
        order = [backend]
    else:
        first = _prefer_pyav(timing, fps, max_frames, clip)
        order = ["pyav", "decord"] if first else ["decord", "pyav"]
    errors: list[str] = []
    reasons: list[str] = []
    for name in order:
        try:
            if name == "decord":
                return _decode_decord(source, fps, max_frames, num_threads, clip)
            return _decode_pyav(source, fps, max_frames, clip, timing)
        except Exception as exc:  # decord: RuntimeError, DECORDError; PyAV: av.error.* (e.g.
            if isinstance(exc, ImportError) and name == "decord":  # InvalidDataError), OSError
                if backend == "decord":
                    raise
                errors.append(f"decord unavailable: {exc}")
                continue
            err = _as_decode_error(exc, name)
            if backend == "decord":
                raise err from exc
            errors.append(str(err))
            reasons.append(err.reason)
    # "empty" only when every decoder says so; a truncated file can look stream-less to one.
    empty = all(r == SkipReason.VIDEO_EMPTY for r in reasons)
    reason = SkipReason.VIDEO_EMPTY if empty else SkipReason.VIDEO_DECODE
    raise MediaDecodeError("cannot decode video: " + "; ".join(errors), reason=reason)


SPARSE_SAMPLING = 0.5
"""``auto`` decodes with PyAV first when at most this fraction of the frames from the first to
the last sampled one is sampled: ``video_pyav`` skips the others' decoding (2 fps of 30: 0.86x
the fastest raw decoder of the same frames at 720p; ``benchmarks/media_floor.py``)."""
PYAV_DENSE_MIN_PIXELS = 640 * 360
"""Denser sampling: PyAV first from this frame size up, decord first below it (every frame, 2 s
clips: decord 4% faster at 320x240 and 480x270, PyAV 11% faster at 640x360 and 37% at 720p)."""


def _prefer_pyav(timing: VideoTiming | None, fps: float, max_frames: int | None,
                 clip: Clip | None) -> bool:
    """``auto``'s measured rule: PyAV first for sparse sampling or large frames."""
    if timing is None or not timing.frame_pts or timing.total_frames < 1 or not timing.fps > 0:
        return False  # no index to place frames by: decord first, as before
    if timing.height * timing.width >= PYAV_DENSE_MIN_PIXELS:
        return True
    try:
        indices = sample_frame_indices(timing.total_frames, timing.fps, fps, max_frames, clip)
    except MediaDecodeError:  # a span without frames: the decoders report it
        return False
    span = int(indices[-1]) - int(indices[0]) + 1
    return len(indices) <= SPARSE_SAMPLING * span


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:200] if text else ""


def _as_decode_error(exc: Exception, backend: str) -> MediaDecodeError:
    if isinstance(exc, MediaDecodeError):
        return exc
    return MediaDecodeError(
        f"{backend}: {type(exc).__name__}: {_first_line(exc)}", reason=SkipReason.VIDEO_DECODE
    )


# -------------------------------------------------------------------------------------- chunking


def chunk_frames(
    frames_thwc: np.ndarray,
    timestamps: np.ndarray | list[float],
    max_patches: int = VIDEO_CHUNK_MAX_PATCHES,
    temporal_patch_size: int = TEMPORAL_PATCH_SIZE,
    max_patches_per_side: int = MAX_PATCHES_PER_SIDE,
    normalized: bool = True,
) -> list[VideoChunk]:
    """Split sampled frames into chunks of up to ``temporal_patch_size`` (last one short) and
    size, normalise and patchify each like an image.

    Args:
        frames_thwc: [T, H, W, 3] uint8, T >= 1.
        timestamps: [T] seconds of each frame.
        max_patches: Budget of one frame's grid (4096 for video).
        temporal_patch_size: Frames per chunk.
        max_patches_per_side: Per-side limit in patches.
        normalized: Float32 normalised patches (default) or uint8 ones (``normalize`` later:
            the hand-over form; see ``image.frames_to_patches``).
    """
    frames_thwc = np.asarray(frames_thwc)
    if frames_thwc.ndim != 4 or frames_thwc.shape[-1] != 3 or frames_thwc.shape[0] < 1:
        raise ValueError(f"expected [T>=1, H, W, 3] frames, got {frames_thwc.shape}")
    timestamps = [float(t) for t in timestamps]
    if len(timestamps) != frames_thwc.shape[0]:
        raise ValueError(f"{len(timestamps)} timestamps for {frames_thwc.shape[0]} frames")
    height, width = frames_thwc.shape[1:3]
    resized_hw, padded_hw = navit_resize(
        height, width, PATCH_SIZE, MERGE_SIZE, max_patches, max_patches_per_side
    )
    h, w = padded_hw[0] // PATCH_SIZE, padded_hw[1] // PATCH_SIZE
    chunks = []
    for start in range(0, frames_thwc.shape[0], temporal_patch_size):
        part = frames_thwc[start : start + temporal_patch_size]
        pixels = frames_to_patches(part, resized_hw, padded_hw, normalized=normalized)
        stamps = tuple(timestamps[start : start + len(part)])
        chunks.append(
            VideoChunk(
                pixel_values=pixels,
                grid_thw=(len(part), h, w),
                timestamp=stamps[0],
                frame_timestamps=stamps,
                chunk_index=len(chunks),
            )
        )
    return chunks


def process_video(
    source: VideoSource | DecodedVideo,
    fps: float = VIDEO_FPS,
    max_frames: int | None = VIDEO_MAX_FRAMES,
    max_patches: int = VIDEO_CHUNK_MAX_PATCHES,
    backend: str = "auto",
    clip: Clip | None = None,
    normalized: bool = True,
) -> ProcessedVideo:
    """Decode (unless given decoded frames), sample and chunk one video (``normalized=False``:
    uint8 patches, see ``chunk_frames``).

    Raises:
        MediaMissingError / MediaDecodeError / BadSampleError: See ``decode_video``.
    """
    decoded = (
        source
        if isinstance(source, DecodedVideo)
        else decode_video(source, fps=fps, max_frames=max_frames, backend=backend, clip=clip)
    )
    chunks = chunk_frames(decoded.frames, decoded.timestamps, max_patches=max_patches,
                          normalized=normalized)
    return ProcessedVideo(
        chunks=chunks,
        fps=decoded.fps,
        total_frames=decoded.total_frames,
        frame_indices=decoded.frame_indices,
    )
