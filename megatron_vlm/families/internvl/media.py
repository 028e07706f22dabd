"""InternVL3.5 data-side media rules (``data/media_rules.py``): template, tiling, items.

What the multimodal loader does differently for InternVL (``../shared/FAMILIES.md`` §3;
transformers 5.25's ``InternVLProcessor`` and ``GotOcr2ImageProcessorPil`` are the reference,
``processing.py``):

* **Template.** An image of ``k`` tiles (thumbnail included) is ``<img>`` + ``256*k`` x
  ``<IMG_CONTEXT>`` + ``</img>`` (``InternVLProcessor.replace_image_token``); a video of ``n``
  sampled frames is ``Frame1: <img>`` + 256 ``<IMG_CONTEXT>`` + ``</img>``, then
  ``\\nFrame2: <img>...</img>`` and so on, 1-based (``replace_video_token``; the original
  InternVL code writes the same ``"\\n".join(f"Frame{i}: <image>")``). Video placeholders are
  ``<IMG_CONTEXT>`` too, as transformers writes them: ``InternVLConfig`` has one
  ``image_token_id``. Ids come from the tokenizer by name (151665..151667 in the Qwen3-based
  InternVL3.5 tokenizers; a tiny SentencePiece model gets the strings appended by
  ``SpecialTokensTokenizer``). The ``<video>`` stand-in of transformers' chat template is never
  written (the processor expands it): it is not one of the rules' special tokens, so the original
  (non-HF) tokenizers, which lack it, are accepted.
* **Items.** One item per image, grid ``(k, 32, 32)``: ``k`` tiles of 1024 ViT patches,
  ``[k*1024, 3, 14, 14]`` tile-major raster patches (``data/contract.py``'s ``t`` counts tiles);
  the tower attends within each tile and the 0.5 pixel shuffle makes ``t*h*w/4`` tokens
  (``placeholder_count``). One item per sampled video frame, grid ``(1, 32, 32)``, 256 tokens.
* **Images.** ``processing.tile_image`` on the decoded RGB image (``data.image.decode_image``:
  EXIF orientation applied as transformers' ``load_image`` does, transparency composited on white
  as the processor's ``convert_to_rgb`` does): 1..12 tiles of 448 by the closest aspect ratio,
  the thumbnail when there are several, PIL bicubic, ImageNet mean/std.
* **Videos.** ``processing.sample_frame_indices`` at ``data.multimodal.video_fps`` over the clip
  (or its ``clip`` span), at most ``video_max_frames`` frames, frame count and rate as PyAV reads
  the header; each frame one 448 tile (``processing.video_frame_patches``). Only the sampled
  frames are decoded (PyAV's sparse decoder; else in order; a container without frame counts is
  decoded whole by ``video.decode_video`` and sampled from that).
* **Positions.** Plain 1D RoPE (``position_rule`` None, as Kimi's rules): the packed batch's
  ``position_ids`` restart per document; no M-RoPE ids are built.
* **Chat.** ChatML as transformers' converted InternVL3.5 processors write it:
  ``<|im_start|>{role}\\n{content}<|im_end|>\\n`` per turn, no default system prompt (the
  original ``internvl2_5`` conversation template adds one; a tokenizer's own template wins).

Budgets from ``data.multimodal`` where they map (``internvl_media_rules``): ``image_max_patches``
is the ViT patch ceiling of one image, so it caps the tiles: ``k`` tiles plus the thumbnail
within ``image_max_patches / 1024`` (InternVL's 12 tiles + thumbnail need 13,312; the default
16,384 keeps 12). A document longer than ``seq_length`` is skipped (``too_long``): videos are not
fitted the way Kimi's uniform chunks are, so a run sets ``video_max_frames`` (256 tokens a frame)
below its sequence budget.

Imports ``megatron_vlm.data`` and this family's processing only (never models/).
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import PIL.Image
import torch

from megatron_vlm.data.image import PATCH_SIZE, ProcessedImage, decode_image
from megatron_vlm.data.media_errors import MediaDecodeError, MediaGridError, SkipReason
from megatron_vlm.data.templates import Text, TextEncoder, TokenBuilder, TokenizedSample
from megatron_vlm.data.tokenizer import MissingSpecialTokenError
from megatron_vlm.data.video import VideoChunk, clip_frame_range, decode_video, read_timing
from megatron_vlm.data.video_pyav import decode_sampled
from megatron_vlm.families.internvl.processing import (
    DOWNSAMPLE,
    MAX_TILES,
    MIN_TILES,
    TILE_SIZE,
    check_tile_size,
    frame_timestamps,
    num_tiles,
    sample_frame_indices,
    tile_grid,
    tile_image,
    video_frame_patches,
)

IMG_START = "<img>"
IMG_END = "</img>"
IMG_CONTEXT = "<IMG_CONTEXT>"
INTERNVL_SPECIAL_TOKENS = (IMG_START, IMG_END, IMG_CONTEXT)
"""InternVL's media special tokens, in the order of their ids in the released tokenizers (and
the order ``SpecialTokensTokenizer`` appends them)."""
INTERNVL_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
"""ChatML for string contents as the converted InternVL3.5 processors' template writes them
(its image/video content items left out: our contents carry the media)."""
INTERNVL_END_OF_TURN = "<|im_end|>"
"""Closes a turn (InternVL3.5's Qwen3 ``eos_token_id`` 151645)."""

_NO_PIXELS = torch.empty(0, 3, PATCH_SIZE, PATCH_SIZE)
_ALL_FRAMES_FPS = 1e9
"""A sampling rate above any source's: ``decode_video`` then returns every frame of the span."""
_IMAGE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, IndexError, TypeError)


