"""Raw input records -> canonical samples (the record shapes ``prepare_data`` accepts).

Input records (one JSON object per line of a ``.jsonl`` file; a ``.txt`` file is one plain-text
document per line). Media paths are relative to ``media_root`` (or absolute):

- plain text:    ``{"id": ..., "text": "..."}``
- captioned:     ``{"id": ..., "image" | "images" | "video" | "videos": path(s), "caption": "..."}``
- LLaVA-style:   ``{"id": ..., "image" | "video": path(s), "conversations": [{"from": "human",
  "value": "<image>\\nq"}, {"from": "gpt", "value": "a"}, ...]}``; each ``<image>`` / ``<video>``
  tag places the next media item (untagged media go before the first turn). Human turns and the
  ``assistant:`` prefixes are prompt spans (no loss); answers are trained on.
- interleaved:   ``{"id": ..., "segments": [{"text": ...}, {"image": path}, {"video": path}, ...]}``
  (``{"type": "image", "path": ...}`` is accepted too).

Every record becomes one ``CanonicalSample``: text segments with loss flags and its media bytes in
order (``shards.py`` writes it as tar members).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megatron_vlm.data.image import decode_image
from megatron_vlm.data.media_errors import BadSampleError, MediaMissingError, SkipReason
from megatron_vlm.data.templates import MEDIA_SPECIAL_TOKENS
from megatron_vlm.data.video import decode_video

FORMAT = "megatron_vlm.mm/1"
"""Version tag of the canonical sample format and of ``mm_dataset.json``."""
IMAGE_EXTS = {"jpg": "jpg", "jpeg": "jpg", "png": "png", "webp": "webp", "bmp": "bmp",
              "gif": "gif"}
VIDEO_EXTS = {"mp4": "mp4", "mkv": "mkv", "webm": "webm", "avi": "avi", "mov": "mov"}
MEDIA_TAGS = {"<image>": "image", "<video>": "video"}
USER_PREFIX = "user: "
ASSISTANT_PREFIX = "assistant: "
BAD_RECORD = "bad_record"
"""Skip reason: malformed JSON or a record of no known shape."""
DUPLICATE_ID = "duplicate_id"
"""Skip reason: a record id seen before in this dataset."""


@dataclass
class MediaItem:
    type: str
    """``image`` or ``video``."""
    data: bytes
    ext: str


@dataclass
class CanonicalSample:
    """One record, normalised: text segments with loss flags and media in order."""

    id: str
    kind: str
    """``text`` | ``caption`` | ``conversation`` | ``interleaved``."""
    segments: list[dict[str, Any]]
    """``{"text": str, "loss": bool}`` or ``{"media": index into media}``, in sequence order."""
    media: list[MediaItem] = field(default_factory=list)

    def to_members(self, key: str) -> dict[str, bytes]:
        """Tar members of this sample (name -> bytes)."""
        meta = {
            "format": FORMAT,
            "id": self.id,
            "kind": self.kind,
            "segments": self.segments,
            "media": [{"type": m.type, "ext": m.ext} for m in self.media],
        }
        members = {f"{key}.json": json.dumps(meta, ensure_ascii=False).encode()}
        for i, m in enumerate(self.media):
            members[f"{key}.m{i}.{m.ext}"] = m.data
        return members


def _media_type(path: str) -> tuple[str, str]:
    ext = Path(path).suffix.lower().lstrip(".")
    if ext in IMAGE_EXTS:
        return "image", IMAGE_EXTS[ext]
    if ext in VIDEO_EXTS:
        return "video", VIDEO_EXTS[ext]
    raise BadSampleError(f"unknown media extension in {path!r}", reason=BAD_RECORD)


def _load_media(path: Any, expected: str | None, media_root: Path, check: bool) -> MediaItem:
    if not isinstance(path, str) or not path:
        raise BadSampleError(f"media path must be a non-empty string, got {path!r}",
                             reason=BAD_RECORD)
    kind, ext = _media_type(path)
    if expected is not None and kind != expected:
        raise BadSampleError(f"{path!r} is not a {expected}", reason=BAD_RECORD)
    full = Path(path) if os.path.isabs(path) else media_root / path
    if not full.is_file():
        raise MediaMissingError(f"{kind} file not found: {full}")
    data = full.read_bytes()
    if check:  # decode now: a corrupt file is rejected here, not skipped at every epoch
        if kind == "image":
            decode_image(data)
        else:
            decode_video(data)
    return MediaItem(kind, data, ext)


def _check_text(text: Any) -> str:
    if not isinstance(text, str):
        raise BadSampleError(f"text must be a string, got {type(text).__name__}",
                             reason=BAD_RECORD)
    for token in MEDIA_SPECIAL_TOKENS:
        if token in text:
            raise BadSampleError(f"text contains the media special token {token}",
                                 reason=SkipReason.PLACEHOLDER_IN_TEXT)
    return text


def _as_list(value: Any) -> list:
    return value if isinstance(value, list) else [value]


def _record_media(obj: dict) -> list[tuple[str, str]]:
    """(path, type) of a caption/conversation record's media: images first, then videos."""
    out = []
    for key, kind in (("image", "image"), ("images", "image"), ("video", "video"),
                      ("videos", "video")):
        if key in obj and obj[key] is not None:
            out += [(p, kind) for p in _as_list(obj[key])]
    return out


