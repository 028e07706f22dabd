"""GLM-4.1V / GLM-4.5V data-side media rules (``data/media_rules.py``): template, sizing, items.

What the multimodal loader does differently for GLM (``../shared/FAMILIES.md`` §2; transformers
5.25's ``Glm4vProcessor`` and processors are the reference, ``processing.py``):

* **Template.** An image is ``<|begin_of_image|>`` + N x ``<|image|>`` + ``<|end_of_image|>``; a
  video is ``<|begin_of_video|>``, then per temporal patch (2 sampled frames)
  ``<|begin_of_image|>`` + N x ``<|image|>`` + ``<|end_of_image|>`` + ``str(int(ts))`` (ts: the
  patch's first frame, seconds), then ``<|end_of_video|>``: what ``Glm4vProcessor`` expands the
  chat template's ``<|begin_of_video|><|video|><|end_of_video|>`` into. Video placeholders are
  ``<|image|>`` too, as transformers writes them (the video wrappers tell the two apart: its
  ``mm_token_type_ids``). N = h*w/4. Ids come from the tokenizer by name (151339..151344 in the
  GLM-4.5V tokenizer; a tiny SentencePiece model gets the strings appended by
  ``SpecialTokensTokenizer``).
* **Items.** One item per image and one per temporal patch of a video, grid ``(2, h, w)`` in
  frames (an image's frame twice), ``[2*h*w, 3, 14, 14]`` patches in raster order
  (``data/contract.py``); the tower's Conv3d folds the 2 frames, so an item becomes ``h*w/4``
  tokens and one M-RoPE block (``positions.py``).
* **Images.** ``processing.resize_image`` on the decoded RGB image (``data.image.decode_image``:
  EXIF orientation applied as transformers' ``load_image`` does, transparency composited on white
  as the processor's ``convert_to_rgb`` does a PIL image handed to it; ``load_image`` itself, for
  paths and URLs, drops alpha instead): bounds ``2*H*W`` in ``[112*112, 28*28*15000]`` px, PIL
  bicubic, CLIP mean/std.
* **Videos.** ``processing.sample_frames`` at ``data.multimodal.video_fps`` (GLM: 2) over the
  clip (or its ``clip`` span), frame count and rate as transformers' PyAV reader takes them
  (``stream.frames``, ``average_rate``; duration ``n / fps``); every frame sized by
  ``smart_resize`` over all sampled frames (``t*H*W <= 28*28*2*30000`` px), torchvision's uint8
  bicubic, the video processor's normalisation. Only the sampled frames are decoded (PyAV's
  sparse decoder; else in order; a container without frame counts is decoded whole by
  ``video.decode_video`` and sampled from that).

Budgets from ``data.multimodal`` where they map: ``image_max_patches`` is the ViT patch ceiling of
one image (one temporal patch: ``h*w``), so ``image_max_pixels = image_max_patches * 2 * 14^2``
(GLM's released 28*28*15000 px is ``image_max_patches = 30000``); ``image_min_patches`` likewise
(unset: GLM's 112*112 px); ``slowfast.max_video_tokens``, the LLM token budget of one video
(as for Keye), bounds a video's ``t*H*W <= tokens * 2 * 28^2`` px (unset: GLM's 30,000 tokens).
A document longer than ``seq_length`` is skipped (``too_long``): GLM's videos are not fitted the
way Kimi's uniform chunks are (``video_fit.py``), so a run at 8K sets that budget below it.
``video_fps`` is the sampling rate; ``video_max_frames`` is not used (GLM's 300 s rule caps a
video at 600 frames).

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
from megatron_vlm.data.mrope_positions import PositionRule
from megatron_vlm.data.templates import Text, TextEncoder, TokenBuilder, TokenizedSample
from megatron_vlm.data.tokenizer import MissingSpecialTokenError
from megatron_vlm.data.video import VideoChunk, clip_frame_range, decode_video, read_timing
from megatron_vlm.data.video_pyav import decode_sampled
from megatron_vlm.families.glm.positions import glm_position_ids
from megatron_vlm.families.glm.processing import (
    IMAGE_MAX_PIXELS,
    IMAGE_MIN_PIXELS,
    MERGE_SIZE,
    TEMPORAL_PATCH_SIZE,
    VIDEO_MAX_DURATION,
    VIDEO_MAX_PIXELS,
    VIDEO_MIN_PIXELS,
    frame_timestamps,
    image_size,
    resize_image,
    resize_video_frames,
    sample_frames,
    timestamp_text,
    video_size,
)

BEGIN_OF_IMAGE = "<|begin_of_image|>"
END_OF_IMAGE = "<|end_of_image|>"
BEGIN_OF_VIDEO = "<|begin_of_video|>"
END_OF_VIDEO = "<|end_of_video|>"
IMAGE = "<|image|>"
VIDEO = "<|video|>"
GLM_SPECIAL_TOKENS = (BEGIN_OF_IMAGE, END_OF_IMAGE, BEGIN_OF_VIDEO, END_OF_VIDEO, IMAGE, VIDEO)
"""GLM's media special tokens, in the order of their ids in the released tokenizers (and the
order ``SpecialTokensTokenizer`` appends them)."""
GLM_CHAT_TEMPLATE = (
    "[gMASK]<sop>"
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
"""GLM-4.1V's chat layout for string contents: ``[gMASK]<sop>``, then per turn ``<|role|>\\n`` +
content with nothing closing it (the released ``chat_template.jinja``'s system/user/assistant
branches, its media items and assistant ``metadata`` left out: our contents carry the media).
GLM-4.5V's released template adds thinking markup (U): a GLM tokenizer's own template is used
when it has one."""
GLM_END_OF_TURN = "<|user|>"
"""GLM writes nothing after a turn: the next ``<|user|>`` ends an assistant turn (one of the
released ``generation_config`` stop ids with ``<|endoftext|>``, which ends a document)."""

_NO_PIXELS = torch.empty(0, 3, PATCH_SIZE, PATCH_SIZE)
_ALL_FRAMES_FPS = 1e9
"""A sampling rate above any source's: ``decode_video`` then returns every frame of the span."""


