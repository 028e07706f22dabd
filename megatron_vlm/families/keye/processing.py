"""Keye-VL 1.5 image and video preprocessing, as the released ``keye-vl-utils`` 1.5.2 computes it.

Read from the package's ``vision_process.py`` (the code wins over the report, arXiv 2509.01563,
and over our notes). numpy/PIL/torch only: the package's cv2 (HSV) and einops steps are computed
here with the same integer and float operations (``slowfast.rgb_to_hsv``), and torchvision is
never imported. ``tests/reference/test_keye_processing.py`` checks each step against the package.

**Images** (``fetch_image``): ``smart_resize`` with factor 28 -- each side rounded to a multiple
of 28 (at least 28); above 20,480 tokens (16,056,320 px) both sides are floored after scaling by
``sqrt(h*w / max_pixels)``, below 4 tokens (3,136 px) ceiled after scaling up; an aspect ratio
above 200 is refused. Then ``PIL.Image.resize`` with its default filter (bicubic) on the RGB
image. A token is 28x28 px: 2x2 ViT patches of 14 px merged.

**Videos** (``fetch_video`` with a file, decord): ``k = min(int(n / src_fps * fps), max_frames)``
frames at ``fps = min(2, src_fps)``, ``max_frames = int(65,536 * 784 / (48 * 784)) = 1,365``;
indices ``torch.linspace(0, n - 1, k).round()`` (float32, half to even); timestamps
``float32(i / src_fps)`` seconds, written ``f"{ts:.1f}"`` after ``<|frame|>`` by the released
HF processor. Then SlowFast (``slowfast.py``): frame types, the slow-token search against the
65,536-token budget and the two frame sizes. The package only *sizes* the frames; the released HF
processor (``processing_keye_vl_1_5.py``, remote code) resizes them with
``interpolate(bilinear, antialias=True)`` on uint8 (``resize_video_frames``; that step is not in
``keye-vl-utils`` and is not compared).

Not taken over from the package: the ``video`` given as a list of images (a different sampling
rule), ``video_start``/``video_end`` (the package refuses them with decord) and URL/base64 inputs.
A clip too short to sample one frame (``k == 0``; the package fails with an IndexError there) is a
``BadSampleError`` (``video_empty``).
"""

from __future__ import annotations

import io
import math
import os
from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch

from megatron_vlm.data.media_errors import BadSampleError, SkipReason

FACTOR = 28
"""Pixels per side of one LLM token (2x2 merged 14-px ViT patches)."""
PATCH_SIZE = 14
"""ViT patch side in pixels."""
PIXELS_PER_TOKEN = FACTOR * FACTOR
"""784."""
MAX_RATIO = 200
"""Largest accepted aspect ratio (long side / short side)."""
IMAGE_MIN_TOKENS = 4
"""Token floor of an image (3,136 px)."""
IMAGE_MAX_TOKENS = 20480
"""Token ceiling of an image (16,056,320 px)."""
VIDEO_FPS = 2.0
"""Target sampling rate; a slower source keeps its own rate."""
VIDEO_MIN_TOKENS = 48
"""Token floor of a video frame, and the floor of a fast frame's token share."""
VIDEO_MAX_TOKENS = 768
"""Token ceiling of a slow video frame."""
VIDEO_TOTAL_TOKENS = 65536
"""Token budget of one video (all frames, slow and fast)."""


# ------------------------------------------------------------------------------------------ sizes


