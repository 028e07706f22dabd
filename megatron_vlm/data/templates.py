"""Kimi K2.5 media prompt templates, tokenizer-agnostic (SPEC §2; HF ``processing_kimi_k25``).

How media is written into the token stream (transformers 5.23 + the K2.5 chat template):

- image:        ``<|media_begin|>image<|media_content|>{<|media_pad|> x h*w/4}<|media_end|>``
  (the chat template writes the wrapper around one ``<|media_pad|>``; the processor repeats it)
- video chunk:  ``HH:MM:SS.mmm<|media_begin|>video<|media_content|>{<|kimi_k25_video_placeholder|>
  x h*w/4}<|media_end|>`` per chunk, back to back, with the chunk's first-frame timestamp
  (``time.strftime("%H:%M:%S", gmtime(t)) + f".{int(t % 1 * 1000):03d}"``: milliseconds
  truncated, not rounded).

``tokenize_interleaved`` turns an interleaved sample (text, images, video chunks) into token ids, a
target mask and the placeholder span of every media item, given any tokenizer with
``encode(text) -> list[int]`` (plain text: special-token strings in the text must NOT become special
ids) and the ids of the media special tokens. Each segment is encoded on its own; with Kimi's
tiktoken split pattern a segment boundary that is also a special-token boundary tokenises exactly
as the joined string (tiktoken splits on special tokens first).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from megatron_vlm.data.image import MERGE_SIZE, ProcessedImage
from megatron_vlm.data.media_errors import BadSampleError, MediaGridError, SkipReason
from megatron_vlm.data.video import ProcessedVideo, VideoChunk

MEDIA_BEGIN = "<|media_begin|>"
MEDIA_CONTENT = "<|media_content|>"
MEDIA_END = "<|media_end|>"
IMAGE_PLACEHOLDER = "<|media_pad|>"
"""HF ``Kimi_K25Processor.image_token`` (id ``image_token_id``)."""
VIDEO_PLACEHOLDER = "<|kimi_k25_video_placeholder|>"
"""HF ``Kimi_K25Processor.video_token`` (id ``video_token_id``)."""
FAST_START = "<|fast_start|>"
"""Opens a run of SlowFast fast frames (ours, for the Keye-style option; see slowfast.py)."""
FAST_END = "<|fast_end|>"
"""Closes a run of SlowFast fast frames."""
IMAGE_WORD = "image"
VIDEO_WORD = "video"

MEDIA_SPECIAL_TOKENS = (
    MEDIA_BEGIN,
    MEDIA_CONTENT,
    MEDIA_END,
    IMAGE_PLACEHOLDER,
    VIDEO_PLACEHOLDER,
    FAST_START,
    FAST_END,
)
"""Every special token the media templates use, in a fixed order: ``SpecialTokensTokenizer``
gives token k the id ``base vocab + k``, so new tokens go at the END (the SlowFast markers came
last) and the ids of the existing ones never move."""

SPECIAL_TOKEN_STRINGS = dict(
    zip(
        (
            "media_begin",
            "media_content",
            "media_end",
            "image_placeholder",
            "video_placeholder",
            "fast_start",
            "fast_end",
        ),
        MEDIA_SPECIAL_TOKENS,
    )
)
"""``MediaTokenIds`` field name -> token string."""


@dataclass(frozen=True)
class MediaTokenIds:
    """Ids of the media special tokens in one tokenizer."""

    media_begin: int
    media_content: int
    media_end: int
    image_placeholder: int
    """Repeated h*w/4 times per image (HF ``image_token_id``; Kimi 163605)."""
    video_placeholder: int
    """Repeated h*w/4 times per video chunk (HF ``video_token_id``; 163840 = Kimi's vocab size,
    i.e. outside the embedding table: the model must replace placeholder ids before the lookup,
    as HF does by zeroing them)."""
    fast_start: int | None = None
    fast_end: int | None = None

    @property
    def placeholder_ids(self) -> frozenset[int]:
        return frozenset((self.image_placeholder, self.video_placeholder))

    @property
    def all_ids(self) -> frozenset[int]:
        ids = {
            self.media_begin,
            self.media_content,
            self.media_end,
            self.image_placeholder,
            self.video_placeholder,
        }
        ids.update(i for i in (self.fast_start, self.fast_end) if i is not None)
        return frozenset(ids)


KIMI_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}<|im_system|>system<|im_middle|>"
    "{% elif message['role'] == 'user' %}<|im_user|>user<|im_middle|>"
    "{% else %}<|im_assistant|>assistant<|im_middle|>{% endif %}"
    "{{ message['content'] }}<|im_end|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_assistant|>assistant<|im_middle|>{% endif %}"
)
"""Kimi's chat layout (roles as ``<|im_user|>``/``<|im_assistant|>``/``<|im_system|>`` + name +
``<|im_middle|>``, turns closed by ``<|im_end|>``), for role-tagged samples when the run's
tokenizer ships no chat template of its own (the tiny SentencePiece run); a K2.5 tokenizer's own
template is used when it has one (``data/chat_turns.py``)."""
KIMI_END_OF_TURN = "<|im_end|>"
"""Closes a turn in Kimi's chat layout (a target after an assistant turn)."""

