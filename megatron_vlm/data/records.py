"""Raw input records -> canonical samples (the record shapes ``prepare_data`` accepts).

Input records come from ``sources.iter_input`` (the project's ``.jsonl``, and the ecosystem's
formats read in place). A media value is one of:

- a path string, relative to ``media_root`` or absolute;
- ``{"bytes": b"...", "path": "name.jpg"}``: bytes held inside the input (a tar member, a parquet
  cell); ``path`` gives the type by its extension (sniffed from the bytes when it has none) and is
  the name reject logs show (``<file>:<key>``);
- ``{"path": "clip.mp4", "clip": [start_s, end_s]}``: a span of a video (Panda-70M), cut at decode
  time and never re-encoded. The sample stores only the packets that decode the span, stream-copied
  (``video_remux.cut_clip``: from the keyframe at or before the span through the end of the GOP of
  its last frame, timestamps rebased to 0, same container), and the canonical meta's ``"clip"`` is
  the span INSIDE that segment: ``[start_s - seg_start, end_s - seg_start]``, where ``seg_start``
  is the time of the segment's first frame. So frame timestamps (``index / fps``, printed in
  prompts) count from the segment's first frame, not from the source video's start. The whole file
  is stored with the clip unchanged when the remux is impossible (no keyframe index, broken
  timestamps, a container other than mp4/mov/mkv/webm, a muxer error) or the span's GOPs cover
  the whole file.

Record shapes:

- plain text:    ``{"id": ..., "text": "..."}``
- captioned:     ``{"id": ..., "image" | "images" | "video" | "videos": media value(s),
  "caption": "..."}``
- LLaVA-style:   ``{"id": ..., "image" | "video": path(s), "conversations": [{"from": "human",
  "value": "<image>\\nq"}, {"from": "gpt", "value": "a"}, ...]}``; each ``<image>`` / ``<video>``
  tag places the next media item (untagged media go before the first turn). Turns are stored
  role-tagged (a ``{"turn": "user" | "assistant"}`` segment opens each), not rendered: the model
  family's chat template writes them at encode time (``chat_turns.py``). Human turns are prompt
  spans (no loss); answers are trained on.
- interleaved:   ``{"id": ..., "segments": [{"text": ...}, {"image": path}, {"video": path}, ...]}``
  (``{"type": "image" | "video", "path": ..., "clip": [start_s, end_s]}`` is accepted too).

Every record becomes one ``CanonicalSample``: text segments with loss flags and its media bytes in
order (``shards.py`` writes it as tar members).
"""

from __future__ import annotations

import json
import math
import os
import re
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megatron_vlm.data.media_checks import check_media as run_media_check
from megatron_vlm.data.media_checks import check_mode
from megatron_vlm.data.media_errors import (
    BadSampleError,
    MediaDecodeError,
    MediaMissingError,
    SkipReason,
)
from megatron_vlm.data.templates import MEDIA_SPECIAL_TOKENS
from megatron_vlm.data.video import VideoSource
from megatron_vlm.data.video_remux import PacketIndex, cut_clip, packet_index

FORMAT = "megatron_vlm.mm/1"
"""Version tag of the canonical sample format and of ``mm_dataset.json``."""
IMAGE_EXTS = {"jpg": "jpg", "jpeg": "jpg", "png": "png", "webp": "webp", "bmp": "bmp",
              "gif": "gif"}
VIDEO_EXTS = {"mp4": "mp4", "mkv": "mkv", "webm": "webm", "avi": "avi", "mov": "mov"}
MEDIA_TAGS = {"<image>": "image", "<video>": "video"}
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
    clip: tuple[float, float] | None = None
    """``(start_s, end_s)`` of a video span to decode (Panda-70M), in the times of ``data``: a
    clip segment's own (its first frame at 0 s), or the source's when it is stored whole; None:
    the whole video."""


@dataclass
class CanonicalSample:
    """One record, normalised: text segments with loss flags and media in order."""

    id: str
    kind: str
    """``text`` | ``caption`` | ``conversation`` | ``interleaved``."""
    segments: list[dict[str, Any]]
    """``{"text": str, "loss": bool}``, ``{"media": index into media}`` or a turn marker
    ``{"turn": role}`` (conversations), in sequence order."""
    media: list[MediaItem] = field(default_factory=list)

    def to_members(self, key: str) -> dict[str, bytes]:
        """Tar members of this sample (name -> bytes)."""
        meta = {
            "format": FORMAT,
            "id": self.id,
            "kind": self.kind,
            "segments": self.segments,
            "media": [_media_meta(m) for m in self.media],
        }
        members = {f"{key}.json": json.dumps(meta, ensure_ascii=False).encode()}
        for i, m in enumerate(self.media):
            members[f"{key}.m{i}.{m.ext}"] = m.data
        return members


def _media_meta(m: MediaItem) -> dict[str, Any]:
    meta: dict[str, Any] = {"type": m.type, "ext": m.ext}
    if m.clip is not None:
        meta["clip"] = [float(m.clip[0]), float(m.clip[1])]
    return meta