@dataclass(frozen=True)
class GlmTokenIds:
    """Ids of GLM's media special tokens in one tokenizer."""

    begin_of_image: int
    """Opens an image or a video's temporal patch (HF ``image_start_token_id``)."""
    end_of_image: int
    """Closes it (HF ``image_end_token_id``)."""
    begin_of_video: int
    """Opens a video (HF ``video_start_token_id``)."""
    end_of_video: int
    """Closes a video (HF ``video_end_token_id``)."""
    image: int
    """Repeated h*w/4 times per image AND per temporal patch (HF ``image_token_id``)."""
    video: int
    """The chat template's one-token video stand-in (HF ``video_token_id``); never in a
    tokenised document (the processor expands it)."""

    @property
    def placeholder_ids(self) -> frozenset[int]:
        return frozenset((self.image,))

    @property
    def all_ids(self) -> frozenset[int]:
        return frozenset((self.begin_of_image, self.end_of_image, self.begin_of_video,
                          self.end_of_video, self.image, self.video))

    def token_ids_config(self) -> dict[str, int | None]:
        """``model.token_ids`` media fields (GLM has no ``media_content`` token)."""
        return {"image": self.image, "video": self.video, "media_begin": self.begin_of_image,
                "media_content": None, "media_end": self.end_of_image}


def glm_token_ids(tokenizer: Any) -> GlmTokenIds:
    """GLM's media ids in ``tokenizer``, by name.

    Raises:
        MissingSpecialTokenError: Naming the tokens the tokenizer lacks.
    """
    special = tokenizer.special_tokens
    missing = [t for t in GLM_SPECIAL_TOKENS if t not in special]
    if missing:
        describe = tokenizer.describe() if hasattr(tokenizer, "describe") else type(tokenizer)
        raise MissingSpecialTokenError(
            f"{describe} lacks the media tokens {missing} that GLM-4.1V/4.5V's templates need; "
            "use the GLM tokenizer or one that defines them")
    names = ("begin_of_image", "end_of_image", "begin_of_video", "end_of_video", "image",
             "video")
    return GlmTokenIds(**{n: int(special[t]) for n, t in zip(names, GLM_SPECIAL_TOKENS)})


# ------------------------------------------------------------------------------------- template


def _item_tokens(item: ProcessedImage | VideoChunk) -> int:
    t, h, w = item.grid_thw
    if t != TEMPORAL_PATCH_SIZE or h % 2 or w % 2 or h < 2 or w < 2:
        raise MediaGridError(f"GLM item grid {item.grid_thw} must be (2, h, w) with h, w even")
    return h * w // 4


