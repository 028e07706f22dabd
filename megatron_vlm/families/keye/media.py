"""Keye-VL 1.5's data-side media rules (``data/media_rules.py``): template, sizing, video items.

Everything the multimodal loader does differently for Keye (``../shared/FAMILIES.md`` §1; the
released code wins over the report):

* **Template.** An image is ``<|vision_start|>`` + N x ``<|image_pad|>`` + ``<|vision_end|>``; a
  video is ``<|vision_start|>``, then per sampled frame ``<|frame|>`` + the timestamp text
  ``f"{ts:.1f}"`` + N x ``<|video_pad|>`` (a fast frame's placeholders inside
  ``<|fast_start|>`` ... ``<|fast_end|>``), then ``<|vision_end|>``. N = h*w/4 per image or frame.
  The ids come from the tokenizer by name (Qwen's 151652/151653/151655/151656 in the released
  tokenizer; a tiny SentencePiece model gets the strings appended by ``SpecialTokensTokenizer``).
* **Items.** One item per image and one per video FRAME, grid ``(1, h, w)``: Keye's tower attends
  per frame and its merger does not pool time, so an item becomes ``t*h*w/4 = h*w/4`` tokens
  (``merger.llm_tokens_per_item``), and each item is one M-RoPE block (``positions.py``).
* **Images.** ``processing.resize_image``: RGB (alpha dropped, EXIF orientation NOT applied, as
  keye-vl-utils does), ``smart_resize`` factor 28 within the token floor/ceiling, PIL bicubic.
* **Videos.** keye-vl-utils' sampling: ``k = min(int(n / src_fps * min(fps, src_fps)), cap)``
  frames at ``linspace(0, n - 1, k).round()``, timestamps ``float32(i / src_fps)``; SlowFast frame
  types when ``data.multimodal.video_sampler: slowfast`` (else every frame slow), the slow/fast
  frame sizes of the package's budget search, frames resized as the released HF processor does
  (bilinear, antialias, uint8). A ``clip`` span applies the same rule to the span's frames. Only
  the sampled frames are decoded (PyAV's sparse decoder, frames counted and timed as
  ``video.read_timing`` reads the header); a container without frame counts is decoded whole by
  ``video.decode_video`` and sampled from that.
* **Pixels.** ``x / 255`` normalised with mean = std = 0.5 per channel: SigLIP's normalisation,
  which the released ``preprocessor_config.json`` is recorded to carry (FAMILIES.md §1 (U); the
  processor class itself defaults to OpenAI-CLIP's mean/std when the file names none: check the
  checkpoint's file before pretraining on it). Same arithmetic as ``data/image.normalize``.

Budgets from ``data.multimodal`` where they map: ``image_max_patches / 4`` is the image token
ceiling, ``image_min_patches / 4`` the floor (unset: Keye's 4), ``video_chunk_max_patches / 4`` a
slow frame's token ceiling (Keye's is 768 = 3,072 patches), ``slowfast.max_video_tokens`` the
budget of one video (unset: Keye's 65,536), ``video_fps`` / ``video_max_frames`` the sampling. A
frame's floor is Keye's 48 tokens (the package raises any smaller floor to 48);
``video_frame_min_patches / 4`` replaces it for tiny test clips only.

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

from megatron_vlm.data.image import PATCH_SIZE, ProcessedImage, frames_to_patches
from megatron_vlm.data.media_errors import (
    BadSampleError,
    MediaDecodeError,
    MediaGridError,
    SkipReason,
)
from megatron_vlm.data.mrope_positions import PositionRule
from megatron_vlm.data.templates import Text, TextEncoder, TokenBuilder, TokenizedSample
from megatron_vlm.data.tokenizer import MissingSpecialTokenError
from megatron_vlm.data.video import VideoChunk, clip_frame_range, decode_video, read_timing
from megatron_vlm.data.video_pyav import decode_sampled
from megatron_vlm.families.keye import slowfast as keye_slowfast
from megatron_vlm.families.keye.positions import keye_position_ids
from megatron_vlm.families.keye.processing import (
    IMAGE_MAX_TOKENS,
    IMAGE_MIN_TOKENS,
    PIXELS_PER_TOKEN,
    VIDEO_MAX_TOKENS,
    VIDEO_MIN_TOKENS,
    VIDEO_TOTAL_TOKENS,
    frame_timestamps,
    num_sampled_frames,
    resize_image,
    resize_video_frames,
    sample_frame_indices,
    smart_resize,
    timestamp_text,
)

VISION_START = "<|vision_start|>"
VISION_END = "<|vision_end|>"
IMAGE_PAD = "<|image_pad|>"
VIDEO_PAD = "<|video_pad|>"
FRAME = "<|frame|>"
FAST_START = "<|fast_start|>"
FAST_END = "<|fast_end|>"
KEYE_SPECIAL_TOKENS = (VISION_START, VISION_END, IMAGE_PAD, VIDEO_PAD, FRAME, FAST_START,
                       FAST_END)
"""Keye's media special tokens, in the order ``SpecialTokensTokenizer`` appends them."""
KEYE_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
"""Qwen ChatML with its default system prompt (FAMILIES.md §1: Keye's chat is Qwen ChatML,
default system "You are a helpful assistant." [ms-swift KeyeVLTemplate]), for role-tagged
samples when the run's tokenizer ships no template of its own; a Keye tokenizer's own template
is used when it has one."""