_MAGIC = (  # (offset, bytes, ext) for media bytes whose name has no extension
    (0, b"\xff\xd8\xff", "jpg"), (0, b"\x89PNG", "png"), (8, b"WEBP", "webp"),
    (0, b"GIF8", "gif"), (0, b"BM", "bmp"), (4, b"ftyp", "mp4"), (0, b"\x1aE\xdf\xa3", "mkv"),
)


def _media_type(name: str, data: bytes | None = None) -> tuple[str, str]:
    ext = Path(name).suffix.lower().lstrip(".")
    if ext not in IMAGE_EXTS and ext not in VIDEO_EXTS and data is not None:
        ext = next((e for off, magic, e in _MAGIC if data[off:off + len(magic)] == magic), ext)
    if ext in IMAGE_EXTS:
        return "image", IMAGE_EXTS[ext]
    if ext in VIDEO_EXTS:
        return "video", VIDEO_EXTS[ext]
    raise BadSampleError(f"unknown media type of {name!r} (extension {ext!r})",
                         reason=BAD_RECORD, media=name)


_ANON_SOURCE = re.compile(r"<_io\.BytesIO object at 0x[0-9a-fA-F]+>|<\d+ bytes>")


def _check_decodes(kind: str, data: VideoSource, name: str, mode: str) -> float | None:
    """Check now (``media_checks``: a broken file is rejected here, not skipped at every
    epoch); a video's duration in seconds (None if unknown). Errors name ``name``, never
    anonymous bytes."""
    try:
        return run_media_check(kind, data, mode)
    except BadSampleError as exc:
        message = _ANON_SOURCE.sub(name, str(exc))
        if name not in message:
            message = f"{name}: {message}"
        raise type(exc)(message, reason=exc.reason, media=name) from None


_CHECKED_FILES: OrderedDict[tuple, float | None] = OrderedDict()
"""(path, size, mtime_ns, mode) -> duration of the last files that passed: a Panda-70M video
with many spans (one record each) is checked once, not once per span."""
_PACKET_INDEXES: OrderedDict[tuple[str, int, int], PacketIndex | None] = OrderedDict()
"""(path, size, mtime_ns) -> packet index of the last videos cut into clip segments (one demux
per file however many spans)."""


def _file_key(full: Path) -> tuple[str, int, int]:
    stat = full.stat()
    return str(full), stat.st_size, stat.st_mtime_ns


def _cached(cache: OrderedDict, key: tuple, compute: Any) -> Any:
    if key not in cache:
        cache[key] = compute()
        if len(cache) > 16:
            cache.popitem(last=False)
    return cache[key]


def _check_file(kind: str, data: bytes | None, name: str, full: Path,
                mode: str) -> float | None:
    """``_check_decodes`` of a file, once per (path, size, mtime, mode); ``data`` None: check
    the file by its path (a clip's source, whose bytes are not read unless stored whole)."""
    return _cached(_CHECKED_FILES, (*_file_key(full), mode),
                   lambda: _check_decodes(kind, full if data is None else data, name, mode))


def _cut_clip(data: bytes | None, full: Path | None, ext: str,
              clip: tuple[float, float]) -> tuple[bytes, tuple[float, float]]:
    """(bytes to store, clip inside them): the span's stream-copied segment, or the whole
    source with the clip unchanged (see the module docstring)."""
    if full is None:
        cut = cut_clip(data, ext, clip)
    else:
        index = _cached(_PACKET_INDEXES, _file_key(full), lambda: packet_index(full))
        cut = cut_clip(full, ext, clip, index) if index is not None else None
    if cut is not None:
        return cut
    return (full.read_bytes() if data is None else data), clip


def _parse_clip(clip: Any, name: str) -> tuple[float, float]:
    ok = isinstance(clip, (list, tuple)) and len(clip) == 2 and all(
        isinstance(t, (int, float)) and not isinstance(t, bool) and math.isfinite(t)
        for t in clip)
    if not ok or not 0 <= clip[0] < clip[1]:
        raise BadSampleError(f"clip of {name} must be [start_s, end_s] with 0 <= start < end, "
                             f"got {clip!r}", reason=BAD_RECORD, media=name)
    return float(clip[0]), float(clip[1])


def _read_media(value: Any, media_root: Path) -> tuple[str, bytes | None, Path | None, Any]:
    """(name for logs, bytes held in the record or None, file to read or None, clip or None)."""
    if isinstance(value, dict) and value.get("bytes") is not None:
        name = value.get("path") or "<bytes>"
        if not isinstance(value["bytes"], (bytes, bytearray)) or not isinstance(name, str):
            raise BadSampleError(f"media {{'bytes', 'path'}} needs bytes and a string path, "
                                 f"got {type(value['bytes']).__name__}, {name!r}",
                                 reason=BAD_RECORD, media=str(name))
        return name, bytes(value["bytes"]), None, value.get("clip")
    clip = None
    if isinstance(value, dict):
        value, clip = value.get("path"), value.get("clip")
    if not isinstance(value, str) or not value:
        raise BadSampleError(f"media must be a path, {{'bytes', 'path'}} or {{'path', 'clip'}}, "
                             f"got {value!r:.80}", reason=BAD_RECORD)
    full = Path(value) if os.path.isabs(value) else media_root / value
    return str(full), None, full, clip