KIMI_K25_MEDIA_TOKEN_IDS = MediaTokenIds(
    media_begin=163602,  # HF Kimi_K25Config.vision_start_token_id
    media_content=163603,
    media_end=163604,  # HF Kimi_K25Config.vision_end_token_id
    image_placeholder=163605,  # HF Kimi_K25Config.image_token_id
    video_placeholder=163840,  # HF Kimi_K25Config.video_token_id
)
"""Kimi K2.5's ids (transformers 5.23 config defaults; 163603 by position in the tokenizer)."""


class TextEncoder(Protocol):
    """What the templates need from a tokenizer (``encode_with_special`` only for a chat
    template's own text, ``Text.special``)."""

    def encode(self, text: str) -> list[int]: ...

    def encode_with_special(self, text: str) -> list[int]: ...


@dataclass
class Text:
    """A text segment; ``loss=False`` masks it (e.g. a prompt) from the loss."""

    text: str
    loss: bool = True
    special: bool = False
    """Trusted text whose special-token strings become their ids (a chat template's own text,
    ``data/chat_turns.py``: ``<|im_end|>`` is one id). Sample text never is: web text that
    spells a special token stays plain text."""


@dataclass
class SpecialToken:
    """One media special token by ``MediaTokenIds`` field name (e.g. ``"fast_start"``)."""

    name: str
    loss: bool | None = None
    """Whether it may be a target; None follows ``markers_loss`` (SlowFast markers: False)."""


Segment = Text | SpecialToken | ProcessedImage | VideoChunk | ProcessedVideo


@dataclass
class PlaceholderSpan:
    """Where one media item's placeholders sit in the token sequence."""

    start: int
    """Index of the first placeholder token."""
    length: int
    """h*w/4 placeholders."""
    item_index: int
    """Index of the item in ``TokenizedSample.items`` (images and chunks in sequence order)."""
    is_video: bool


@dataclass
class TokenizedSample:
    """One document: tokens, what may be trained on, and where its media goes."""

    tokens: np.ndarray
    """[n] int64."""
    target_mask: np.ndarray
    """[n] bool: token i may be a prediction *target* (False on placeholders and on masked
    text). ``loss_mask()`` turns it into the input-aligned mask of the packed-batch contract."""
    placeholder_spans: list[PlaceholderSpan] = field(default_factory=list)
    items: list[ProcessedImage | VideoChunk] = field(default_factory=list)

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def is_placeholder(self) -> np.ndarray:
        """[n] bool, True on media placeholder tokens."""
        mask = np.zeros(len(self), dtype=bool)
        for span in self.placeholder_spans:
            mask[span.start : span.start + span.length] = True
        return mask

    def loss_mask(self) -> np.ndarray:
        """[n] float32 input-aligned loss mask (SPEC §11): position i predicts token i+1, so
        ``loss[i] = target[i+1] and not placeholder[i]``; the last token gets 0."""
        loss = np.zeros(len(self), dtype=np.float32)
        if len(self) > 1:
            loss[:-1] = self.target_mask[1:] & ~self.is_placeholder[:-1]
        return loss

    @property
    def num_patches(self) -> int:
        """ViT patches over all items."""
        return sum(item.num_patches for item in self.items)