_NO_PIXELS = torch.empty(0, 3, PATCH_SIZE, PATCH_SIZE)
_ALL_FRAMES_FPS = 1e9
"""A sampling rate above any source's: ``decode_video`` then returns every frame of the span
(the fallback for containers PyAV cannot time or decode)."""


@dataclass(frozen=True)
class KeyeTokenIds:
    """Ids of Keye's media special tokens in one tokenizer."""

    vision_start: int
    vision_end: int
    image_pad: int
    """Repeated h*w/4 times per image (HF ``image_token_id``)."""
    video_pad: int
    """Repeated h*w/4 times per video frame (HF ``video_token_id``)."""
    frame: int
    """Opens each video frame, before its timestamp text."""
    fast_start: int
    fast_end: int

    @property
    def placeholder_ids(self) -> frozenset[int]:
        return frozenset((self.image_pad, self.video_pad))

    @property
    def all_ids(self) -> frozenset[int]:
        return frozenset((self.vision_start, self.vision_end, self.image_pad, self.video_pad,
                          self.frame, self.fast_start, self.fast_end))

    def token_ids_config(self) -> dict[str, int | None]:
        """``model.token_ids`` media fields (Keye has no ``media_content`` token)."""
        return {"image": self.image_pad, "video": self.video_pad,
                "media_begin": self.vision_start, "media_content": None,
                "media_end": self.vision_end}


def keye_token_ids(tokenizer: Any) -> KeyeTokenIds:
    """Keye's media ids in ``tokenizer``, by name.

    Raises:
        MissingSpecialTokenError: Naming the tokens the tokenizer lacks.
    """
    special = tokenizer.special_tokens
    missing = [t for t in KEYE_SPECIAL_TOKENS if t not in special]
    if missing:
        describe = tokenizer.describe() if hasattr(tokenizer, "describe") else type(tokenizer)
        raise MissingSpecialTokenError(
            f"{describe} lacks the media tokens {missing} that Keye-VL 1.5's templates need; use "
            "Keye's tokenizer (Qwen3's with the Keye tokens) or one that defines them")
    names = ("vision_start", "vision_end", "image_pad", "video_pad", "frame", "fast_start",
             "fast_end")
    return KeyeTokenIds(**{n: int(special[t]) for n, t in zip(names, KEYE_SPECIAL_TOKENS)})


# ------------------------------------------------------------------------------------- template


def _frame_tokens(item: ProcessedImage | VideoChunk) -> int:
    t, h, w = item.grid_thw
    if t != 1 or h % 2 or w % 2 or h < 2 or w < 2:
        raise MediaGridError(f"Keye item grid {item.grid_thw} must be (1, h, w) with h, w even")
    return h * w // 4