def _load_media(value: Any, expected: str | None, media_root: Path, check: str) -> MediaItem:
    name, data, full, clip = _read_media(value, media_root)
    kind, ext = _media_type(name, data)
    if expected is not None and kind != expected:
        raise BadSampleError(f"{name} is not a {expected}", reason=BAD_RECORD, media=name)
    if clip is not None:
        if kind != "video":
            raise BadSampleError(f"clip given for {name}, which is not a video",
                                 reason=BAD_RECORD, media=name)
        clip = _parse_clip(clip, name)
    if full is not None:
        if not full.is_file():
            raise MediaMissingError(f"{kind} file not found: {full}", media=name)
        if clip is None:
            data = full.read_bytes()
    if check != "none":
        duration = (_check_decodes(kind, data, name, check) if full is None
                    else _check_file(kind, data, name, full, check))
        if clip is not None and duration is not None and clip[0] >= duration:
            raise MediaDecodeError(f"clip {list(clip)} of {name} starts after the video ends "
                                   f"({duration:.3f} s)", reason=SkipReason.VIDEO_EMPTY,
                                   media=name)
    if clip is not None:
        data, clip = _cut_clip(data, full, ext, clip)
    return MediaItem(kind, data, ext, clip)


def check_text(text: Any, what: str = "text") -> str:
    """``text`` if it is a string without media special tokens, else the reason it is not.

    Raises:
        BadSampleError: Not a string (``bad_record``), or a media special token inside
            (``placeholder_in_text``); ``what`` names the field in the message.
    """
    if not isinstance(text, str):
        raise BadSampleError(f"{what} must be a string, got {type(text).__name__}",
                             reason=BAD_RECORD)
    for token in MEDIA_SPECIAL_TOKENS:
        if token in text:
            raise BadSampleError(f"{what} contains the media special token {token}",
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
        value = check_text(turn["value"])
        if role in ("human", "user"):
            segments.append({"turn": "user"})
            for piece in tag_re.split(value):
                if piece in MEDIA_TAGS:
                    if next_media >= num_media:
                        raise BadSampleError("more media tags than media", reason=BAD_RECORD)
                    segments.append({"media": next_media})
                    next_media += 1
                elif piece:
                    segments.append({"text": piece, "loss": False})
        elif role in ("gpt", "assistant"):
            segments.append({"turn": "assistant"})
            segments.append({"text": value, "loss": True})
        else:
            raise BadSampleError(f"unknown conversation role {role!r}", reason=BAD_RECORD)
    if next_media != num_media:
        raise BadSampleError(f"{num_media} media but {next_media} tags", reason=BAD_RECORD)
    return segments


def normalize_record(obj: Any, media_root: Path,
                     check_media: bool | str = True) -> CanonicalSample:
    """One raw record -> ``CanonicalSample`` (see the module docstring for record shapes).

    ``check_media``: ``media_checks`` mode (``structure``, ``full`` or ``none``; True is
    ``structure``, False ``none``).

    Raises:
        BadSampleError: With the reason the record is rejected.
    """
    if not isinstance(obj, dict):
        raise BadSampleError("record is not a JSON object", reason=BAD_RECORD)
    rid = obj.get("id")
    if not isinstance(rid, (str, int)) or str(rid) == "":
        raise BadSampleError("record has no 'id'", reason=BAD_RECORD)
    rid = str(rid)
    check_media = check_mode(check_media)
    media: list[MediaItem] = []
    if "segments" in obj or "content" in obj:
        kind, segments = "interleaved", []
        for seg in _as_list(obj.get("segments", obj.get("content"))):
            if not isinstance(seg, dict):
                raise BadSampleError("segments must be objects", reason=BAD_RECORD)
            seg_type = seg.get("type") or next((k for k in ("text", "image", "video")
                                                if k in seg), None)
            if seg_type == "text":
                segments.append({"text": check_text(seg.get("text")),
                                 "loss": bool(seg.get("loss", True))})
            elif seg_type in ("image", "video"):
                path = seg.get(seg_type, seg.get("path"))
                if isinstance(path, str) and "clip" in seg:
                    path = {"path": path, "clip": seg["clip"]}
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
        caption = check_text(obj.get("caption", obj.get("text")))
        segments = [{"media": i} for i in range(len(media))]
        segments.append({"text": caption, "loss": True})
    elif "text" in obj:
        kind, segments = "text", [{"text": check_text(obj["text"]), "loss": True}]
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