def smart_resize(
    height: int,
    width: int,
    *,
    factor: int = FACTOR,
    min_pixels: float = IMAGE_MIN_TOKENS * PIXELS_PER_TOKEN,
    max_pixels: float = IMAGE_MAX_TOKENS * PIXELS_PER_TOKEN,
) -> tuple[int, int]:
    """Target ``(height, width)``, multiples of ``factor``, as keye-vl-utils 1.5.2 sizes it.

    Python float arithmetic as the package does it: ``round`` (half to even) of ``side / factor``;
    when the rounded area leaves ``[min_pixels, max_pixels]``, both sides scaled by
    ``beta = sqrt(area ratio)`` and floored (too large) or ceiled (too small) to the factor.
    A floored side never drops below ``factor``.

    Raises:
        BadSampleError: An aspect ratio above 200 (reason ``bad_grid``; the package raises
            ValueError).
        ValueError: A side below 1 px.
    """
    if height < 1 or width < 1:
        raise ValueError(f"image size must be at least 1x1 px, got {height}x{width}")
    if max(height, width) / min(height, width) > MAX_RATIO:
        raise BadSampleError(
            f"aspect ratio {max(height, width) / min(height, width):g} of a {height}x{width} "
            f"image is above Keye's limit of {MAX_RATIO}", reason=SkipReason.BAD_GRID)
    h_bar = max(factor, round(height / factor) * factor)
    w_bar = max(factor, round(width / factor) * factor)
    if h_bar * w_bar > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h_bar = math.floor(height / beta / factor) * factor
        w_bar = math.floor(width / beta / factor) * factor
    elif h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return max(h_bar, factor), max(w_bar, factor)


def patch_grid(size: tuple[int, int]) -> tuple[int, int]:
    """``(h, w)`` in 14-px ViT patches of a resized ``(height, width)`` (both even)."""
    return size[0] // PATCH_SIZE, size[1] // PATCH_SIZE


# ----------------------------------------------------------------------------------------- images


@dataclass
class KeyeImage:
    """One image resized for the Keye vision tower."""

    pixels: np.ndarray
    """[H, W, 3] uint8 RGB, H and W multiples of 28."""
    grid_hw: tuple[int, int]
    """(h, w) in 14-px patches: ``h*w`` ViT patches, ``h*w/4`` LLM tokens."""

    @property
    def num_tokens(self) -> int:
        """LLM placeholder tokens (2x2 merge)."""
        return self.grid_hw[0] * self.grid_hw[1] // 4


def resize_image(
    image: PIL.Image.Image | np.ndarray,
    *,
    min_tokens: int = IMAGE_MIN_TOKENS,
    max_tokens: int = IMAGE_MAX_TOKENS,
) -> KeyeImage:
    """``fetch_image``: RGB, ``smart_resize`` bounds in tokens, PIL's bicubic resize.

    Args:
        image: A PIL image (any mode; converted to RGB as the package does, alpha dropped, EXIF
            orientation not applied) or a [H, W, 3] uint8 RGB array.
        min_tokens: Token floor (package default 4).
        max_tokens: Token ceiling (package default 20,480).
    """
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected a [H, W, 3] uint8 array, got {image.dtype} {image.shape}")
        image = PIL.Image.fromarray(image)
    image = image.convert("RGB")
    width, height = image.size
    size = smart_resize(height, width, min_pixels=min_tokens * PIXELS_PER_TOKEN,
                        max_pixels=max_tokens * PIXELS_PER_TOKEN)
    # PIL's default filter for RGB (bicubic since Pillow 7), as ``image.resize(size)`` applies.
    resized = image.resize((size[1], size[0]), PIL.Image.Resampling.BICUBIC)
    return KeyeImage(pixels=np.asarray(resized, dtype=np.uint8), grid_hw=patch_grid(size))


# --------------------------------------------------------------------------------------- sampling


def num_sampled_frames(
    total_frames: int,
    video_fps: float,
    *,
    fps: float = VIDEO_FPS,
    min_tokens: int = VIDEO_MIN_TOKENS,
    total_tokens: int = VIDEO_TOTAL_TOKENS,
    max_frames: int | None = None,
) -> int:
    """``smart_nframes``: ``min(int(n / src_fps * min(fps, src_fps)), max_frames)``.

    ``max_frames`` is at most ``int(total_tokens / min_tokens)`` (1,365 by default): every frame
    must be able to get the token floor. May return 0 for a clip shorter than one interval.
    """
    if total_frames < 1 or not video_fps > 0:
        raise ValueError(f"need total_frames >= 1 and video_fps > 0, got {total_frames}, "
                         f"{video_fps}")
    fps = min(fps, video_fps)
    cap = int(total_tokens / min_tokens)
    if max_frames is not None:
        cap = min(max_frames, cap)
    return min(int(total_frames / video_fps * fps), cap)


