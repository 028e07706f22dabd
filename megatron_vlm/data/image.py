"""Images at native resolution for MoonViT (SPEC §2, §9): decode, size, pad, normalise, patchify.

Re-implements transformers 5.23 ``Kimi_K25ImageProcessor`` (which needs torchvision, unusable here):

1. ``navit_resize``: scale = min(1, sqrt(max_patches / patches), per-side limits) where ``patches``
   counts *whole* 14-px patches of the original (floor); never upscales; the new size truncates
   (``int``); then the size is **padded** (not rounded) up to multiples of patch x merge = 28.
2. Resize: bicubic with antialias on the uint8 image (torchvision ``resize`` -> torch's
   ``interpolate(..., mode="bicubic", antialias=True)`` on uint8, the kernel torchvision calls).
3. Pad bottom/right with 0 (before normalising, so padding ends up at -1.0).
4. Normalise (x/255 - 0.5)/0.5, computed as HF's fused form (x - 127.5)/127.5 in float32.
5. Patchify to ``[h*w, 3, 14, 14]`` in raster order (row, col); grid (1, h, w) in patches.

An image costs ``h*w`` ViT patches and ``h*w/4`` LLM placeholder tokens (2x2 merge).

Note (HF behaviour, kept): the budget bounds whole patches *before* padding, so the padded grid
may exceed ``max_patches`` slightly (1000x1000 px at 4096 -> 66x66 = 4356 patches).
"""

from __future__ import annotations

import io
import math
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageOps
import torch
import torch.nn.functional as F

from megatron_vlm.data.media_errors import MediaDecodeError, MediaMissingError, SkipReason

PATCH_SIZE = 14
"""ViT patch side in pixels."""
MERGE_SIZE = 2
"""Spatial merge kernel (2x2 patches -> one LLM token)."""
IMAGE_MAX_PATCHES = 16384
"""Default patch budget of one image (HF ``Kimi_K25ImageProcessor.max_patches``)."""
MAX_PATCHES_PER_SIDE = 512
"""Per-side limit in patches (HF ``size = {"max_height": 512, "max_width": 512}``)."""