def glm_tokenize(groups: Sequence[Any], tokenizer: TextEncoder, ids: GlmTokenIds,
                 markers_loss: bool) -> TokenizedSample:
    """GLM's template (module docstring) over ``groups``: ``Text``, one image item, or one
    video's list of temporal-patch items. Wrapper tokens and timestamps are targets iff
    ``markers_loss``; placeholders never are."""
    b = TokenBuilder(tokenizer, ids, markers_loss)
    for group in groups:
        if isinstance(group, Text):
            b.text(group.text, group.loss, group.special)
        elif isinstance(group, list):
            b.special(ids.begin_of_video)
            for item in group:
                b.special(ids.begin_of_image)
                b.placeholders(ids.image, item, _item_tokens(item), True)
                b.special(ids.end_of_image)
                b.text(timestamp_text(item.timestamp), markers_loss)
            b.special(ids.end_of_video)
        elif isinstance(group, ProcessedImage):
            b.special(ids.begin_of_image)
            b.placeholders(ids.image, group, _item_tokens(group), False)
            b.special(ids.end_of_image)
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
    except (OSError, ValueError, SyntaxError, EOFError, IndexError, TypeError) as exc:
        raise MediaDecodeError(f"cannot read image header: {type(exc).__name__}: {exc}") from exc
    if orientation in (5, 6, 7, 8):  # rotated by 90 degrees
        height, width = width, height
    return height, width


# --------------------------------------------------------------------------------------- videos


@dataclass(frozen=True)
class _Sampled:
    indices: np.ndarray
    """[k] source frame indices (k even; the last may repeat)."""
    timestamps: np.ndarray
    """[k] seconds."""


def _sample(total: int, src_fps: float, clip, settings: Any, rules: GlmMediaRules) -> _Sampled:
    first, end = clip_frame_range(total, src_fps, clip)
    indices = first + sample_frames(end - first, src_fps, duration=(end - first) / src_fps,
                                    fps=settings.video_fps, max_duration=rules.max_duration)
    return _Sampled(indices, frame_timestamps(indices, src_fps))


def _decode_indices(data: bytes, indices: np.ndarray, timing) -> np.ndarray | None:
    """[k, H, W, 3] uint8 source frames ``indices`` (repeats allowed) by PyAV: sparse where the
    stream's index places them, else in decode order as transformers' reader does; None when
    PyAV cannot deliver all of them."""
    import av

    unique = np.unique(indices)
    try:
        with av.open(io.BytesIO(data)) as container:
            stream = container.streams.video[0]
            frames = None
            if timing.frame_pts:
                frames = decode_sampled(container, stream, unique, timing.frame_pts,
                                        timing.keyframe_pts)
                if frames is None:
                    container.seek(0)
            if frames is None:
                wanted, last, frames = set(unique.tolist()), int(unique[-1]), []
                for i, frame in enumerate(container.decode(stream)):
                    if i in wanted:
                        frames.append(frame.to_ndarray(format="rgb24"))
                    if i >= last:
                        break
    except Exception:  # av.error.* on damaged input: the fallback decoder reports it
        return None
    if len(frames) != len(unique):
        return None
    stacked = np.stack(frames)[np.searchsorted(unique, indices)]
    return np.ascontiguousarray(stacked, dtype=np.uint8)


def _read_frames(data: bytes, settings: Any, clip,
                 rules: GlmMediaRules) -> tuple[_Sampled, np.ndarray, bool]:
    """The sampled frames of a video: (sampling, [k, H, W, 3] uint8, timestamps repaired)."""
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


