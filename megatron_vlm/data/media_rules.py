"""What the multimodal loader needs from a model family's data side: its media rules.

A family (``families/<name>/``) writes images and videos into the token stream its own way: which
special tokens wrap an item, how many placeholders an item becomes, how an image is sized, how a
video is sampled and cut into items, how pixels are normalised, and how the 3-axis position ids
are built (M-RoPE families). The loader (``mm_encode``/``mm_loader``) reaches all of that through
one object, a :class:`MediaRules`, handed in by the trainer (``training/data_setup.py`` asks the
family: ``get_family(model.family).media_rules(data.multimodal)``); the data side never imports
families.

The object travels to energon's worker processes inside ``EncodeSettings``, so it must pickle: a
frozen dataclass holding settings, whose methods call module-level functions.

:class:`KimiMediaRules` is today's behaviour, unchanged (every call delegates to the functions
that did it before: ``mm_encode``'s planning and decoding, ``templates.tokenize_interleaved``,
the tokenizer's ``media_token_ids()``); it is the default wherever no rules are given.

The planning contract (``mm_encode.plan_document``):

* ``plan_image(data, settings)`` -> one item with its grid and no pixels (headers only);
* ``plan_video(data, settings, clip)`` -> ``(part, timestamps_repaired)``: ``part`` is a
  ``video_fit.VideoHeader`` (the uniform Kimi sampler: cut into items later, at the settings the
  document is fitted to) or the list of the video's items (grids, timestamps, slow/fast flags,
  no pixels);
* ``tokenize(groups, tokenizer, ids, markers_loss)`` -> ``TokenizedSample``: ``groups`` in order
  are ``templates.Text``, one image item, or one video's list of items;
* role-tagged samples (``{"turn": role}`` segments) are written with the tokenizer's chat
  template, else the family's ``chat_template`` (``data/chat_turns.py``);
* ``decode(media, settings)`` -> the items of one planned image or video with pixels
  (``[t*h*w, 3, 14, 14]`` float32 each), equal in grid, timestamp and slow/fast flag to the plan.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from megatron_vlm.data.mrope_positions import PositionRule
from megatron_vlm.data.templates import (
    KIMI_CHAT_TEMPLATE,
    KIMI_END_OF_TURN,
    MEDIA_SPECIAL_TOKENS,
    TextEncoder,
    TokenizedSample,
    tokenize_interleaved,
)

if TYPE_CHECKING:  # mm_encode imports this module
    from megatron_vlm.data.mm_encode import EncodeSettings, PlannedMedia


@runtime_checkable
class MediaTokens(Protocol):
    """Ids of a family's media special tokens in one tokenizer."""

    @property
    def placeholder_ids(self) -> frozenset[int]:
        """Ids that vision features replace (never loss targets, never in plain text)."""
        ...

    @property
    def all_ids(self) -> frozenset[int]:
        """Every media special id (plain text must never encode to one)."""
        ...

    def token_ids_config(self) -> dict[str, int | None]:
        """``model.token_ids`` media fields (``image``, ``video``, ``media_begin``,
        ``media_content``, ``media_end``; None where the family has no such token)."""
        ...


@runtime_checkable
class MediaRules(Protocol):
    """A family's data-side media rules (module docstring: the planning contract)."""

    family: str
    """The family these rules belong to (``model.family``)."""

    @property
    def special_tokens(self) -> tuple[str, ...]:
        """Media special-token strings, in the order ``SpecialTokensTokenizer`` appends them to a
        plain SentencePiece model (real tokenizers must already define them)."""
        ...

    @property
    def position_rule(self) -> PositionRule | None:
        """The family's M-RoPE rule (a module-level function), None for 1D RoPE."""
        ...

    def media_ids(self, tokenizer: Any) -> MediaTokens:
        """The ids of :attr:`special_tokens` in ``tokenizer``, looked up by name (never
        hard-coded); raises ``MissingSpecialTokenError`` naming absent tokens."""
        ...

    def plan_image(self, data: bytes, settings: EncodeSettings) -> Any:
        """One image item (grid only) from the image's header."""
        ...

    def plan_video(self, data: bytes, settings: EncodeSettings,
                   clip: tuple[float, float] | None) -> tuple[Any, bool]:
        """``(VideoHeader or list of items, timestamps_repaired)`` of one video."""
        ...

    def tokenize(self, groups: Sequence[Any], tokenizer: TextEncoder, ids: MediaTokens,
                 markers_loss: bool) -> TokenizedSample:
        """The family's template over ``groups`` (Text, an image item, a video's item list)."""
        ...

    def decode(self, media: PlannedMedia, settings: EncodeSettings) -> list[Any]:
        """The items of one planned image or video, with their pixels."""
        ...

    def placeholder_count(self, item: Any) -> int:
        """Placeholder tokens one item becomes (the model's ``llm_tokens_per_item``)."""
        ...

    @property
    def chat_template(self) -> str:
        """The family's chat layout (Jinja) for role-tagged samples when the run's tokenizer
        ships no template of its own (``data/chat_turns.py``)."""
        ...

    @property
    def end_of_turn(self) -> str:
        """The string that closes a turn (a target after an assistant turn)."""
        ...


