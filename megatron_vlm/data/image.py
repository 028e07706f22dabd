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

Optional (ours, off by default): ``min_patches`` upscales small images, like Qwen2-VL's
``min_pixels`` in ``smart_resize``. An image whose padded grid would hold fewer than
``min_patches`` patches is scaled up by ``s = sqrt(min_patches * 14^2 / (H * W))`` (aspect ratio
kept, sides rounded up), so its resized area and hence its padded grid hold at least
``min_patches`` patches; the upscaled image stays within the budget (whole patches <=
``max_patches``, per-side limit) -- where the budget is that tight, the budget wins. Then step 2
resizes (bicubic, antialias: PIL's kernel) and the padding follows as for any image. ``None``
keeps the HF rule bit for bit.
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
    min_patches: int | None = None,
) -> tuple[tuple[int, int], tuple[int, int]]:
    """HF ``navit_resize``: the resized size and the padded size, in pixels (``min_patches``:
    our optional upscale of small images, see the module docstring).

    Args:
        height: Original height in pixels.
        width: Original width in pixels.
        patch_size: ViT patch side.
        merge_size: Merge kernel side; padding goes to multiples of ``patch_size * merge_size``.
        max_patches: Budget of whole patches (counted on the original, floor division).
        max_patches_per_side: Per-side limit in patches.
        min_patches: Upscale images whose padded grid would be smaller (None: never upscale).

    Returns:
        ``((new_height, new_width), (pad_height, pad_width))``.
    """
    if height < 1 or width < 1:
        raise ValueError(f"image size must be positive, got {height}x{width}")
    if min_patches is not None and not 1 <= min_patches <= max_patches:
        raise ValueError(f"min_patches={min_patches} must be in [1, max_patches={max_patches}]")
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
    if min_patches is not None and scale == 1.0 and (  # not downscaled, and small
            _padded(new_height, factor) * _padded(new_width, factor)
            < min_patches * patch_size * patch_size):
        new_height, new_width = _upscaled(height, width, patch_size, max_patches,
                                          max_patches_per_side, min_patches)
    pad_height = _padded(new_height, factor)
    pad_width = _padded(new_width, factor)
    return (new_height, new_width), (pad_height, pad_width)


def _padded(side: int, factor: int) -> int:
    return (factor - side % factor) % factor + side


