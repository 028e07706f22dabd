"""GLM-4.1V / GLM-4.5V image and video preprocessing, as transformers 5.25 computes it.

Read from ``models/glm4v/image_processing_pil_glm4v.py`` (``Glm4vImageProcessorPil``) and
``video_processing_glm4v.py`` (``Glm4vVideoProcessor``); the code wins over the reports
(``../shared/FAMILIES.md`` §2). numpy/PIL/torch only: torchvision is never imported.
``tests/reference/test_glm_processing.py`` checks every step against those classes.

**Sizes** (``smart_resize``): the frame count ``t`` is rounded to the temporal factor 2, each side
to the factor 28 (2x2 merged 14-px patches; a side below 28 px is first scaled up with the aspect
kept); when ``t_bar * h_bar * w_bar`` leaves ``[min_pixels, max_pixels]`` both sides are scaled by
``sqrt`` of the area ratio (counted over ``t`` frames) and floored (at least 28) or ceiled. An
aspect ratio above 200 is refused. Images count as 2 frames: ``112*112 <= 2*H*W <= 28*28*15000``
px, i.e. 8 to 7,500 LLM tokens. A video's bound covers all its frames: ``28*28*2*30000`` px.

**Images** (``Glm4vImageProcessorPil``): RGB (transparency composited on white), PIL bicubic to
the size, then ``float32(float64(x) * (1/255))`` and ``(x - mean) / std`` in float32 with
OpenAI-CLIP's mean/std. The image is one *temporal patch*: its frame duplicated to 2 frames.

**Videos** (``Glm4vVideoProcessor``): ``sample_frames`` at 2 fps (a clip longer than 300 s gets
600 frames spread over it), repeated indices dropped, an odd count padded by repeating the last
frame; frames resized as torchvision's ``resize`` does on uint8 tensors (``interpolate`` bicubic,
antialias: ``data/image.frames_to_patches``), normalised by the fused form
``(float32(x) - mean*255) / (std*255)`` in float32 (torchvision's ``normalize`` after
``_fuse_mean_std_and_rescale_factor``: other roundings than the image path's). Every 2 frames are
one temporal patch; the prompt writes ``str(int(ts))`` of its first frame's time
(``index / fps``) after it.

**Layout.** Patches are ours, not HF's: ``[2*h*w, 3, 14, 14]`` per temporal patch, raster order
(frame, row, col), grid ``(2, h, w)`` in frames (``data/contract.py``: ``t*h*w`` patches,
``h*w/4`` LLM tokens). ``patch_layout.hf_patch_rows`` gives transformers' ``pixel_values`` rows
(``[h*w, 3*2*14*14]``, block-major) and ``patch_layout.tower_inputs`` a packed batch's, for the
tower and the references.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch

from megatron_vlm.data.image import _to_rgb, frames_to_patches
from megatron_vlm.data.media_errors import BadSampleError, SkipReason
from megatron_vlm.families.glm.patch_layout import hf_patch_rows

PATCH_SIZE = 14
"""ViT patch side in pixels."""
MERGE_SIZE = 2
"""Patches per LLM token along each side (the tower's 2x2 downsample)."""
TEMPORAL_PATCH_SIZE = 2
"""Frames per temporal patch (the Conv3d's temporal kernel); an image is duplicated to 2."""
FACTOR = PATCH_SIZE * MERGE_SIZE
"""Pixels per side of one LLM token (28)."""
MAX_RATIO = 200
"""Largest accepted aspect ratio (long side / short side)."""
IMAGE_MIN_PIXELS = 112 * 112
"""``Glm4vImageProcessorPil.size["shortest_edge"]``: floor of ``2*H*W`` (an image is 2 frames)."""
IMAGE_MAX_PIXELS = 28 * 28 * 15000
"""``Glm4vImageProcessorPil.size["longest_edge"]``: ceiling of ``2*H*W`` (7,500 LLM tokens)."""
VIDEO_MIN_PIXELS = 112 * 112
"""``Glm4vVideoProcessor.size["shortest_edge"]``: floor of ``t*H*W`` over the sampled frames."""
VIDEO_MAX_PIXELS = 28 * 28 * 2 * 30000
"""``Glm4vVideoProcessor.size["longest_edge"]``: ceiling of ``t*H*W`` (30,000 LLM tokens)."""
VIDEO_FPS = 2.0
"""``Glm4vVideoProcessor.fps``: frames sampled per second."""
VIDEO_MAX_DURATION = 300
"""``Glm4vVideoProcessor.max_duration`` (s): a longer clip gets ``300 * fps`` frames in all."""
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
"""OpenAI-CLIP mean (transformers ``OPENAI_CLIP_MEAN``)."""
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
"""OpenAI-CLIP std (transformers ``OPENAI_CLIP_STD``)."""


# ------------------------------------------------------------------------------------------ sizes


def smart_resize(
    num_frames: int,
    height: int,
    width: int,
    *,
    temporal_factor: int = TEMPORAL_PATCH_SIZE,
    factor: int = FACTOR,
    min_pixels: int = IMAGE_MIN_PIXELS,
    max_pixels: int = IMAGE_MAX_PIXELS,
) -> tuple[int, int]:
    """Target ``(height, width)``, multiples of ``factor``, as transformers' GLM-4V sizes frames.

    Python float arithmetic as transformers does it (module docstring); ``num_frames`` is 2 for
    an image and the sampled frame count for a video.

    Raises:
        BadSampleError: An aspect ratio above 200 (reason ``bad_grid``; transformers raises
            ValueError).
        ValueError: Fewer frames than ``temporal_factor`` or a side below 1 px.
    """
    if num_frames < temporal_factor:
        raise ValueError(f"t:{num_frames} must be at least temporal_factor:{temporal_factor}")
    if height < 1 or width < 1:
        raise ValueError(f"frame size must be at least 1x1 px, got {height}x{width}")
    if height < factor or width < factor:
        scale = max(factor / height, factor / width)
        height, width = int(height * scale), int(width * scale)
    if max(height, width) / min(height, width) > MAX_RATIO:
        raise BadSampleError(
            f"aspect ratio {max(height, width) / min(height, width):g} of a {height}x{width} "
            f"frame is above GLM-4V's limit of {MAX_RATIO}", reason=SkipReason.BAD_GRID)
    h_bar = round(height / factor) * factor
    w_bar = round(width / factor) * factor
    t_bar = round(num_frames / temporal_factor) * temporal_factor
    if t_bar * h_bar * w_bar > max_pixels:
        beta = math.sqrt((num_frames * height * width) / max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif t_bar * h_bar * w_bar < min_pixels:
        beta = math.sqrt(min_pixels / (num_frames * height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def patch_grid(size: tuple[int, int]) -> tuple[int, int]:
    """``(h, w)`` in 14-px patches of a resized ``(height, width)`` (both even)."""
    return size[0] // PATCH_SIZE, size[1] // PATCH_SIZE


def image_size(height: int, width: int, *, min_pixels: int = IMAGE_MIN_PIXELS,
               max_pixels: int = IMAGE_MAX_PIXELS) -> tuple[int, int]:
    """Resized ``(height, width)`` of an image (counted as 2 frames)."""
    return smart_resize(TEMPORAL_PATCH_SIZE, height, width, min_pixels=min_pixels,
                        max_pixels=max_pixels)


def video_size(num_frames: int, height: int, width: int, *, min_pixels: int = VIDEO_MIN_PIXELS,
               max_pixels: int = VIDEO_MAX_PIXELS) -> tuple[int, int]:
    """Resized ``(height, width)`` of every frame of a video of ``num_frames`` sampled frames."""
    return smart_resize(num_frames, height, width, min_pixels=min_pixels, max_pixels=max_pixels)


def num_video_patches(num_frames: int, height: int, width: int, *,
                      min_pixels: int = VIDEO_MIN_PIXELS,
                      max_pixels: int = VIDEO_MAX_PIXELS) -> int:
    """``get_num_of_video_patches``: ``ceil(t/2) * h * w`` ViT patches (tokens before the 2x2
    merge) of a video of ``num_frames`` frames of ``height x width`` px."""
    h, w = patch_grid(video_size(num_frames, height, width, min_pixels=min_pixels,
                                 max_pixels=max_pixels))
    return -(-num_frames // TEMPORAL_PATCH_SIZE) * h * w


# ---------------------------------------------------------------------------------- normalising


_MEAN = torch.tensor(CLIP_MEAN, dtype=torch.float32).view(1, 3, 1, 1)
_STD = torch.tensor(CLIP_STD, dtype=torch.float32).view(1, 3, 1, 1)
# The video processor's fused constants: float32 tensors times 1 / (1/255) (= 255.0).
_MEAN_255 = (torch.tensor(CLIP_MEAN) * (1.0 / (1 / 255))).view(1, 3, 1, 1)
_STD_255 = (torch.tensor(CLIP_STD) * (1.0 / (1 / 255))).view(1, 3, 1, 1)


def normalize_patches(patches_u8: torch.Tensor, *, video: bool) -> torch.Tensor:
    """Float32 patches of uint8 ``[N, 3, p, p]`` patches, by the image or the video processor's
    arithmetic, bit for bit (both elementwise per channel, so patch order does not matter).

    Image: ``float32(float64(v) * (1/255))`` then ``(x - mean) / std`` in float32; the first step
    equals ``float32(v) / 255`` for every uint8 ``v`` (checked on all 256). Video:
    ``(float32(v) - mean*255) / (std*255)`` in float32.
    """
    if patches_u8.dtype != torch.uint8 or patches_u8.dim() != 4 or patches_u8.shape[1] != 3:
        raise ValueError(f"expected uint8 [N, 3, p, p] patches, got {patches_u8.dtype} "
                         f"{tuple(patches_u8.shape)}")
    x = patches_u8.to(torch.float32)
    if video:
        return x.sub_(_MEAN_255).div_(_STD_255)
    return x.div_(255).sub_(_MEAN).div_(_STD)


# ----------------------------------------------------------------------------------------- images


@dataclass
class GlmImage:
    """One image resized for the GLM vision tower."""

    pixels: np.ndarray
    """[H, W, 3] uint8 RGB, H and W multiples of 28."""
    grid_hw: tuple[int, int]
    """(h, w) in 14-px patches: one temporal patch of ``h*w`` ViT patches, ``h*w/4`` tokens."""

    @property
    def num_tokens(self) -> int:
        """LLM placeholder tokens (2x2 merge)."""
        return self.grid_hw[0] * self.grid_hw[1] // 4

    def patches(self) -> torch.Tensor:
        """``[2*h*w, 3, 14, 14]`` float32: the frame twice, raster order, normalised."""
        frames = np.broadcast_to(self.pixels, (TEMPORAL_PATCH_SIZE, *self.pixels.shape))
        size = self.pixels.shape[:2]
        return normalize_patches(frames_to_patches(frames, size, size, normalized=False),
                                 video=False)


def resize_image(
    image: PIL.Image.Image | np.ndarray,
    *,
    min_pixels: int = IMAGE_MIN_PIXELS,
    max_pixels: int = IMAGE_MAX_PIXELS,
) -> GlmImage:
    """``Glm4vImageProcessorPil``'s resize: RGB (transparency on white), ``smart_resize`` with
    2 frames, PIL bicubic.

    Args:
        image: A PIL image (any mode; EXIF orientation as given: the caller applies it, as
            transformers' ``load_image`` does) or a [H, W, 3] uint8 RGB array.
        min_pixels: Floor of ``2*H*W`` (112*112).
        max_pixels: Ceiling of ``2*H*W`` (28*28*15000).
    """
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected a [H, W, 3] uint8 array, got {image.dtype} {image.shape}")
        image = PIL.Image.fromarray(image)
    image = _to_rgb(image)
    size = image_size(image.height, image.width, min_pixels=min_pixels, max_pixels=max_pixels)
    if (image.height, image.width) != size:
        image = image.resize((size[1], size[0]), PIL.Image.Resampling.BICUBIC)
    return GlmImage(pixels=np.asarray(image, dtype=np.uint8), grid_hw=patch_grid(size))


# --------------------------------------------------------------------------------------- videos


def sample_frames(
    total_frames: int,
    video_fps: float,
    *,
    duration: float | None = None,
    fps: float = VIDEO_FPS,
    max_duration: float = VIDEO_MAX_DURATION,
) -> np.ndarray:
    """``Glm4vVideoProcessor.sample_frames``: indices of the frames to keep, an even count.

    Args:
        total_frames: Frames in the source (or the clip span).
        video_fps: Source frame rate.
        duration: Seconds (None or 0: ``round((n - 1) / fps) + 1``, as transformers falls back;
            its PyAV reader passes ``n / fps``).
        fps: Frames sampled per second.
        max_duration: Above this many seconds, ``int(max_duration * fps)`` frames spread over
            the clip.

    Returns:
        [k] int64 increasing indices (an odd count padded with the last index repeated).
    """
    if total_frames < 1 or not video_fps > 0:
        raise ValueError(f"need total_frames >= 1 and video_fps > 0, got {total_frames}, "
                         f"{video_fps}")
    last = total_frames - 1
    duration = duration or round(last / video_fps) + 1
    if duration <= max_duration:
        n = max(int(math.floor(duration * fps)), 1)
        indices = [min(last, int(math.ceil(i * video_fps / fps))) for i in range(n)]
    else:
        n = int(max_duration * fps)
        if n >= total_frames:
            indices = list(range(total_frames))
        else:
            seconds = np.linspace(0, duration, n, endpoint=True)
            indices = [min(last, int(math.ceil(s * video_fps))) for s in seconds]
    unique = list(dict.fromkeys(indices))
    if len(unique) % 2:
        unique.append(unique[-1])
    return np.asarray(unique, dtype=np.int64)


def frame_timestamps(indices: np.ndarray, video_fps: float) -> np.ndarray:
    """Seconds of each sampled frame: ``index / fps`` (transformers' ``VideoMetadata``)."""
    return np.asarray([int(i) / video_fps for i in indices], dtype=np.float64)


def timestamp_text(seconds: float) -> str:
    """The text after a temporal patch: ``str(int(ts))`` of its first frame's seconds."""
    return str(int(seconds))


def resize_video_frames(frames: np.ndarray, size: tuple[int, int]) -> torch.Tensor:
    """``[t*h*w, 3, 14, 14]`` float32 patches of sampled ``[t, H, W, 3]`` uint8 frames (``t``
    even): resized to ``size`` as torchvision does on uint8 (bicubic, antialias), normalised by
    the video processor's arithmetic, raster order (frame, row, col)."""
    if frames.ndim != 4 or frames.shape[3] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"expected [T, H, W, 3] uint8 frames, got {frames.dtype} {frames.shape}")
    if len(frames) % TEMPORAL_PATCH_SIZE:
        raise ValueError(f"{len(frames)} frames; a GLM video has an even number "
                         "(sample_frames pads an odd count)")
    return normalize_patches(frames_to_patches(frames, size, size, normalized=False),
                             video=True)


__all__ = ["CLIP_MEAN", "CLIP_STD", "GlmImage", "frame_timestamps", "hf_patch_rows",
           "image_size", "normalize_patches", "num_video_patches", "resize_image",
           "resize_video_frames", "sample_frames", "smart_resize", "timestamp_text",
           "video_size"]