@dataclass(frozen=True)
class InternVLTokenIds:
    """Ids of InternVL's media special tokens in one tokenizer."""

    img_start: int
    """Opens an image or a video frame (HF ``start_image_token_id``)."""
    img_end: int
    """Closes it (HF ``end_image_token_id``)."""
    img_context: int
    """Repeated 256 times per tile, images and video frames alike (HF ``image_token_id``)."""

    @property
    def placeholder_ids(self) -> frozenset[int]:
        return frozenset((self.img_context,))

    @property
    def all_ids(self) -> frozenset[int]:
        return frozenset((self.img_start, self.img_end, self.img_context))

    def token_ids_config(self) -> dict[str, int | None]:
        """``model.token_ids`` media fields (InternVL has no separate video placeholder and no
        ``media_content`` token)."""
        return {"image": self.img_context, "video": None, "media_begin": self.img_start,
                "media_content": None, "media_end": self.img_end}


def internvl_token_ids(tokenizer: Any) -> InternVLTokenIds:
    """InternVL's media ids in ``tokenizer``, by name.

    Raises:
        MissingSpecialTokenError: Naming the tokens the tokenizer lacks.
    """
    special = tokenizer.special_tokens
    missing = [t for t in INTERNVL_SPECIAL_TOKENS if t not in special]
    if missing:
        describe = tokenizer.describe() if hasattr(tokenizer, "describe") else type(tokenizer)
        raise MissingSpecialTokenError(
            f"{describe} lacks the media tokens {missing} that InternVL3.5's template needs; "
            "use the InternVL tokenizer or one that defines them")
    return InternVLTokenIds(img_start=int(special[IMG_START]), img_end=int(special[IMG_END]),
                            img_context=int(special[IMG_CONTEXT]))


# ------------------------------------------------------------------------------------- template


def item_tokens(item: ProcessedImage | VideoChunk) -> int:
    """``t*h*w/4``: every tile (or frame) of an item is ``h*w/4`` tokens after the 0.5 pixel
    shuffle.

    Raises:
        MediaGridError: A grid that is not ``(t, h, w)`` with ``t >= 1`` and ``h``, ``w`` even.
    """
    t, h, w = item.grid_thw
    if t < 1 or h < DOWNSAMPLE or w < DOWNSAMPLE or h % DOWNSAMPLE or w % DOWNSAMPLE:
        raise MediaGridError(f"InternVL item grid {item.grid_thw} must be (tiles, h, w) with h, "
                             "w even")
    return t * h * w // (DOWNSAMPLE * DOWNSAMPLE)


def frame_prefix(index: int) -> str:
    """The text before video frame ``index`` (0-based): ``Frame{index+1}: ``, after a newline
    from the second frame on (one piece, as the tokenizer sees it between special tokens)."""
    return f"Frame{index + 1}: " if index == 0 else f"\nFrame{index + 1}: "


def internvl_tokenize(groups: Sequence[Any], tokenizer: TextEncoder, ids: InternVLTokenIds,
                      markers_loss: bool) -> TokenizedSample:
    """InternVL's template (module docstring) over ``groups``: ``Text``, one image item, or one
    video's list of frame items. ``<img>``/``</img>`` and the frame prefixes are targets iff
    ``markers_loss``; placeholders never are."""
    b = TokenBuilder(tokenizer, ids, markers_loss)
    for group in groups:
        if isinstance(group, Text):
            b.text(group.text, group.loss, group.special)
        elif isinstance(group, list):
            for i, item in enumerate(group):
                b.text(frame_prefix(i), markers_loss)
                b.special(ids.img_start)
                b.placeholders(ids.img_context, item, item_tokens(item), True)
                b.special(ids.img_end)
        elif isinstance(group, ProcessedImage):
            b.special(ids.img_start)
            b.placeholders(ids.img_context, group, item_tokens(group), False)
            b.special(ids.img_end)
        else:
            raise TypeError(f"unsupported segment type {type(group).__name__}")
    return b.sample()