def _upscaled(height: int, width: int, patch_size: int, max_patches: int,
              max_patches_per_side: int, min_patches: int) -> tuple[int, int]:
    """Size of an image upscaled to hold ``min_patches`` patches (area, aspect kept, sides
    rounded up), within ``max_patches`` whole patches and the per-side limit."""
    scale = math.sqrt(min_patches * patch_size * patch_size / (height * width))
    limit = max_patches_per_side * patch_size
    # 1e-9: a scale that is exact in decimal (e.g. 2.0) must not round up by float noise.
    new_height = min(limit, max(height, math.ceil(height * scale - 1e-9)))
    new_width = min(limit, max(width, math.ceil(width * scale - 1e-9)))
    # Rounding up (or min_patches close to max_patches) can cross the budget: take the side
    # scaled up the most down to just under its last whole patch until it fits. Ends: the
    # original size has fewer whole patches than min_patches <= max_patches.
    while (new_height // patch_size) * (new_width // patch_size) > max_patches:
        if new_height * width >= new_width * height and new_height > height:
            new_height = max(height, new_height // patch_size * patch_size - 1)
        else:
            new_width = max(width, new_width // patch_size * patch_size - 1)
    return new_height, new_width


def grid_for_size(
    height: int,
    width: int,
    max_patches: int = IMAGE_MAX_PATCHES,
    patch_size: int = PATCH_SIZE,
    merge_size: int = MERGE_SIZE,
    max_patches_per_side: int = MAX_PATCHES_PER_SIDE,
    min_patches: int | None = None,
) -> tuple[int, int]:
    """Patch grid ``(h, w)`` an image of this pixel size gets (no decoding needed)."""
    _, (pad_h, pad_w) = navit_resize(
        height, width, patch_size, merge_size, max_patches, max_patches_per_side, min_patches
    )
    return pad_h // patch_size, pad_w // patch_size


def num_image_tokens(height: int, width: int, max_patches: int = IMAGE_MAX_PATCHES,
                     min_patches: int | None = None) -> int:
    """LLM placeholder tokens of an image of this pixel size: ``h*w/4``."""
    h, w = grid_for_size(height, width, max_patches, min_patches=min_patches)
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
    """[h*w, 3, 14, 14] float32 normalised patches, raster order (row, col) (uint8 before
    ``normalize`` when processed with ``normalized=False``)."""
    grid_thw: tuple[int, int, int]
    """(1, h, w) in patches; h and w are even."""
    original_hw: tuple[int, int]
    """Decoded size in pixels."""
    resized_hw: tuple[int, int]
    """Size after resizing, before padding, in pixels."""



# ---------------------------------------------------------------------------------------- decoding


def _to_rgb(img: PIL.Image.Image) -> PIL.Image.Image:
    """HF ``convert_to_rgb``: transparency is composited onto white, anything else -> RGB
    (an RGB image is returned as it is: ``convert`` would copy it)."""
    has_alpha = "A" in img.getbands() or img.info.get("transparency") is not None
    if has_alpha:
        rgba = img.convert("RGBA")
        background = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return PIL.Image.alpha_composite(background, rgba).convert("RGB")
    return img if img.mode == "RGB" else img.convert("RGB")


def decode_image(source: bytes | str | os.PathLike) -> np.ndarray:
    """Decode image bytes or a file to an RGB uint8 array ``[H, W, 3]`` (writable).

    EXIF orientation is applied (as HF ``load_image`` does); transparency is composited on white.

    Raises:
        MediaMissingError: ``source`` is a path that does not exist.
        MediaDecodeError: Corrupt, truncated or non-image data (reason ``image_decode``), or more
            pixels than PIL's decompression-bomb limit (reason ``image_too_large``).
    """
    rgb = _decode_pixels(source, rgbx=False)
    return rgb if rgb.flags.writeable else rgb.copy()  # writable: torch.from_numpy is safe


def _decode_pixels(source: bytes | str | os.PathLike, rgbx: bool) -> np.ndarray:
    """``decode_image`` without copies; the array may be read-only (PIL's pixel bytes).

    No copy for EXIF orientation 1 or for an image already RGB. PIL keeps RGB as 4 bytes a
    pixel: ``rgbx=True`` returns that buffer itself, ``[H, W, 4]`` with an unused fourth byte
    (``_pil_pixels``), else ``[H, W, 3]`` packed by PIL's ``tobytes`` (one copy).
    """
    if isinstance(source, (bytes, bytearray, memoryview)):
        stream: io.BytesIO | Path = io.BytesIO(source)
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
                PIL.ImageOps.exif_transpose(img, in_place=True)  # no copy when upright
                rgb = _to_rgb(img)
                return _pil_pixels(rgb) if rgbx else np.asarray(rgb, dtype=np.uint8)
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


def _pil_pixels(img: PIL.Image.Image) -> np.ndarray:
    """An RGB image's pixels without a copy: ``[H, W, 4]`` RGBX over PIL's own buffer (Arrow
    export, Pillow >= 11.2; the array keeps the image alive), or ``[H, W, 3]`` (a copy) where
    that is unavailable (no pyarrow, an image PIL stores in several blocks)."""
    try:
        import pyarrow

        flat = pyarrow.array(img).flatten().to_numpy(zero_copy_only=True)
        return flat.reshape(img.height, img.width, 4)
    except Exception:  # noqa: BLE001 - any failure: the packed copy is always right
        return np.asarray(img, dtype=np.uint8)


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


def frames_to_patches(
    frames_thwc: np.ndarray | torch.Tensor,
    resized_hw: tuple[int, int],
    padded_hw: tuple[int, int],
    normalized: bool = True,
) -> torch.Tensor:
    """``patchify(normalize(resize_and_pad(...)))`` in one pass over the pixels, bit for bit.

    The frames stay channels-last throughout (torch's uint8 antialiased bicubic kernel works on
    packed pixels: no layout copy before or after it), the resized frame is written straight
    into the zero-padded patch layout on uint8 (a quarter of float32's bytes; ``_patch_layout``),
    then converted and normalised in two passes. ``normalized=False`` stops at the uint8 patches
    (``normalize`` later gives the same floats): the hand-over form, a quarter of the bytes.

    Args:
        frames_thwc: [T, H, W, 3] uint8 (or [H, W, 3] for one image); read only. A fourth
            channel (``[..., 4]``, PIL's RGBX layout) is carried through the resize, whose
            kernel works on 4-byte pixels anyway, and dropped: RGB bits as for 3 channels.
        resized_hw: Target size before padding.
        padded_hw: Final size (>= ``resized_hw``, multiples of ``PATCH_SIZE``).
        normalized: Float32 normalised patches (True) or the uint8 patches (False).

    Returns:
        [T*h*w, 3, 14, 14] float32 (or uint8), order (frame, row, col).
    """
    x = _uint8_tensor(frames_thwc)
    if x.dim() == 3:
        x = x.unsqueeze(0)
    (rh, rw), (ph, pw) = resized_hw, padded_hw
    if ph < rh or pw < rw:
        raise ValueError(f"padded size {padded_hw} smaller than resized size {resized_hw}")
    if ph % PATCH_SIZE or pw % PATCH_SIZE:
        raise ValueError(f"frame size {ph}x{pw} is not a multiple of patch {PATCH_SIZE}")
    if tuple(x.shape[1:3]) != (rh, rw):
        # A channels-last view in, a channels-last result out (same kernel and bits as NCHW).
        x = F.interpolate(x.permute(0, 3, 1, 2), size=(rh, rw), mode="bicubic",
                          align_corners=False, antialias=True).permute(0, 2, 3, 1)
    patches = _patch_layout(x[..., :3], ph, pw)
    if not normalized:
        return patches
    # normalize()'s two float32 roundings: the subtraction converts as it goes (one pass fewer
    # than converting first; numpy's loop is the faster one here), the division is in place.
    out = np.subtract(patches.numpy(), np.float32(127.5), dtype=np.float32)
    np.divide(out, np.float32(127.5), out=out)
    return torch.from_numpy(out)


def _patch_layout(x: torch.Tensor, pad_h: int, pad_w: int) -> torch.Tensor:
    """[T, H, W, 3] uint8 (any strides) -> zero-padded [T*h*w, 3, p, p] patches in one copy:
    the frame is written straight into the patch layout (whole patches, then the last partial
    patch column/row/corner), so padding costs no extra pass over the pixels."""
    p = PATCH_SIZE
    t, height, width = x.shape[:3]
    h, w = pad_h // p, pad_w // p
    shape = (t, h, w, 3, p, p)
    out = x.new_zeros(shape) if (pad_h, pad_w) != (height, width) else x.new_empty(shape)
    dst = out.permute(0, 1, 4, 2, 5, 3)  # [t, h, p, w, p, 3]: the frame's pixels, per patch
    a, b = divmod(height, p)
    c, d = divmod(width, p)
    dst[:, :a, :, :c].copy_(x[:, :a * p, :c * p].reshape(t, a, p, c, p, 3))
    if d:
        dst[:, :a, :, c, :d].copy_(x[:, :a * p, c * p:].reshape(t, a, p, d, 3))
    if b:
        dst[:, a, :b, :c].copy_(x[:, a * p:, :c * p].reshape(t, b, c, p, 3))
    if b and d:
        dst[:, a, :b, c, :d].copy_(x[:, a * p:, c * p:])
    return out.reshape(t * h * w, 3, p, p)


def _uint8_tensor(frames: np.ndarray | torch.Tensor) -> torch.Tensor:
    """A uint8 tensor over ``frames`` without a copy (read-only arrays included: only read)."""
    if isinstance(frames, torch.Tensor):
        x = frames
    else:
        arr = np.asarray(frames)
        if not arr.flags.writeable:
            with warnings.catch_warnings():  # torch warns about read-only arrays; never written
                warnings.simplefilter("ignore", UserWarning)
                x = torch.from_numpy(arr)
        else:
            x = torch.from_numpy(arr)
    if x.dtype != torch.uint8 or x.shape[-1] not in (3, 4):
        raise ValueError(f"frames must be uint8 RGB [..., 3] (or RGBX), got {x.dtype} "
                         f"{tuple(x.shape)}")
    return x


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
    min_patches: int | None = None,
    normalized: bool = True,
) -> ProcessedImage:
    """Decode (if needed), size, pad, normalise and patchify one image.

    Args:
        image: RGB uint8 ``[H, W, 3]`` array, a PIL image, encoded bytes or a file path.
        max_patches: Patch budget (16384 for images; see module docstring on padding).
        max_patches_per_side: Per-side limit in patches.
        min_patches: Upscale smaller images to at least this many patches (None: never).
        normalized: Float32 normalised patches (default) or uint8 patches that ``normalize``
            turns into the same floats where that is cheapest (``frames_to_patches``).

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
        rgb = _decode_pixels(image, rgbx=True)
    height, width = rgb.shape[:2]
    resized_hw, padded_hw = navit_resize(
        height, width, PATCH_SIZE, MERGE_SIZE, max_patches, max_patches_per_side, min_patches
    )
    patches = frames_to_patches(rgb, resized_hw, padded_hw, normalized=normalized)
    grid = (1, padded_hw[0] // PATCH_SIZE, padded_hw[1] // PATCH_SIZE)
    return ProcessedImage(
        pixel_values=patches,
        grid_thw=grid,
        original_hw=(height, width),
        resized_hw=resized_hw,
    )