def format_timestamp(seconds: float) -> str:
    """``HH:MM:SS.mmm`` exactly as HF ``replace_video_token`` writes it (ms truncated)."""
    return time.strftime("%H:%M:%S", time.gmtime(seconds)) + f".{int(seconds % 1 * 1000):03d}"


def _check_grid(item: ProcessedImage | VideoChunk) -> int:
    t, h, w = item.grid_thw
    if h % MERGE_SIZE or w % MERGE_SIZE or h < MERGE_SIZE or w < MERGE_SIZE:
        raise MediaGridError(f"grid {item.grid_thw} is not a positive multiple of {MERGE_SIZE}")
    if isinstance(item, ProcessedImage) and t != 1:
        raise MediaGridError(f"image grid must have t=1, got {item.grid_thw}")
    if isinstance(item, VideoChunk) and not 1 <= t <= 4:
        raise MediaGridError(f"video chunk grid must have 1 <= t <= 4, got {item.grid_thw}")
    return item.num_tokens


class TokenBuilder:
    """Accumulates one document's tokens, targets, placeholder spans and items (the pieces every
    family's template is made of; ``ids`` needs ``all_ids``)."""

    def __init__(self, tokenizer: TextEncoder, ids: MediaTokenIds, markers_loss: bool) -> None:
        self.tokenizer = tokenizer
        self.ids = ids
        self.markers_loss = markers_loss
        self.tokens: list[int] = []
        self.targets: list[bool] = []
        self.spans: list[PlaceholderSpan] = []
        self.items: list[ProcessedImage | VideoChunk] = []

    def text(self, text: str, loss: bool, special: bool = False) -> None:
        ids = list(self.tokenizer.encode_with_special(text) if special
                   else self.tokenizer.encode(text))
        bad = self.ids.all_ids.intersection(ids)
        if bad:
            # Web text containing "<|media_pad|>" must never become a placeholder: the ViT
            # features would no longer line up with the placeholders.
            raise BadSampleError(
                f"text tokenised to media special ids {sorted(bad)}; the tokenizer's encode() "
                "must treat special-token strings as plain text",
                reason=SkipReason.PLACEHOLDER_IN_TEXT,
            )
        self.tokens.extend(ids)
        self.targets.extend([loss] * len(ids))

    def special(self, token_id: int, loss: bool | None = None) -> None:
        self.tokens.append(token_id)
        self.targets.append(self.markers_loss if loss is None else loss)

    def placeholders(self, token_id: int, item: ProcessedImage | VideoChunk, num: int,
                     is_video: bool) -> None:
        """``num`` placeholders of ``item`` (never targets), recorded as its span."""
        self.spans.append(PlaceholderSpan(len(self.tokens), num, len(self.items), is_video))
        self.items.append(item)
        self.tokens.extend([token_id] * num)
        self.targets.extend([False] * num)

    def media(self, item: ProcessedImage | VideoChunk) -> None:
        """One item in Kimi K2.5's template."""
        num = _check_grid(item)
        is_video = isinstance(item, VideoChunk)
        if is_video:
            self.text(format_timestamp(item.timestamp), self.markers_loss)
        self.special(self.ids.media_begin)
        self.text(VIDEO_WORD if is_video else IMAGE_WORD, self.markers_loss)
        self.special(self.ids.media_content)
        placeholder = self.ids.video_placeholder if is_video else self.ids.image_placeholder
        self.placeholders(placeholder, item, num, is_video)
        self.special(self.ids.media_end)

    def sample(self) -> TokenizedSample:
        """The document built so far.

        Raises:
            BadSampleError: No tokens (``empty_text``).
        """
        if not self.tokens:
            raise BadSampleError("sample has no tokens", reason=SkipReason.EMPTY_TEXT)
        return TokenizedSample(
            tokens=np.asarray(self.tokens, dtype=np.int64),
            target_mask=np.asarray(self.targets, dtype=bool),
            placeholder_spans=self.spans,
            items=self.items,
        )