def navit_resize(
    height: int,
    width: int,
    patch_size: int = PATCH_SIZE,
    merge_size: int = MERGE_SIZE,
    max_patches: int = IMAGE_MAX_PATCHES,
    max_patches_per_side: int = MAX_PATCHES_PER_SIDE,
) -> tuple[tuple[int, int], tuple[int, int]]:
    """HF ``navit_resize``: the resized size and the padded size, in pixels.

    Args:
        height: Original height in pixels.
        width: Original width in pixels.
        patch_size: ViT patch side.
        merge_size: Merge kernel side; padding goes to multiples of ``patch_size * merge_size``.
        max_patches: Budget of whole patches (counted on the original, floor division).
        max_patches_per_side: Per-side limit in patches.

    Returns:
        ``((new_height, new_width), (pad_height, pad_width))``.
    """
    if height < 1 or width < 1:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    # Same arithmetic as HF, floats included (max(1.0, ...) makes the counts floats).
    num_patches_h = max(1.0, height // patch_size)
    num_patches_w = max(1.0, width // patch_size)
    scale_for_total = math.sqrt(max_patches / (num_patches_h * num_patches_w))
    scale_for_height = (max_patches_per_side * patch_size) / height
    scale_for_width = (max_patches_per_side * patch_size) / width
    scale = min(1.0, scale_for_total, scale_for_height, scale_for_width)
    new_height = max(1, int(height * scale))
    new_width = max(1, int(width * scale))
    new_height = min(new_height, max_patches_per_side * patch_size)
    new_width = min(new_width, max_patches_per_side * patch_size)
    factor = merge_size * patch_size
    pad_height = (factor - new_height % factor) % factor + new_height
    pad_width = (factor - new_width % factor) % factor + new_width
    return (new_height, new_width), (pad_height, pad_width)


def grid_for_size(
    height: int,
    width: int,
    max_patches: int = IMAGE_MAX_PATCHES,
    patch_size: int = PATCH_SIZE,
    merge_size: int = MERGE_SIZE,
    max_patches_per_side: int = MAX_PATCHES_PER_SIDE,
) -> tuple[int, int]:
    """Patch grid ``(h, w)`` an image of this pixel size gets (no decoding needed)."""
    _, (pad_h, pad_w) = navit_resize(
        height, width, patch_size, merge_size, max_patches, max_patches_per_side
    )
    return pad_h // patch_size, pad_w // patch_size


def num_image_tokens(height: int, width: int, max_patches: int = IMAGE_MAX_PATCHES) -> int:
    """LLM placeholder tokens of an image of this pixel size: ``h*w/4``."""
    h, w = grid_for_size(height, width, max_patches)
    return h * w // (MERGE_SIZE * MERGE_SIZE)


class MediaGrid:
    """Patch and placeholder counts of a media item with a ``grid_thw`` (t, h, w) attribute."""

    grid_thw: tuple[int, int, int]

    @property
    def num_patches(self) -> int:
        """ViT patches: t*h*w."""
        t, h, w = self.grid_thw
        return t * h * w

    @property
    def num_tokens(self) -> int:
        """LLM placeholder tokens: h*w/4 (a video chunk's temporal mean keeps one frame's worth)."""
        _, h, w = self.grid_thw
        return h * w // (MERGE_SIZE * MERGE_SIZE)


@dataclass
class ProcessedImage(MediaGrid):
    """One image ready for the ViT: a single item of ``VisionInputs`` (t = 1)."""

    pixel_values: torch.Tensor
    """[h*w, 3, 14, 14] float32 normalised patches, raster order (row, col)."""
    grid_thw: tuple[int, int, int]
    """(1, h, w) in patches; h and w are even."""
    original_hw: tuple[int, int]
    """Decoded size in pixels."""
    resized_hw: tuple[int, int]
    """Size after resizing, before padding, in pixels."""



# ---------------------------------------------------------------------------------------- decoding


def _to_rgb(img: PIL.Image.Image) -> PIL.Image.Image:
    """HF ``convert_to_rgb``: transparency is composited onto white, anything else -> RGB."""
    has_alpha = "A" in img.getbands() or img.info.get("transparency") is not None
    if has_alpha:
        rgba = img.convert("RGBA")
        background = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return PIL.Image.alpha_composite(background, rgba).convert("RGB")
    return img.convert("RGB")


def decode_image(source: bytes | str | os.PathLike) -> np.ndarray:
    """Decode image bytes or a file to an RGB uint8 array ``[H, W, 3]``.

    EXIF orientation is applied (as HF ``load_image`` does); transparency is composited on white.

    Raises:
        MediaMissingError: ``source`` is a path that does not exist.
        MediaDecodeError: Corrupt, truncated or non-image data (reason ``image_decode``), or more
            pixels than PIL's decompression-bomb limit (reason ``image_too_large``).
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        stream: io.BytesIO | Path = io.BytesIO(bytes(source))
        where = f"<{len(source)} bytes>"
    else:
        stream = Path(source)
        where = str(stream)
        if not stream.is_file():
            raise MediaMissingError(f"image file not found: {where}")
    try:
        with warnings.catch_warnings():
            # PIL warns before raising on bombs; the error is what we act on.
            warnings.simplefilter("error", PIL.Image.DecompressionBombWarning)
            with PIL.Image.open(stream) as img:
                img.load()  # decode now: truncated data raises here, not lazily later
                img = PIL.ImageOps.exif_transpose(img)
                rgb = _to_rgb(img)
    except (PIL.Image.DecompressionBombError, PIL.Image.DecompressionBombWarning) as exc:
        raise MediaDecodeError(
            f"image too large to decode {where}: {exc}", reason=SkipReason.IMAGE_TOO_LARGE
        ) from exc
    except (OSError, ValueError, SyntaxError, EOFError, IndexError, TypeError) as exc:
        # PIL raises UnidentifiedImageError (an OSError) for non-images, OSError "image file is
        # truncated" for cut-off data, and occasionally SyntaxError/ValueError from plugins.
        raise MediaDecodeError(
            f"cannot decode image {where}: {type(exc).__name__}: {exc}",
            reason=SkipReason.IMAGE_DECODE,
        ) from exc
    return np.array(rgb, dtype=np.uint8)  # a copy: writable, so torch.from_numpy is safe


# ------------------------------------------------------------------------------------ transforms


def resize_and_pad(
    frames_thwc: np.ndarray | torch.Tensor,
    resized_hw: tuple[int, int],
    padded_hw: tuple[int, int],
) -> torch.Tensor:
    """Resize uint8 frames with antialiased bicubic and pad bottom/right with zeros.

    Args:
        frames_thwc: [T, H, W, 3] uint8 (or [H, W, 3] for one image).
        resized_hw: Target size before padding.
        padded_hw: Final size (>= ``resized_hw``).

    Returns:
        [T, 3, pad_h, pad_w] uint8.
    """
    x = torch.as_tensor(np.ascontiguousarray(frames_thwc))
    if x.dtype != torch.uint8:
        raise ValueError(f"frames must be uint8, got {x.dtype}")
    if x.dim() == 3:
        x = x.unsqueeze(0)
    x = x.permute(0, 3, 1, 2)  # [T, 3, H, W]
    if tuple(x.shape[-2:]) != tuple(resized_hw):
        # torchvision's resize on a uint8 tensor calls this native uint8 kernel on CPU.
        x = F.interpolate(
            x.contiguous(), size=resized_hw, mode="bicubic", align_corners=False, antialias=True
        )
    pad_h = padded_hw[0] - resized_hw[0]
    pad_w = padded_hw[1] - resized_hw[1]
    if pad_h < 0 or pad_w < 0:
        raise ValueError(f"padded size {padded_hw} smaller than resized size {resized_hw}")
    if pad_h or pad_w:
        x = F.pad(x, (0, pad_w, 0, pad_h), value=0)
    return x.contiguous()


def normalize(x_uint8: torch.Tensor) -> torch.Tensor:
    """(x/255 - 0.5)/0.5 as float32, computed like HF's fused rescale+normalize:
    (x - 127.5)/127.5 (bitwise equal to HF; equal to the formula within 1 ulp)."""
    return (x_uint8.to(torch.float32) - 127.5) / 127.5


def patchify(frames_tchw: torch.Tensor, patch_size: int = PATCH_SIZE) -> torch.Tensor:
    """[T, C, H, W] -> [T*h*w, C, p, p] in raster order (frame, row, col)."""
    t, c, height, width = frames_tchw.shape
    if height % patch_size or width % patch_size:
        raise ValueError(f"frame size {height}x{width} is not a multiple of patch {patch_size}")
    h, w = height // patch_size, width // patch_size
    x = frames_tchw.reshape(t, c, h, patch_size, w, patch_size)
    x = x.permute(0, 2, 4, 1, 3, 5)  # [t, h, w, c, p, p]
    return x.reshape(t * h * w, c, patch_size, patch_size).contiguous()


def unpatchify(patches: torch.Tensor, grid_thw: tuple[int, int, int]) -> torch.Tensor:
    """Inverse of ``patchify``: [t*h*w, C, p, p] -> [t, C, h*p, w*p]."""
    t, h, w = grid_thw
    c, p = patches.shape[1], patches.shape[2]
    x = patches.reshape(t, h, w, c, p, p).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(t, c, h * p, w * p)


def process_image(
    image: np.ndarray | PIL.Image.Image | bytes | str | os.PathLike,
    max_patches: int = IMAGE_MAX_PATCHES,
    max_patches_per_side: int = MAX_PATCHES_PER_SIDE,
) -> ProcessedImage:
    """Decode (if needed), size, pad, normalise and patchify one image.

    Args:
        image: RGB uint8 ``[H, W, 3]`` array, a PIL image, encoded bytes or a file path.
        max_patches: Patch budget (16384 for images; see module docstring on padding).
        max_patches_per_side: Per-side limit in patches.

    Raises:
        MediaDecodeError / MediaMissingError: See ``decode_image``.
    """
    if isinstance(image, PIL.Image.Image):
        rgb = np.asarray(_to_rgb(image), dtype=np.uint8)
    elif isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(
                f"expected an RGB uint8 [H, W, 3] array, got {image.dtype} {image.shape}"
            )
        rgb = image
    else:
        rgb = decode_image(image)
    height, width = rgb.shape[:2]
    resized_hw, padded_hw = navit_resize(
        height, width, PATCH_SIZE, MERGE_SIZE, max_patches, max_patches_per_side
    )
    frames = resize_and_pad(rgb, resized_hw, padded_hw)
    patches = patchify(normalize(frames))
    grid = (1, padded_hw[0] // PATCH_SIZE, padded_hw[1] // PATCH_SIZE)
    return ProcessedImage(
        pixel_values=patches,
        grid_thw=grid,
        original_hw=(height, width),
        resized_hw=resized_hw,
    )