def keye_tokenize(groups: Sequence[Any], tokenizer: TextEncoder, ids: KeyeTokenIds,
                  markers_loss: bool) -> TokenizedSample:
    """Keye's template (module docstring) over ``groups``: ``Text``, one image item, or one
    video's list of frame items. Wrapper tokens and timestamps are targets iff
    ``markers_loss``; the fast markers and placeholders never are."""
    b = TokenBuilder(tokenizer, ids, markers_loss)
    for group in groups:
        if isinstance(group, Text):
            b.text(group.text, group.loss, group.special)
        elif isinstance(group, list):
            b.special(ids.vision_start)
            for item in group:
                num = _frame_tokens(item)
                b.special(ids.frame)
                b.text(timestamp_text(item.timestamp), markers_loss)
                if item.is_fast:
                    b.special(ids.fast_start, loss=False)
                b.placeholders(ids.video_pad, item, num, True)
                if item.is_fast:
                    b.special(ids.fast_end, loss=False)
            b.special(ids.vision_end)
        elif isinstance(group, ProcessedImage):
            b.special(ids.vision_start)
            b.placeholders(ids.image_pad, group, _frame_tokens(group), False)
            b.special(ids.vision_end)
        else:
            raise TypeError(f"unsupported segment type {type(group).__name__}")
    return b.sample()


# --------------------------------------------------------------------------------------- images


def _open_image(data: bytes) -> PIL.Image.Image:
    """The image, loaded (decompression-bomb warnings are errors, as ``mm_encode`` plans)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", PIL.Image.DecompressionBombWarning)
            img = PIL.Image.open(io.BytesIO(data))
            img.load()
            return img
    except (PIL.Image.DecompressionBombError, PIL.Image.DecompressionBombWarning) as exc:
        raise MediaDecodeError(f"image too large: {exc}",
                               reason=SkipReason.IMAGE_TOO_LARGE) from exc
    except (OSError, ValueError, SyntaxError, EOFError, IndexError, TypeError) as exc:
        raise MediaDecodeError(f"cannot decode image: {type(exc).__name__}: {exc}") from exc


def _image_header(data: bytes) -> tuple[int, int]:
    """(height, width) from the header (no EXIF rotation: keye-vl-utils applies none)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", PIL.Image.DecompressionBombWarning)
            with PIL.Image.open(io.BytesIO(data)) as img:
                width, height = img.size
    except (PIL.Image.DecompressionBombError, PIL.Image.DecompressionBombWarning) as exc:
        raise MediaDecodeError(f"image too large: {exc}",
                               reason=SkipReason.IMAGE_TOO_LARGE) from exc
    except (OSError, ValueError, SyntaxError, EOFError, IndexError, TypeError) as exc:
        raise MediaDecodeError(f"cannot read image header: {type(exc).__name__}: {exc}") from exc
    return height, width


def _patches(frame: np.ndarray) -> torch.Tensor:
    """[h*w, 3, 14, 14] float32 of one resized [H, W, 3] uint8 frame: (x/255 - 0.5)/0.5."""
    size = frame.shape[:2]
    return frames_to_patches(frame, size, size)


# --------------------------------------------------------------------------------------- videos


@dataclass(frozen=True)
class _Sampled:
    indices: np.ndarray
    """[k] source frame indices."""
    timestamps: np.ndarray
    """[k] float32 seconds."""


def _sample(total: int, src_fps: float, clip, settings: Any,
            rules: KeyeMediaRules) -> _Sampled:
    first, end = clip_frame_range(total, src_fps, clip)
    num = num_sampled_frames(end - first, src_fps, fps=settings.video_fps,
                             min_tokens=rules.video_min_tokens,
                             total_tokens=rules.video_total_tokens,
                             max_frames=settings.video_max_frames)
    if num < 1:
        raise BadSampleError(
            f"a {end - first}-frame span at {src_fps:g} fps is too short to sample a frame at "
            f"{min(settings.video_fps, src_fps):g} fps", reason=SkipReason.VIDEO_EMPTY)
    indices = first + sample_frame_indices(end - first, num)
    return _Sampled(indices, frame_timestamps(indices, src_fps))