def _conversation_segments(turns: Any, num_media: int) -> list[dict]:
    if not isinstance(turns, list) or not turns:
        raise BadSampleError("conversations must be a non-empty list", reason=BAD_RECORD)
    tag_re = re.compile("(" + "|".join(re.escape(t) for t in MEDIA_TAGS) + ")")
    segments: list[dict] = []
    next_media = 0
    tagged = any(isinstance(t, dict) and tag_re.search(str(t.get("value", ""))) for t in turns)
    if not tagged:
        segments += [{"media": i} for i in range(num_media)]
        next_media = num_media
    for turn in turns:
        if not isinstance(turn, dict) or "value" not in turn:
            raise BadSampleError("each turn needs 'from' and 'value'", reason=BAD_RECORD)
        role = str(turn.get("from", "")).lower()
        value = _check_text(turn["value"])
        if role in ("human", "user"):
            segments.append({"text": USER_PREFIX, "loss": False})
            for piece in tag_re.split(value):
                if piece in MEDIA_TAGS:
                    if next_media >= num_media:
                        raise BadSampleError("more media tags than media", reason=BAD_RECORD)
                    segments.append({"media": next_media})
                    next_media += 1
                elif piece:
                    segments.append({"text": piece, "loss": False})
            segments.append({"text": "\n", "loss": False})
        elif role in ("gpt", "assistant"):
            segments.append({"text": ASSISTANT_PREFIX, "loss": False})
            segments.append({"text": value + "\n", "loss": True})
        else:
            raise BadSampleError(f"unknown conversation role {role!r}", reason=BAD_RECORD)
    if next_media != num_media:
        raise BadSampleError(f"{num_media} media but {next_media} tags", reason=BAD_RECORD)
    return segments


def normalize_record(obj: Any, media_root: Path, check_media: bool = True) -> CanonicalSample:
    """One raw record -> ``CanonicalSample`` (see the module docstring for record shapes).

    Raises:
        BadSampleError: With the reason the record is rejected.
    """
    if not isinstance(obj, dict):
        raise BadSampleError("record is not a JSON object", reason=BAD_RECORD)
    rid = obj.get("id")
    if not isinstance(rid, (str, int)) or str(rid) == "":
        raise BadSampleError("record has no 'id'", reason=BAD_RECORD)
    rid = str(rid)
    media: list[MediaItem] = []
    if "segments" in obj or "content" in obj:
        kind, segments = "interleaved", []
        for seg in _as_list(obj.get("segments", obj.get("content"))):
            if not isinstance(seg, dict):
                raise BadSampleError("segments must be objects", reason=BAD_RECORD)
            seg_type = seg.get("type") or next((k for k in ("text", "image", "video")
                                                if k in seg), None)
            if seg_type == "text":
                segments.append({"text": _check_text(seg.get("text")),
                                 "loss": bool(seg.get("loss", True))})
            elif seg_type in ("image", "video"):
                path = seg.get(seg_type, seg.get("path"))
                media.append(_load_media(path, seg_type, media_root, check_media))
                segments.append({"media": len(media) - 1})
            else:
                raise BadSampleError(f"unknown segment {seg!r:.80}", reason=BAD_RECORD)
    elif "conversations" in obj:
        kind = "conversation"
        media = [_load_media(p, t, media_root, check_media) for p, t in _record_media(obj)]
        segments = _conversation_segments(obj["conversations"], len(media))
    elif _record_media(obj):
        kind = "caption"
        media = [_load_media(p, t, media_root, check_media) for p, t in _record_media(obj)]
        caption = _check_text(obj.get("caption", obj.get("text")))
        segments = [{"media": i} for i in range(len(media))]
        segments.append({"text": caption, "loss": True})
    elif "text" in obj:
        kind, segments = "text", [{"text": _check_text(obj["text"]), "loss": True}]
    else:
        raise BadSampleError("record has none of text/caption/conversations/segments",
                             reason=BAD_RECORD)
    if not any(s.get("text", "").strip() for s in segments if "text" in s) and not media:
        raise BadSampleError("record has no text and no media", reason=SkipReason.EMPTY_TEXT)
    return CanonicalSample(rid, kind, segments, media)


def read_records(path: Path) -> Iterator[tuple[str, Any]]:
    """(where, record or BadSampleError) for every record of an input (``sources.iter_input``)."""
    from megatron_vlm.data.sources import iter_input

    for where, load in iter_input(Path(path)):
        try:
            yield where, load()
        except BadSampleError as exc:
            yield where, exc