def sample_frame_indices(total_frames: int, num_frames: int) -> np.ndarray:
    """``torch.linspace(0, n - 1, k).round()`` (float32, round half to even) as int64."""
    return torch.linspace(0, total_frames - 1, num_frames).round().long().numpy()


def frame_timestamps(indices: np.ndarray, video_fps: float) -> np.ndarray:
    """Seconds of each frame: ``float32((1 / src_fps) * i)``, the package's FloatTensor."""
    return np.asarray([(1 / video_fps) * int(i) for i in indices], dtype=np.float32)


def timestamp_text(seconds: float | np.floating) -> str:
    """The text after ``<|frame|>``: ``format(ts, ".1f")`` of the float32 timestamp."""
    return f"{float(np.float32(seconds)):.1f}"


# ----------------------------------------------------------------------------------------- videos


@dataclass
class KeyeVideo:
    """A sampled video, typed and sized by Keye's SlowFast rules (frames not yet resized)."""

    frames: np.ndarray
    """[T, H, W, 3] uint8 sampled source frames (full resolution)."""
    frame_indices: np.ndarray
    """[T] int64 indices of the sampled frames in the source."""
    timestamps: np.ndarray
    """[T] float32 seconds (``index / video_fps``)."""
    frame_types: np.ndarray
    """[T] int32: 0 slow, 1 fast (frame 0 is always slow)."""
    slow_size: tuple[int, int]
    """(height, width) in px of every slow frame (multiples of 28)."""
    fast_size: tuple[int, int]
    """(height, width) in px of every fast frame (multiples of 28)."""
    slow_tokens_searched: int
    """Result of the slow-token search (``slowfast.slow_token_budget``), before sizing."""
    video_fps: float
    """Average frame rate of the source."""
    total_frames: int
    """Frames in the source."""

    @property
    def is_fast(self) -> np.ndarray:
        """[T] bool: the frame is fast."""
        return self.frame_types == 1

    @property
    def frame_sizes(self) -> list[tuple[int, int]]:
        """(height, width) in px of each frame, by its type."""
        return [self.fast_size if t else self.slow_size for t in self.frame_types.tolist()]

    @property
    def frame_grids(self) -> list[tuple[int, int]]:
        """(h, w) in 14-px patches of each frame."""
        return [patch_grid(s) for s in self.frame_sizes]

    @property
    def timestamp_texts(self) -> list[str]:
        """``f"{ts:.1f}"`` of each frame (the text after ``<|frame|>``)."""
        return [timestamp_text(t) for t in self.timestamps]

    @property
    def num_tokens(self) -> int:
        """LLM placeholder tokens over all frames (2x2 merge; markers not counted)."""
        return sum(h * w // 4 for h, w in self.frame_grids)


def plan_video(
    frames: np.ndarray,
    frame_indices: np.ndarray,
    video_fps: float,
    total_frames: int,
    *,
    min_tokens: int = VIDEO_MIN_TOKENS,
    max_tokens: int = VIDEO_MAX_TOKENS,
    total_tokens: int = VIDEO_TOTAL_TOKENS,
    min_frame_similarity: float | None = None,
) -> KeyeVideo:
    """``fetch_video`` after decoding: SlowFast types, then the slow and fast frame sizes.

    Args:
        frames: [T, H, W, 3] uint8 sampled frames (``sample_frame_indices`` of the source).
        frame_indices: [T] their indices in the source.
        video_fps: Source frame rate (for the timestamps).
        total_frames: Frames in the source.
        min_tokens: Per-frame token floor; raised to 48 as the package does.
        max_tokens: Slow-frame token ceiling (768).
        total_tokens: Token budget of the video (65,536).
        min_frame_similarity: Below this a frame becomes slow (None: the package's 0.9).
    """
    # slowfast.py imports smart_resize from here: imported at call time to avoid the cycle.
    from megatron_vlm.families.keye import slowfast

    if frames.ndim != 4 or frames.shape[3] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"expected [T, H, W, 3] uint8 frames, got {frames.dtype} {frames.shape}")
    if frames.shape[0] < 1:
        raise BadSampleError("no frames sampled from the video", reason=SkipReason.VIDEO_EMPTY)
    threshold = slowfast.MIN_FRAME_SIMILARITY if min_frame_similarity is None \
        else min_frame_similarity
    frame_types = slowfast.slow_fast_types(frames, threshold=threshold)
    num_fast = int(frame_types.sum())
    height, width = frames.shape[1:3]
    sizes = slowfast.slow_fast_sizes(
        height, width, num_slow=len(frame_types) - num_fast, num_fast=num_fast,
        min_tokens=min_tokens, max_tokens=max_tokens, total_tokens=total_tokens)
    return KeyeVideo(
        frames=frames,
        frame_indices=np.asarray(frame_indices, dtype=np.int64),
        timestamps=frame_timestamps(frame_indices, video_fps),
        frame_types=frame_types,
        slow_size=sizes.slow_size,
        fast_size=sizes.fast_size,
        slow_tokens_searched=sizes.slow_tokens_searched,
        video_fps=float(video_fps),
        total_frames=int(total_frames),
    )