# ------------------------------------------------------------------------------------ Kimi


def _kimi_token_ids_config(ids) -> dict[str, int | None]:
    return {"image": ids.image_placeholder, "video": ids.video_placeholder,
            "media_begin": ids.media_begin, "media_content": ids.media_content,
            "media_end": ids.media_end}


@dataclass(frozen=True)
class KimiMediaRules:
    """Kimi K2.5's media rules: today's templates, image NaViT sizing, 4-frame video chunks
    (uniform, fitted to the budgets) or the SlowFast option (``data/slowfast.py``)."""

    family: str = "kimi"

    @property
    def special_tokens(self) -> tuple[str, ...]:
        return MEDIA_SPECIAL_TOKENS

    @property
    def position_rule(self) -> PositionRule | None:
        return None

    def media_ids(self, tokenizer: Any):
        """``tokenizer.media_token_ids()`` (``templates.MediaTokenIds``)."""
        return tokenizer.media_token_ids()

    def plan_image(self, data: bytes, settings: EncodeSettings):
        from megatron_vlm.data.mm_encode import plan_kimi_image

        return plan_kimi_image(data, settings)

    def plan_video(self, data: bytes, settings: EncodeSettings,
                   clip: tuple[float, float] | None):
        from megatron_vlm.data.mm_encode import plan_kimi_video

        return plan_kimi_video(data, settings, clip)

    def tokenize(self, groups: Sequence[Any], tokenizer: TextEncoder, ids,
                 markers_loss: bool) -> TokenizedSample:
        """``tokenize_interleaved`` with each video's fast runs in fast_start/fast_end."""
        from megatron_vlm.data.slowfast import slowfast_segments

        segments: list[Any] = []
        for group in groups:
            # A uniform video has no fast chunk: slowfast_segments returns it as it is.
            segments.extend(slowfast_segments(group) if isinstance(group, list) else [group])
        return tokenize_interleaved(segments, tokenizer, ids, markers_loss)

    def decode(self, media: PlannedMedia, settings: EncodeSettings) -> list[Any]:
        from megatron_vlm.data.mm_encode import decode_kimi_media

        return decode_kimi_media(media, settings)

    def placeholder_count(self, item: Any) -> int:
        """``h*w/4`` (MoonViT-3D pools a chunk's frames into one frame's tokens)."""
        return item.num_tokens

    @property
    def chat_template(self) -> str:
        return KIMI_CHAT_TEMPLATE

    @property
    def end_of_turn(self) -> str:
        return KIMI_END_OF_TURN


KIMI_MEDIA_RULES = KimiMediaRules()
"""The default rules (Kimi K2.5) wherever none are given."""


def kimi_media_rules(config: Any = None) -> KimiMediaRules:
    """The Kimi family's ``media_rules`` factory (the data config changes nothing: its fields are
    read from ``EncodeSettings``)."""
    return KIMI_MEDIA_RULES


def token_ids_config(ids: Any) -> dict[str, int | None]:
    """``model.token_ids`` media fields of a media-ids object (Kimi's ``MediaTokenIds`` or a
    family's :class:`MediaTokens`)."""
    if hasattr(ids, "token_ids_config"):
        return ids.token_ids_config()
    return _kimi_token_ids_config(ids)


__all__ = ["KIMI_MEDIA_RULES", "KimiMediaRules", "MediaRules", "MediaTokens",
           "kimi_media_rules", "token_ids_config"]