# --------------------------------------------------------------------------------------- images


def _image_header(data: bytes) -> tuple[int, int]:
    """(height, width) from the header, EXIF rotation applied (as ``decode_image`` does)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", PIL.Image.DecompressionBombWarning)
            with PIL.Image.open(io.BytesIO(data)) as img:
                width, height = img.size
                orientation = img.getexif().get(0x0112, 1)
    except (PIL.Image.DecompressionBombError, PIL.Image.DecompressionBombWarning) as exc:
        raise MediaDecodeError(f"image too large: {exc}",
                               reason=SkipReason.IMAGE_TOO_LARGE) from exc
    except _IMAGE_ERRORS as exc:
        raise MediaDecodeError(f"cannot read image header: {type(exc).__name__}: {exc}") from exc
    if orientation in (5, 6, 7, 8):  # rotated by 90 degrees
        height, width = width, height
    return height, width


# --------------------------------------------------------------------------------------- videos


@dataclass(frozen=True)
class _Sampled:
    indices: np.ndarray
    """[k] increasing source frame indices."""
    timestamps: np.ndarray
    """[k] seconds."""


def _sample(total: int, src_fps: float, clip, settings: Any) -> _Sampled:
    first, end = clip_frame_range(total, src_fps, clip)
    indices = first + sample_frame_indices(end - first, src_fps, fps=settings.video_fps,
                                           max_frames=settings.video_max_frames)
    return _Sampled(indices, frame_timestamps(indices, src_fps))


def _decode_indices(data: bytes, indices: np.ndarray, timing) -> np.ndarray | None:
    """[k, H, W, 3] uint8 source frames ``indices`` by PyAV (sparse decode where the stream's
    index places them, else in decode order); None when PyAV cannot deliver all of them."""
    import av

    try:
        with av.open(io.BytesIO(data)) as container:
            stream = container.streams.video[0]
            frames = None
            if timing.frame_pts:
                frames = decode_sampled(container, stream, indices, timing.frame_pts,
                                        timing.keyframe_pts)
                if frames is None:
                    container.seek(0)
            if frames is None:
                wanted, last, frames = set(indices.tolist()), int(indices[-1]), []
                for i, frame in enumerate(container.decode(stream)):
                    if i in wanted:
                        frames.append(frame.to_ndarray(format="rgb24"))
                    if i >= last:
                        break
    except Exception:  # av.error.* on damaged input: the fallback decoder reports it
        return None
    if len(frames) != len(indices):
        return None
    return np.ascontiguousarray(np.stack(frames), dtype=np.uint8)


def _read_frames(data: bytes, settings: Any, clip) -> tuple[_Sampled, np.ndarray, bool]:
    """The sampled frames of a video: (sampling, [k, H, W, 3] uint8, timestamps repaired)."""
    timing = read_timing(data)
    if timing is not None and timing.total_frames > 0 and timing.fps > 0:
        sampled = _sample(timing.total_frames, timing.fps, clip, settings)
        frames = _decode_indices(data, sampled.indices, timing)
        if frames is not None:
            return sampled, frames, timing.repaired
    video = decode_video(data, _ALL_FRAMES_FPS, None, settings.video_backend, clip=clip)
    sampled = _sample(video.total_frames, video.fps, clip, settings)
    frames = video.frames[sampled.indices - int(video.frame_indices[0])]
    return sampled, frames, video.timestamps_repaired


def _frame_items(sampled: _Sampled, tile_size: int,
                 pixels: torch.Tensor | None) -> list[VideoChunk]:
    """One item per sampled frame, pixels sliced from ``[k*h*w, 3, p, p]``."""
    side = tile_size // PATCH_SIZE
    per_item = side * side
    items = []
    for i, ts in enumerate(sampled.timestamps.tolist()):
        patches = _NO_PIXELS if pixels is None else pixels[i * per_item : (i + 1) * per_item]
        items.append(VideoChunk(patches, (1, side, side), ts, (ts,), chunk_index=i))
    return items


# ---------------------------------------------------------------------------------------- rules


@dataclass(frozen=True)
class InternVLMediaRules:
    """InternVL3.5's media rules (module docstring). Pickles: settings only."""

    family: str = "internvl"
    tile_size: int = TILE_SIZE
    """Tile side in pixels (InternVL: 448; a multiple of 28)."""
    min_tiles: int = MIN_TILES
    """Fewest tiles of an image, thumbnail not counted (InternVL: 1)."""
    max_tiles: int = MAX_TILES
    """Most tiles of an image, thumbnail not counted (InternVL: 12)."""
    use_thumbnail: bool = True
    """Append the whole image as one more tile when it has several (InternVL: True)."""

    def __post_init__(self) -> None:
        check_tile_size(self.tile_size)
        if not 1 <= self.min_tiles <= self.max_tiles:
            raise ValueError(f"InternVL tiling needs 1 <= min_tiles <= max_tiles, got "
                             f"{self.min_tiles}, {self.max_tiles}")

    @property
    def special_tokens(self) -> tuple[str, ...]:
        return INTERNVL_SPECIAL_TOKENS

    @property
    def position_rule(self) -> None:
        """None: plain 1D RoPE, as Kimi's rules (no M-RoPE ids are built)."""
        return None

    def media_ids(self, tokenizer: Any) -> InternVLTokenIds:
        return internvl_token_ids(tokenizer)

    def _tiling(self) -> dict[str, Any]:
        return {"tile_size": self.tile_size, "min_tiles": self.min_tiles,
                "max_tiles": self.max_tiles}

    def plan_image(self, data: bytes, settings: Any) -> ProcessedImage:
        """Grid ``(tiles, T/14, T/14)`` of an image from its header."""
        height, width = _image_header(data)
        cols, rows = tile_grid(height, width, **self._tiling())
        side = self.tile_size // PATCH_SIZE
        k = num_tiles(height, width, use_thumbnail=self.use_thumbnail, **self._tiling())
        return ProcessedImage(_NO_PIXELS, (k, side, side), (height, width),
                              (rows * self.tile_size, cols * self.tile_size))

    def plan_video(self, data: bytes, settings: Any, clip) -> tuple[list[VideoChunk], bool]:
        """The video's frame items (grids, timestamps) from its header."""
        timing = read_timing(data)
        if timing is None or timing.total_frames < 1 or not timing.fps > 0:
            sampled, _, repaired = _read_frames(data, settings, clip)
        else:
            sampled = _sample(timing.total_frames, timing.fps, clip, settings)
            repaired = timing.repaired
        return _frame_items(sampled, self.tile_size, None), repaired

    def tokenize(self, groups: Sequence[Any], tokenizer: TextEncoder, ids: InternVLTokenIds,
                 markers_loss: bool) -> TokenizedSample:
        return internvl_tokenize(groups, tokenizer, ids, markers_loss)

    def decode(self, media: Any, settings: Any) -> list[ProcessedImage | VideoChunk]:
        """Pixels of one planned image (one item of all its tiles) or video (one item per
        sampled frame)."""
        if media.type == "image":
            rgb = decode_image(media.data)
            tiled = tile_image(rgb, use_thumbnail=self.use_thumbnail, **self._tiling())
            cols, rows = tiled.grid
            return [ProcessedImage(tiled.patches(), tiled.grid_thw, rgb.shape[:2],
                                   (rows * self.tile_size, cols * self.tile_size))]
        sampled, frames, _ = _read_frames(media.data, settings, media.clip)
        pixels = video_frame_patches(frames, tile_size=self.tile_size)
        return _frame_items(sampled, self.tile_size, pixels)

    def placeholder_count(self, item: Any) -> int:
        """``t*h*w/4``: 256 per 448 tile (thumbnail included) or video frame."""
        return item_tokens(item)

    @property
    def chat_template(self) -> str:
        return INTERNVL_CHAT_TEMPLATE

    @property
    def end_of_turn(self) -> str:
        return INTERNVL_END_OF_TURN