def _frame_plan(frames: np.ndarray | None, height: int, width: int, num: int, slowfast: bool,
                rules: KeyeMediaRules) -> tuple[np.ndarray, keye_slowfast.SlowFastSizes]:
    """Frame types ([k] int32, 1 = fast) and the slow/fast sizes of a video."""
    if slowfast:
        types = keye_slowfast.slow_fast_types(frames, threshold=rules.min_frame_similarity)
    else:
        types = np.zeros(num, dtype=np.int32)
    num_fast = int(types.sum())
    sizes = keye_slowfast.slow_fast_sizes(
        height, width, num_slow=num - num_fast, num_fast=num_fast,
        min_tokens=rules.video_min_tokens, max_tokens=rules.video_max_tokens,
        total_tokens=rules.video_total_tokens, frame_floor=rules.video_frame_floor)
    return types, sizes


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


def _read_frames(data: bytes, settings: Any, clip,
                 rules: KeyeMediaRules) -> tuple[_Sampled, np.ndarray, bool]:
    """The sampled frames of a video: (sampling, [k, H, W, 3] uint8, timestamps repaired).

    Only the sampled frames are decoded (PyAV, timed by the header as ``video.read_timing``
    reads it); a container without frame counts, or one PyAV cannot decode, is decoded whole by
    ``video.decode_video`` (the configured backend) and sampled from that.
    """
    timing = read_timing(data)
    if timing is not None and timing.total_frames > 0 and timing.fps > 0:
        sampled = _sample(timing.total_frames, timing.fps, clip, settings, rules)
        frames = _decode_indices(data, sampled.indices, timing)
        if frames is not None:
            return sampled, frames, timing.repaired
    video = decode_video(data, _ALL_FRAMES_FPS, None, settings.video_backend, clip=clip)
    sampled = _sample(video.total_frames, video.fps, clip, settings, rules)
    frames = video.frames[sampled.indices - int(video.frame_indices[0])]
    return sampled, frames, video.timestamps_repaired