def _patch_items(sampled: _Sampled, size: tuple[int, int],
                 pixels: torch.Tensor | None) -> list[VideoChunk]:
    """One item per temporal patch (2 sampled frames), pixels sliced from ``[k*h*w, 3, p, p]``."""
    grid = (TEMPORAL_PATCH_SIZE, size[0] // PATCH_SIZE, size[1] // PATCH_SIZE)
    per_item = grid[0] * grid[1] * grid[2]
    items = []
    for i in range(len(sampled.indices) // TEMPORAL_PATCH_SIZE):
        pair = sampled.timestamps[TEMPORAL_PATCH_SIZE * i : TEMPORAL_PATCH_SIZE * (i + 1)]
        patches = _NO_PIXELS if pixels is None else pixels[i * per_item : (i + 1) * per_item]
        items.append(VideoChunk(patches, grid, float(pair[0]), tuple(float(t) for t in pair),
                                chunk_index=i))
    return items


# ---------------------------------------------------------------------------------------- rules


@dataclass(frozen=True)
class GlmMediaRules:
    """GLM-4.1V / GLM-4.5V's media rules (module docstring). Pickles: settings only."""

    family: str = "glm"
    image_min_pixels: int = IMAGE_MIN_PIXELS
    """Floor of an image's ``2*H*W`` px (GLM: 112*112)."""
    image_max_pixels: int = IMAGE_MAX_PIXELS
    """Ceiling of an image's ``2*H*W`` px (GLM: 28*28*15000)."""
    video_min_pixels: int = VIDEO_MIN_PIXELS
    """Floor of a video's ``t*H*W`` px over its sampled frames (GLM: 112*112)."""
    video_max_pixels: int = VIDEO_MAX_PIXELS
    """Ceiling of a video's ``t*H*W`` px (GLM: 28*28*2*30000)."""
    max_duration: float = VIDEO_MAX_DURATION
    """Seconds above which a video gets ``max_duration * fps`` frames spread over it (GLM: 300)."""

    @property
    def special_tokens(self) -> tuple[str, ...]:
        return GLM_SPECIAL_TOKENS

    @property
    def position_rule(self) -> PositionRule:
        return glm_position_ids

    def media_ids(self, tokenizer: Any) -> GlmTokenIds:
        return glm_token_ids(tokenizer)

    def plan_image(self, data: bytes, settings: Any) -> ProcessedImage:
        """Grid of an image from its header (``smart_resize`` with 2 frames)."""
        height, width = _image_header(data)
        size = image_size(height, width, min_pixels=self.image_min_pixels,
                          max_pixels=self.image_max_pixels)
        grid = (TEMPORAL_PATCH_SIZE, size[0] // PATCH_SIZE, size[1] // PATCH_SIZE)
        return ProcessedImage(_NO_PIXELS, grid, (height, width), size)

    def plan_video(self, data: bytes, settings: Any, clip) -> tuple[list[VideoChunk], bool]:
        """The video's temporal-patch items (grids, timestamps) from its header."""
        timing = read_timing(data)
        if timing is None or timing.total_frames < 1 or not timing.fps > 0:
            sampled, frames, repaired = _read_frames(data, settings, clip, self)
            height, width = frames.shape[1:3]
        else:
            sampled = _sample(timing.total_frames, timing.fps, clip, settings, self)
            height, width, repaired = timing.height, timing.width, timing.repaired
        size = video_size(len(sampled.indices), height, width, min_pixels=self.video_min_pixels,
                          max_pixels=self.video_max_pixels)
        return _patch_items(sampled, size, None), repaired

    def tokenize(self, groups: Sequence[Any], tokenizer: TextEncoder, ids: GlmTokenIds,
                 markers_loss: bool) -> TokenizedSample:
        return glm_tokenize(groups, tokenizer, ids, markers_loss)

    def decode(self, media: Any, settings: Any) -> list[ProcessedImage | VideoChunk]:
        """Pixels of one planned image (one temporal patch) or video (one item per temporal
        patch)."""
        if media.type == "image":
            rgb = decode_image(media.data)
            resized = resize_image(rgb, min_pixels=self.image_min_pixels,
                                   max_pixels=self.image_max_pixels)
            return [ProcessedImage(resized.patches(), (TEMPORAL_PATCH_SIZE, *resized.grid_hw),
                                   rgb.shape[:2], resized.pixels.shape[:2])]
        sampled, frames, _ = _read_frames(media.data, settings, media.clip, self)
        size = video_size(len(frames), *frames.shape[1:3], min_pixels=self.video_min_pixels,
                          max_pixels=self.video_max_pixels)
        return _patch_items(sampled, size, resize_video_frames(frames, size))

    def placeholder_count(self, item: Any) -> int:
        """``h*w/4``: the Conv3d folds an item's 2 frames into one grid of tokens."""
        _, h, w = item.grid_thw
        return h * w // 4

    @property
    def chat_template(self) -> str:
        return GLM_CHAT_TEMPLATE

    @property
    def end_of_turn(self) -> str:
        return GLM_END_OF_TURN


def glm_media_rules(config: Any = None) -> GlmMediaRules:
    """The GLM family's ``media_rules`` factory: image bounds from ``data.multimodal`` where they
    map (module docstring), GLM's released values elsewhere."""
    if config is None:
        return GlmMediaRules()
    per_patch = TEMPORAL_PATCH_SIZE * PATCH_SIZE * PATCH_SIZE
    image_min = (IMAGE_MIN_PIXELS if config.image_min_patches is None
                 else config.image_min_patches * per_patch)
    video_tokens = config.slowfast.max_video_tokens
    per_token = TEMPORAL_PATCH_SIZE * (PATCH_SIZE * MERGE_SIZE) ** 2
    return GlmMediaRules(
        image_min_pixels=image_min,
        image_max_pixels=max(image_min, config.image_max_patches * per_patch),
        video_max_pixels=VIDEO_MAX_PIXELS if video_tokens is None else video_tokens * per_token)


__all__ = ["GLM_CHAT_TEMPLATE", "GLM_END_OF_TURN", "GLM_SPECIAL_TOKENS", "GlmMediaRules",
           "GlmTokenIds", "glm_media_rules", "glm_token_ids", "glm_tokenize"]