def internvl_media_rules(config: Any = None, *, tile_size: int = TILE_SIZE) -> InternVLMediaRules:
    """The InternVL family's ``media_rules`` factory: the tile ceiling from
    ``data.multimodal.image_max_patches`` (module docstring), InternVL's released values
    elsewhere.

    Raises:
        ValueError: ``image_max_patches`` below one tile's patches.
    """
    if config is None:
        return InternVLMediaRules(tile_size=tile_size)
    check_tile_size(tile_size)
    per_tile = (tile_size // PATCH_SIZE) ** 2
    ceiling = config.image_max_patches // per_tile
    if ceiling < 1:
        raise ValueError(
            f"data.multimodal.image_max_patches={config.image_max_patches} is below one "
            f"InternVL tile ({per_tile} patches of a {tile_size}-px tile); set it to at least "
            f"{per_tile} (InternVL's 12 tiles + thumbnail: {13 * per_tile})")
    # k > 1 tiles come with a thumbnail: k + 1 tiles must fit, so 2 tiles need 3.
    max_tiles = min(MAX_TILES, ceiling - 1) if ceiling >= 3 else 1
    return InternVLMediaRules(tile_size=tile_size, max_tiles=max_tiles)


__all__ = ["IMG_CONTEXT", "IMG_END", "IMG_START", "INTERNVL_CHAT_TEMPLATE",
           "INTERNVL_END_OF_TURN", "INTERNVL_SPECIAL_TOKENS", "InternVLMediaRules",
           "InternVLTokenIds", "frame_prefix", "internvl_media_rules", "internvl_token_ids",
           "internvl_tokenize", "item_tokens"]