def read_video(
    source: str | os.PathLike | bytes,
    *,
    fps: float = VIDEO_FPS,
    min_tokens: int = VIDEO_MIN_TOKENS,
    max_tokens: int = VIDEO_MAX_TOKENS,
    total_tokens: int = VIDEO_TOTAL_TOKENS,
    max_frames: int | None = None,
    min_frame_similarity: float | None = None,
) -> KeyeVideo:
    """``fetch_video`` on a file or its bytes: decord (``len``, ``get_avg_fps``, ``get_batch``)
    as the package reads it, then ``plan_video``.

    Raises:
        BadSampleError: No frame to sample (``video_empty``) or an aspect ratio above 200.
    """
    import decord  # as the package reads files (frame indices and fps as decord counts them)

    uri = io.BytesIO(bytes(source)) if isinstance(source, (bytes, bytearray)) else str(source)
    reader = decord.VideoReader(uri, ctx=decord.cpu(0), num_threads=1)
    total, video_fps = len(reader), float(reader.get_avg_fps())
    if total < 1 or not video_fps > 0:
        raise BadSampleError(f"video without frames (frames={total}, fps={video_fps})",
                             reason=SkipReason.VIDEO_EMPTY)
    # The package derives max_frames from min_pixels before clamping it to 48 tokens.
    num = num_sampled_frames(total, video_fps, fps=fps, min_tokens=min_tokens,
                             total_tokens=total_tokens, max_frames=max_frames)
    if num < 1:
        raise BadSampleError(
            f"a {total}-frame video at {video_fps:g} fps is too short to sample a frame at "
            f"{min(fps, video_fps):g} fps", reason=SkipReason.VIDEO_EMPTY)
    indices = sample_frame_indices(total, num)
    frames = reader.get_batch(indices.tolist()).asnumpy()
    return plan_video(np.ascontiguousarray(frames), indices, video_fps, total,
                      min_tokens=min_tokens, max_tokens=max_tokens, total_tokens=total_tokens,
                      min_frame_similarity=min_frame_similarity)


def resize_video_frames(frames: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Frames to ``size`` as the released HF processor does: ``interpolate`` bilinear with
    antialias on the uint8 [T, 3, H, W] frames (uint8 result, later cast to float).

    Args:
        frames: [T, H, W, 3] uint8.
        size: (height, width) in px (``KeyeVideo.slow_size`` or ``fast_size``).

    Returns:
        [T, height, width, 3] uint8.
    """
    if len(frames) == 0:
        return np.zeros((0, size[0], size[1], 3), dtype=np.uint8)
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)
    y = torch.nn.functional.interpolate(x, list(size), mode="bilinear", antialias=True)
    return y.permute(0, 2, 3, 1).contiguous().numpy()