def tokenize_interleaved(
    segments: Sequence[Segment],
    tokenizer: TextEncoder,
    media_ids: MediaTokenIds,
    markers_loss: bool = True,
) -> TokenizedSample:
    """Tokenise an interleaved sample with Kimi K2.5's media templates.

    Args:
        segments: In order: ``Text`` (with its loss flag), ``ProcessedImage``, ``VideoChunk``,
            ``ProcessedVideo`` (expands to its chunks) and ``SpecialToken``.
        tokenizer: ``encode(text)`` for plain text (no special-token parsing).
        media_ids: Ids of the media special tokens in this tokenizer.
        markers_loss: Whether the media wrapper tokens (``<|media_begin|>``, ``image``/``video``,
            ``<|media_content|>``, ``<|media_end|>``, timestamps, and ``SpecialToken`` segments
            whose own ``loss`` is None) may be targets. Placeholders never are.

    Returns:
        The tokens, target mask, placeholder spans and media items (in sequence order: item i of
        ``items`` is ``VisionInputs`` item i of this document).

    Raises:
        BadSampleError: Empty result (``empty_text``) or text that encodes to a media special id
            (``placeholder_in_text``).
        MediaGridError: An item whose grid breaks the model contract (``bad_grid``).
    """
    b = TokenBuilder(tokenizer, media_ids, markers_loss)
    for seg in segments:
        if isinstance(seg, Text):
            b.text(seg.text, seg.loss, seg.special)
        elif isinstance(seg, ProcessedVideo):
            for chunk in seg.chunks:
                b.media(chunk)
        elif isinstance(seg, (ProcessedImage, VideoChunk)):
            b.media(seg)
        elif isinstance(seg, SpecialToken):
            token_id = getattr(media_ids, seg.name, None)
            if token_id is None:
                raise ValueError(f"tokenizer has no id for special token {seg.name!r}")
            b.special(token_id, seg.loss)
        else:
            raise TypeError(f"unsupported segment type {type(seg).__name__}")
    return b.sample()


def render_text(segments: Sequence[Segment]) -> str:
    """The same sample as one string with special-token strings, as HF's processor writes it
    after expanding placeholders (for inspection and for tokenizers that parse special tokens)."""
    out: list[str] = []
    for seg in segments:
        if isinstance(seg, Text):
            out.append(seg.text)
        elif isinstance(seg, SpecialToken):
            out.append(SPECIAL_TOKEN_STRINGS[seg.name])
        else:
            chunks = seg.chunks if isinstance(seg, ProcessedVideo) else [seg]
            for item in chunks:
                num = _check_grid(item)
                if isinstance(item, VideoChunk):
                    out.append(
                        f"{format_timestamp(item.timestamp)}{MEDIA_BEGIN}{VIDEO_WORD}"
                        f"{MEDIA_CONTENT}{VIDEO_PLACEHOLDER * num}{MEDIA_END}"
                    )
                else:
                    out.append(
                        f"{MEDIA_BEGIN}{IMAGE_WORD}{MEDIA_CONTENT}"
                        f"{IMAGE_PLACEHOLDER * num}{MEDIA_END}"
                    )
    return "".join(out)