def _frame_items(sampled: _Sampled, types: np.ndarray, sizes,
                 pixels: list[torch.Tensor] | None) -> list[VideoChunk]:
    items = []
    for i, (ts, fast) in enumerate(zip(sampled.timestamps.tolist(), types.tolist())):
        size = sizes.fast_size if fast else sizes.slow_size
        grid = (1, size[0] // PATCH_SIZE, size[1] // PATCH_SIZE)
        items.append(VideoChunk(_NO_PIXELS if pixels is None else pixels[i], grid, float(ts),
                                (float(ts),), chunk_index=i, is_fast=bool(fast)))
    return items


# ---------------------------------------------------------------------------------------- rules


@dataclass(frozen=True)
class KeyeMediaRules:
    """Keye-VL 1.5's media rules (module docstring). Pickles: settings only."""

    family: str = "keye"
    image_min_tokens: int = IMAGE_MIN_TOKENS
    """Token floor of an image (Keye: 4)."""
    image_max_tokens: int = IMAGE_MAX_TOKENS
    """Token ceiling of an image (Keye: 20,480)."""
    video_min_tokens: int = VIDEO_MIN_TOKENS
    """Token floor of a video frame (raised to ``video_frame_floor``, as the package does)."""
    video_frame_floor: int = VIDEO_MIN_TOKENS
    """The package's constant floor of a frame, 48 tokens; lowered only for tiny test clips
    (``data.multimodal.video_frame_min_patches / 4``)."""
    video_max_tokens: int = VIDEO_MAX_TOKENS
    """Token ceiling of a slow video frame (Keye: 768)."""
    video_total_tokens: int = VIDEO_TOTAL_TOKENS
    """Token budget of one video (Keye: 65,536)."""
    min_frame_similarity: float = keye_slowfast.MIN_FRAME_SIMILARITY
    """SlowFast: a frame less similar than this to the last slow frame is slow (Keye: 0.9)."""

    @property
    def special_tokens(self) -> tuple[str, ...]:
        return KEYE_SPECIAL_TOKENS

    @property
    def position_rule(self) -> PositionRule:
        return keye_position_ids

    def media_ids(self, tokenizer: Any) -> KeyeTokenIds:
        return keye_token_ids(tokenizer)

    def plan_image(self, data: bytes, settings: Any) -> ProcessedImage:
        """Grid of an image from its header (``smart_resize``)."""
        height, width = _image_header(data)
        size = smart_resize(height, width, min_pixels=self.image_min_tokens * PIXELS_PER_TOKEN,
                            max_pixels=self.image_max_tokens * PIXELS_PER_TOKEN)
        grid = (1, size[0] // PATCH_SIZE, size[1] // PATCH_SIZE)
        return ProcessedImage(_NO_PIXELS, grid, (height, width), size)

    def plan_video(self, data: bytes, settings: Any, clip) -> tuple[list[VideoChunk], bool]:
        """The video's frame items (grids, timestamps, fast flags) from its header; SlowFast
        types need the sampled frames' pixels (decoded, not kept)."""
        timing = None if settings.slowfast else read_timing(data)
        if timing is None or timing.total_frames < 1 or not timing.fps > 0:
            sampled, frames, repaired = _read_frames(data, settings, clip, self)
            types, sizes = _frame_plan(frames, *frames.shape[1:3], len(frames),
                                       settings.slowfast, self)
            return _frame_items(sampled, types, sizes, None), repaired
        sampled = _sample(timing.total_frames, timing.fps, clip, settings, self)
        types, sizes = _frame_plan(None, timing.height, timing.width, len(sampled.indices),
                                   False, self)
        return _frame_items(sampled, types, sizes, None), timing.repaired

    def tokenize(self, groups: Sequence[Any], tokenizer: TextEncoder, ids: KeyeTokenIds,
                 markers_loss: bool) -> TokenizedSample:
        return keye_tokenize(groups, tokenizer, ids, markers_loss)

    def decode(self, media: Any, settings: Any) -> list[ProcessedImage | VideoChunk]:
        """Pixels of one planned image (PIL bicubic) or video (one item per sampled frame)."""
        if media.type == "image":
            img = _open_image(media.data)
            height, width = img.height, img.width
            resized = resize_image(img, min_tokens=self.image_min_tokens,
                                   max_tokens=self.image_max_tokens)
            return [ProcessedImage(_patches(resized.pixels), (1, *resized.grid_hw),
                                   (height, width), resized.pixels.shape[:2])]
        sampled, frames, _ = _read_frames(media.data, settings, media.clip, self)
        types, sizes = _frame_plan(frames, *frames.shape[1:3], len(frames), settings.slowfast,
                                   self)
        pixels: list[torch.Tensor | None] = [None] * len(frames)
        for fast, size in ((0, sizes.slow_size), (1, sizes.fast_size)):
            picked = np.flatnonzero(types == fast)
            if len(picked):
                resized = resize_video_frames(frames[picked], size)
                for j, frame in zip(picked.tolist(), resized):
                    pixels[j] = _patches(frame)
        return _frame_items(sampled, types, sizes, pixels)

    def placeholder_count(self, item: Any) -> int:
        """``t*h*w/4`` (= ``h*w/4``: every Keye item is one image or one frame)."""
        t, h, w = item.grid_thw
        return t * h * w // 4

    @property
    def chat_template(self) -> str:
        return KEYE_CHAT_TEMPLATE

    @property
    def end_of_turn(self) -> str:
        return "<|im_end|>"


def keye_media_rules(config: Any = None) -> KeyeMediaRules:
    """The Keye family's ``media_rules`` factory: budgets from ``data.multimodal`` where they map
    (module docstring), Keye's released values elsewhere."""
    if config is None:
        return KeyeMediaRules()
    image_min = (IMAGE_MIN_TOKENS if config.image_min_patches is None
                 else max(1, config.image_min_patches // 4))
    total = config.slowfast.max_video_tokens
    floor = (VIDEO_MIN_TOKENS if config.video_frame_min_patches is None
             else config.video_frame_min_patches // 4)
    return KeyeMediaRules(
        video_min_tokens=floor, video_frame_floor=floor,
        image_min_tokens=image_min,
        image_max_tokens=max(image_min, config.image_max_patches // 4),
        video_max_tokens=max(1, config.video_chunk_max_patches // 4),
        video_total_tokens=VIDEO_TOTAL_TOKENS if total is None else total,
    )


__all__ = ["KEYE_SPECIAL_TOKENS", "KeyeMediaRules", "KeyeTokenIds", "keye_media_rules",
           "keye_token_ids", "keye_tokenize"]
