"""InternVL3.5 image and video preprocessing: dynamic 448-px tiling, as transformers 5.25 does it.

Read from ``models/got_ocr2/image_processing_pil_got_ocr2.py`` (``GotOcr2ImageProcessorPil``
with ``crop_to_patches=True``, the image processor ``InternVLProcessor`` drives; the class
without ``Pil`` needs torchvision, never imported here) and ``models/internvl/
processing_internvl.py`` / ``video_processing_internvl.py``; the code wins over the reports
(``../shared/FAMILIES.md`` §3). numpy/PIL/torch only. ``tests/reference/
test_internvl_processing.py`` checks every step against those classes.

**Tile grid** (``get_optimal_tiled_canvas``): every ``(cols, rows)`` with
``min_tiles <= cols*rows <= max_tiles`` (1 and 12), ordered by ``cols*rows`` (a stable sort of
cols-major enumeration); the first grid with the smallest ``|W/H - cols/rows|`` wins, and a later
grid with an equal difference replaces it while the image's area exceeds half the grid's tile area
(``H*W > 0.5 * 448^2 * cols * rows``). Python float arithmetic as transformers does it.

**Tiles**: the RGB image (transparency composited on white) resized with PIL bicubic to
``(cols*448) x (rows*448)`` and cut into ``cols*rows`` tiles in row-major order; when there is more
than one tile, a *thumbnail* (the whole image resized to 448 x 448, bicubic) follows them. Each
tile is normalised by ``float32(float64(x) * (1/255))`` then ``(x - mean) / std`` in float32 with
ImageNet's mean/std (InternVL's released preprocessor config; the class defaults are CLIP's).

**Videos**: one 448 x 448 tile per sampled frame, each frame resized and normalised as a 1-tile
image (PIL bicubic, the image arithmetic: the original InternVL code's per-frame transform;
transformers' ``InternVLVideoProcessor`` resizes uint8 tensors with torchvision instead, which is
not installed). Frames are sampled as ``InternVLVideoProcessor.sample_frames`` does with ``fps``:
``n = int(total / src_fps * fps)`` frames (here at least 1 and at most ``max_frames`` and
``total``) at ``arange(total/n/2, total, total/n).int()``, the middle of ``n`` equal spans.

**Layout.** A tile is ``(448/14)^2 = 1024`` ViT patches in raster order (row, col); an image of
``k`` tiles (thumbnail included) is one item with grid ``(k, 32, 32)`` and ``k*1024`` patches
``[k*1024, 3, 14, 14]``, tile-major (``data/contract.py``'s (t, h, w) with t = tiles); after the
0.5 pixel shuffle each tile is ``32*32/4 = 256`` LLM tokens, ``t*h*w/4`` per item.
``hf_pixel_values`` turns a packed batch's patches into transformers' ``[tiles, 3, 448, 448]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import PIL.Image
import torch

from megatron_vlm.data.image import PATCH_SIZE, _to_rgb, frames_to_patches

TILE_SIZE = 448
"""Tile side in pixels (``GotOcr2ImageProcessorPil.size`` in InternVL's config: 448 x 448)."""
MIN_TILES = 1
"""``min_patches``: fewest tiles of an image (thumbnail not counted)."""
MAX_TILES = 12
"""``max_patches``: most tiles of an image (thumbnail not counted)."""
DOWNSAMPLE = 2
"""ViT patches per LLM token along each side (pixel shuffle with scale factor 0.5)."""
IMAGENET_MEAN = (0.485, 0.456, 0.406)
"""InternVL's mean (transformers ``IMAGENET_DEFAULT_MEAN``)."""
IMAGENET_STD = (0.229, 0.224, 0.225)
"""InternVL's std (transformers ``IMAGENET_DEFAULT_STD``)."""


def check_tile_size(tile_size: int) -> None:
    """Refuse a tile side the tower and the 0.5 pixel shuffle cannot take.

    Raises:
        ValueError: ``tile_size`` not a positive multiple of 28 (14-px patches, 2x2 shuffle).
    """
    factor = PATCH_SIZE * DOWNSAMPLE
    if tile_size < factor or tile_size % factor:
        raise ValueError(f"tile_size={tile_size} must be a positive multiple of {factor} "
                         f"(InternVL: {TILE_SIZE})")


def tokens_per_tile(tile_size: int = TILE_SIZE) -> int:
    """LLM tokens one tile becomes: ``(tile/14/2)^2`` (256 at 448 px)."""
    check_tile_size(tile_size)
    return (tile_size // (PATCH_SIZE * DOWNSAMPLE)) ** 2


# ------------------------------------------------------------------------------------- tiling


@lru_cache(maxsize=16)
def supported_grids(min_tiles: int, max_tiles: int) -> tuple[tuple[int, int], ...]:
    """``get_all_supported_aspect_ratios``: every ``(cols, rows)`` with ``min_tiles <=
    cols*rows <= max_tiles``, stably sorted by ``cols*rows`` (cols-major enumeration)."""
    grids = [(cols, rows) for cols in range(1, max_tiles + 1) for rows in range(1, max_tiles + 1)
             if min_tiles <= cols * rows <= max_tiles]
    return tuple(sorted(grids, key=lambda g: g[0] * g[1]))


def tile_grid(height: int, width: int, *, tile_size: int = TILE_SIZE, min_tiles: int = MIN_TILES,
              max_tiles: int = MAX_TILES) -> tuple[int, int]:
    """``(cols, rows)`` of an image of ``height x width`` px (``get_optimal_tiled_canvas``).

    Raises:
        ValueError: A side below 1 px, or ``1 <= min_tiles <= max_tiles`` broken.
    """
    if height < 1 or width < 1:
        raise ValueError(f"image size must be at least 1x1 px, got {height}x{width}")
    if not 1 <= min_tiles <= max_tiles:
        raise ValueError(f"need 1 <= min_tiles <= max_tiles, got {min_tiles}, {max_tiles}")
    aspect, area = width / height, width * height
    best, best_diff = (1, 1), float("inf")
    for grid in supported_grids(min_tiles, max_tiles):
        diff = abs(aspect - grid[0] / grid[1])
        if diff < best_diff:
            best, best_diff = grid, diff
        elif diff == best_diff and area > 0.5 * tile_size * tile_size * grid[0] * grid[1]:
            best = grid  # a tie goes to more tiles while the image fills half of them
    return best


def num_tiles(height: int, width: int, *, tile_size: int = TILE_SIZE,
              min_tiles: int = MIN_TILES, max_tiles: int = MAX_TILES,
              use_thumbnail: bool = True) -> int:
    """Tiles of an image, thumbnail included (``get_number_of_image_patches``)."""
    cols, rows = tile_grid(height, width, tile_size=tile_size, min_tiles=min_tiles,
                           max_tiles=max_tiles)
    return cols * rows + (1 if use_thumbnail and cols * rows > 1 else 0)


# --------------------------------------------------------------------------------- normalising


_MEAN = torch.tensor(IMAGENET_MEAN, dtype=torch.float32).view(1, 3, 1, 1)
_STD = torch.tensor(IMAGENET_STD, dtype=torch.float32).view(1, 3, 1, 1)


def normalize_patches(patches_u8: torch.Tensor) -> torch.Tensor:
    """Float32 ``[N, 3, p, p]`` of uint8 patches, bit for bit the image processor's numpy
    ``rescale`` (``float32(float64(x) * (1/255))``, which equals ``float32(x) / 255`` for every
    uint8 ``x``) and ``normalize`` (``(x - mean) / std`` in float32) with ImageNet's mean/std;
    elementwise per channel, so patch order does not matter."""
    if patches_u8.dtype != torch.uint8 or patches_u8.dim() != 4 or patches_u8.shape[1] != 3:
        raise ValueError(f"expected uint8 [N, 3, p, p] patches, got {patches_u8.dtype} "
                         f"{tuple(patches_u8.shape)}")
    return patches_u8.to(torch.float32).div_(255).sub_(_MEAN).div_(_STD)


# -------------------------------------------------------------------------------------- images


@dataclass
class TiledImage:
    """One image cut into 448-px tiles for InternViT."""

    tiles: np.ndarray
    """[k, T, T, 3] uint8 RGB: ``cols*rows`` tiles row-major, then the thumbnail if k > 1."""
    grid: tuple[int, int]
    """``(cols, rows)`` of the tiled canvas (before the thumbnail)."""

    @property
    def num_tiles(self) -> int:
        """Tiles, thumbnail included."""
        return int(self.tiles.shape[0])

    @property
    def grid_thw(self) -> tuple[int, int, int]:
        """``(tiles, T/14, T/14)``: the item's grid in ViT patches."""
        side = self.tiles.shape[1] // PATCH_SIZE
        return self.num_tiles, side, side

    def patches(self) -> torch.Tensor:
        """``[k*(T/14)^2, 3, 14, 14]`` float32 normalised patches, order (tile, row, col)."""
        size = self.tiles.shape[1:3]
        return normalize_patches(frames_to_patches(self.tiles, size, size, normalized=False))


def _as_pil(image: PIL.Image.Image | np.ndarray) -> PIL.Image.Image:
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"expected a [H, W, 3] uint8 array, got {image.dtype} {image.shape}")
        return PIL.Image.fromarray(image)
    return _to_rgb(image)


def _resized(image: PIL.Image.Image, height: int, width: int) -> np.ndarray:
    if (image.height, image.width) != (height, width):
        image = image.resize((width, height), PIL.Image.Resampling.BICUBIC)
    return np.asarray(image, dtype=np.uint8)


def tile_image(
    image: PIL.Image.Image | np.ndarray,
    *,
    tile_size: int = TILE_SIZE,
    min_tiles: int = MIN_TILES,
    max_tiles: int = MAX_TILES,
    use_thumbnail: bool = True,
) -> TiledImage:
    """``GotOcr2ImageProcessorPil.crop_image_to_patches``: the image's tiles and thumbnail.

    Args:
        image: A PIL image (any mode; EXIF orientation as given: the caller applies it, as
            transformers' ``load_image`` does) or a [H, W, 3] uint8 RGB array.
        tile_size: Tile side in pixels (InternVL: 448).
        min_tiles: Fewest tiles (1).
        max_tiles: Most tiles (12); 1 gives the image resized to one tile.
        use_thumbnail: Append the whole image as one more tile when there are several.
    """
    check_tile_size(tile_size)
    image = _as_pil(image)
    cols, rows = tile_grid(image.height, image.width, tile_size=tile_size, min_tiles=min_tiles,
                           max_tiles=max_tiles)
    canvas = _resized(image, rows * tile_size, cols * tile_size)
    tiles = canvas.reshape(rows, tile_size, cols, tile_size, 3).transpose(0, 2, 1, 3, 4)
    tiles = tiles.reshape(rows * cols, tile_size, tile_size, 3)
    if use_thumbnail and rows * cols > 1:
        thumbnail = _resized(image, tile_size, tile_size)
        tiles = np.concatenate([tiles, thumbnail[None]])
    return TiledImage(tiles=np.ascontiguousarray(tiles), grid=(cols, rows))


# -------------------------------------------------------------------------------------- videos


def sample_frame_indices(total_frames: int, video_fps: float, *, fps: float,
                         max_frames: int | None = None) -> np.ndarray:
    """``InternVLVideoProcessor.sample_frames`` with ``fps`` (``initial_shift=True``): the
    middle frame of ``n`` equal spans of the clip.

    ``n = int(total / video_fps * fps)``, raised to 1 (transformers divides by zero there) and
    lowered to ``max_frames`` and to ``total_frames`` (transformers refuses more frames than the
    source has).

    Returns:
        [n] int64 strictly increasing indices.
    """
    if total_frames < 1 or not video_fps > 0 or not fps > 0:
        raise ValueError(f"need total_frames >= 1, video_fps > 0 and fps > 0, got "
                         f"{total_frames}, {video_fps}, {fps}")
    num = max(1, int(total_frames / video_fps * fps))
    num = min(num, total_frames, max_frames or total_frames)
    # torch's float32 arange and truncation, as transformers computes them
    indices = torch.arange(total_frames / num / 2, total_frames, total_frames / num).int()
    return indices.numpy().astype(np.int64)


def frame_timestamps(indices: np.ndarray, video_fps: float) -> np.ndarray:
    """Seconds of each sampled frame: ``index / fps`` (transformers' ``VideoMetadata``)."""
    return np.asarray([int(i) / video_fps for i in indices], dtype=np.float64)


def video_frame_patches(frames: np.ndarray, *, tile_size: int = TILE_SIZE) -> torch.Tensor:
    """``[t*(T/14)^2, 3, 14, 14]`` float32 of sampled ``[t, H, W, 3]`` uint8 frames: each frame
    resized to one ``tile_size`` tile as a 1-tile image is (PIL bicubic), normalised by the image
    arithmetic, order (frame, row, col)."""
    if frames.ndim != 4 or frames.shape[3] != 3 or frames.dtype != np.uint8:
        raise ValueError(f"expected [T, H, W, 3] uint8 frames, got {frames.dtype} {frames.shape}")
    check_tile_size(tile_size)
    tiles = np.stack([_resized(PIL.Image.fromarray(f), tile_size, tile_size) for f in frames])
    size = (tile_size, tile_size)
    return normalize_patches(frames_to_patches(tiles, size, size, normalized=False))


def hf_pixel_values(pixel_values: torch.Tensor, tile_size: int = TILE_SIZE) -> torch.Tensor:
    """transformers' ``pixel_values`` ``[tiles, 3, T, T]`` of our packed raster patches
    ``[tiles*(T/14)^2, 3, 14, 14]`` (every item's tiles in item order, thumbnail after its image's
    tiles, one tile per video frame): what ``InternVLModel.get_image_features`` takes."""
    side = tile_size // PATCH_SIZE
    num = pixel_values.shape[0] // (side * side)
    if pixel_values.dim() != 4 or num * side * side != pixel_values.shape[0]:
        raise ValueError(f"expected [tiles*{side * side}, 3, 14, 14] patches, got "
                         f"{tuple(pixel_values.shape)}")
    x = pixel_values.reshape(num, side, side, 3, PATCH_SIZE, PATCH_SIZE)
    return x.permute(0, 3, 1, 4, 2, 5).reshape(num, 3, tile_size, tile_size)


__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "MAX_TILES", "MIN_TILES", "TILE_SIZE", "TiledImage",
           "check_tile_size", "frame_timestamps", "hf_pixel_values", "normalize_patches",
           "num_tiles", "sample_frame_indices", "supported_grids", "tile_grid", "tile_image",
           "tokens_per_tile", "video_frame_patches"]
