"""Input readers: the files teams already hold -> ``(where, load)`` per record, read in place.

``iter_input(path, media_root)`` yields one ``(where, load)`` pair per input record in a
deterministic order. ``where`` is the input file as given plus a locator; ``load()`` returns the
record dict in the shapes ``records.normalize_record`` accepts, or raises ``BadSampleError`` for
a malformed record. Media bytes held inside the input (tar members, parquet cells) are read in
``load()``, so a caller that skips records (sliced preparation) does not pay for them. Nothing is
unpacked or copied: tars and parquet files are read where they are.

Formats (``where`` in brackets):

- ``.jsonl``: one record per line, the project's schema (``records.py``) [``data.jsonl:12``].
- ``.txt``: one plain-text document per non-empty line, id ``<stem>_<line>`` [``docs.txt:3``].
- ``.json`` list (LLaVA-Pretrain, ShareGPT4V: ``{"id", "image", "conversations"}`` items with
  ``<image>`` tags; any list of ``records.py`` records) [``chat.json:item 7``].
- WebDataset ``.tar`` shards as img2dataset writes them (``KEY.jpg|png|webp`` + ``KEY.txt`` +
  ``KEY.json``; videos ``KEY.mp4`` too): one ``.tar`` or a folder of them (searched recursively,
  hidden folders such as ``.nv-meta`` skipped; the ``.parquet``/``_stats.json`` beside are not
  needed). Record id = the key; caption = ``KEY.txt`` (else the json's ``caption``); a key without
  a media member is rejected ``missing_file`` with img2dataset's ``status``/``error_message``
  [``00000.tar:000000031``]; media name ``00000.tar:000000031.jpg``.
- WebVid CSV (``videoid,contentUrl,duration,page_dir,name``): caption = ``name``; the video is
  ``contentUrl`` when it is a local path (relative to ``media_root``), else the first file that
  exists of ``<media_root>/<page_dir>/<videoid>.mp4`` and ``<media_root>/<videoid>.mp4``
  (the layout of common WebVid downloaders); a row with only a URL is rejected ``missing_file``
  [``webvid.csv:5``, the CSV line].
- Panda-70M CSV (``videoID,url,timestamp,caption``; ``timestamp`` a list of
  ``["H:MM:SS.mmm", "H:MM:SS.mmm"]`` spans, ``caption`` one caption per span): one record per span,
  id ``<videoID>_<span>``, media ``{"path": <media_root>/<videoID>.mp4, "clip": [start_s, end_s]}``
  (the full video downloaded once, cut at decode time) [``panda.csv:9 span 2``].
- Parquet with image bytes as HF ``datasets`` exports them: captioning rows (an Image column,
  ``image: {bytes, path}``, plus a ``caption``/``text`` column) or interleaved rows (``images:
  list[{bytes, path} | null]`` aligned with ``texts: list[str | null]``). Image columns are found
  from the HF features metadata (schema key ``huggingface``) or by name. Id = an ``id``/``key``
  column, else ``<stem>_<row>``. Rows whose images carry only a URL are rejected ``missing_file``;
  files with URL columns and no image bytes are refused [``data.parquet:row 7``]; media name
  ``data.parquet:row 7:<image path>``.

``media_root`` defaults to the input file's directory (a folder input: the folder). Anything else
(a folder without ``.tar`` shards, a binary file, a JSON/CSV/parquet of unknown schema) raises a
one-line ``ValueError`` naming the accepted formats.
"""

from __future__ import annotations

import ast
import csv
import json
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from megatron_vlm.data.media_errors import BadSampleError, MediaMissingError
from megatron_vlm.data.records import BAD_RECORD, IMAGE_EXTS, VIDEO_EXTS
from megatron_vlm.data.tar_index import index_tar

ACCEPTED = (".jsonl records, .txt documents, a LLaVA/ShareGPT4V .json list, WebDataset .tar "
            "shards (a .tar or a folder of them, as img2dataset writes), a WebVid or Panda-70M "
            ".csv, an HF datasets .parquet with image bytes")
"""The formats ``iter_input`` reads, for error messages."""
RECORD_KEYS = {"conversations", "text", "caption", "segments", "content", "image", "images",
               "video", "videos"}
"""Keys of which a ``.json`` list's items must have one (``records.py`` shapes)."""
TEXT_COLUMNS = ("caption", "text", "txt", "sentence")
"""Parquet caption columns, first present wins."""
URL_COLUMNS = {"url", "image_url", "img_url", "contenturl", "urls", "image_urls"}

Record = tuple[str, Callable[[], Any]]


def unknown_input(path: Path, why: str) -> ValueError:
    """The one-line error for an input of no known format."""
    return ValueError(f"{path}: {why}; accepted inputs: {ACCEPTED}")


def _fail(exc: BadSampleError) -> Callable[[], Any]:
    def load() -> Any:
        raise exc

    return load


def _decode_utf8(data: bytes, what: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise BadSampleError(f"{what} is not UTF-8: {exc}", reason=BAD_RECORD) from None


# ------------------------------------------------------------------------------- text formats


def _jsonl_load(line: bytes) -> Callable[[], Any]:
    def load() -> Any:
        try:
            return json.loads(_decode_utf8(line, "line"))
        except json.JSONDecodeError as exc:
            raise BadSampleError(f"malformed JSON: {exc}", reason=BAD_RECORD) from None

    return load


def iter_jsonl(path: Path) -> Iterator[Record]:
    """Records of a ``.jsonl`` file, one per non-empty line."""
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                yield f"{path}:{lineno}", _jsonl_load(line)


def _txt_load(path: Path, lineno: int, line: bytes) -> Callable[[], Any]:
    def load() -> Any:
        return {"id": f"{path.stem}_{lineno}", "text": _decode_utf8(line, "line").rstrip("\r\n")}

    return load


def iter_txt(path: Path) -> Iterator[Record]:
    """Plain-text documents of a ``.txt`` file, one per non-empty line (id ``<stem>_<line>``)."""
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                yield f"{path}:{lineno}", _txt_load(path, lineno, line)


def iter_json_list(path: Path) -> Iterator[Record]:
    """Items of a JSON list (LLaVA-Pretrain / ShareGPT4V), each a ``records.py`` record."""
    try:
        items = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise unknown_input(path, f"not a JSON document ({exc}; one record per line: name it "
                                  ".jsonl)") from None
    first = items[0] if isinstance(items, list) and items else None
    if not isinstance(first, dict) or not RECORD_KEYS & set(first):
        got = type(items).__name__ if first is None else f"items with keys {sorted(first)[:8]}"
        raise unknown_input(path, f"a JSON {got}, not a list of records with one of "
                                  f"{sorted(RECORD_KEYS)}")
    return ((f"{path}:item {i}", (lambda item=item: item)) for i, item in enumerate(items))


# ---------------------------------------------------------------------------------- video CSVs


def _is_url(value: str) -> bool:
    return bool(re.match(r"^[a-zA-Z][a-zA-Z0-9+.-]*://", value))


def _webvid_load(row: dict[str, str], root: Path) -> Callable[[], Any]:
    def load() -> Any:
        vid, url, name = row.get("videoid", ""), row.get("contenturl", ""), row.get("name")
        if not vid or name is None:
            raise BadSampleError("WebVid row needs videoid and name", reason=BAD_RECORD)
        tried = [] if not url or _is_url(url) else [root / url]
        tried += [root / row.get("page_dir", "") / f"{vid}.mp4", root / f"{vid}.mp4"]
        found = next((p for p in tried if p.is_file()), None)
        if found is None:
            only_url = f" (URL-only rows are out of scope: download {url} first)" if url else ""
            raise MediaMissingError(f"video of {vid} not found; tried "
                                    f"{', '.join(map(str, tried))}{only_url}",
                                    media=str(tried[0]))
        return {"id": vid, "video": str(found), "caption": name}

    return load


_TIME = re.compile(r"^\s*(\d+):(\d{1,2}):(\d{1,2}(?:\.\d*)?)\s*$")


def _seconds(stamp: Any) -> float:
    match = _TIME.match(stamp) if isinstance(stamp, str) else None
    if match is None:
        raise BadSampleError(f"timestamp {stamp!r} is not H:MM:SS.mmm", reason=BAD_RECORD)
    h, m, s = match.groups()
    return int(h) * 3600 + int(m) * 60 + float(s)


def _literal_list(text: str, column: str) -> list:
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = None
    if not isinstance(value, (list, tuple)):
        raise BadSampleError(f"{column} {text[:80]!r} is not a list", reason=BAD_RECORD)
    return list(value)


def _panda_spans(row: dict[str, str], root: Path) -> list[Callable[[], Any]]:
    """One load per span of a Panda-70M row (raises BadSampleError for a malformed row)."""
    vid = row.get("videoid", "")
    if not vid:
        raise BadSampleError("Panda-70M row has no videoID", reason=BAD_RECORD)
    spans = _literal_list(row.get("timestamp", ""), "timestamp")
    caption_text = row.get("caption", "")
    captions = (_literal_list(caption_text, "caption") if caption_text.lstrip().startswith("[")
                else [caption_text])
    if len(captions) != len(spans):
        raise BadSampleError(f"{len(spans)} timestamp spans but {len(captions)} captions",
                             reason=BAD_RECORD)
    video = str(root / f"{vid}.mp4")

    def span_load(j: int) -> Callable[[], Any]:
        def load() -> Any:
            span = spans[j]
            if not isinstance(span, (list, tuple)) or len(span) != 2:
                raise BadSampleError(f"span {span!r} is not [start, end]", reason=BAD_RECORD)
            clip = [_seconds(span[0]), _seconds(span[1])]
            return {"id": f"{vid}_{j}", "video": {"path": video, "clip": clip},
                    "caption": captions[j]}

        return load

    return [span_load(j) for j in range(len(spans))]


def iter_csv(path: Path, root: Path) -> Iterator[Record]:
    """Rows of a WebVid CSV, or spans of a Panda-70M CSV (told apart by the header)."""
    try:
        with open(path, encoding="utf-8", newline="") as f:
            header = [h.strip().lower() for h in next(csv.reader(f), [])]
    except (UnicodeDecodeError, csv.Error) as exc:
        why = f"unreadable CSV at its start ({type(exc).__name__}: {exc})"
        raise unknown_input(path, why) from None
    columns = set(header)
    if {"videoid", "timestamp", "caption"} <= columns:
        panda = True
    elif {"videoid", "contenturl", "name"} <= columns:
        panda = False
    else:
        raise unknown_input(path, f"a CSV with columns {header[:8]}, neither WebVid "
                                  "(videoid,contentUrl,name,...) nor Panda-70M "
                                  "(videoID,url,timestamp,caption)")
    return _iter_csv_rows(path, root, header, panda)


def _iter_csv_rows(path: Path, root: Path, header: list[str], panda: bool) -> Iterator[Record]:
    with open(path, encoding="utf-8", newline="") as f:
        reader = csv.reader(f)
        next(reader)
        while True:
            try:
                values = next(reader)
            except StopIteration:
                return
            except (UnicodeDecodeError, csv.Error) as exc:
                raise unknown_input(path, f"unreadable CSV after line {reader.line_num} "
                                          f"({type(exc).__name__}: {exc})") from None
            if not any(v.strip() for v in values):
                continue
            where = f"{path}:{reader.line_num}"
            row = dict(zip(header, values))
            if not panda:
                yield where, _webvid_load(row, root)
                continue
            try:
                loads = _panda_spans(row, root)
            except BadSampleError as exc:
                yield where, _fail(exc)
                continue
            for j, load in enumerate(loads):
                yield f"{where} span {j}", load


# ---------------------------------------------------------------------------- WebDataset tars


def _tar_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.tar") if p.is_file() and not any(
        part.startswith(".") for part in p.relative_to(folder).parts))


def _tar_load(tar: Path, key: str, members: dict[str, tuple[int, int]]) -> Callable[[], Any]:
    def load() -> Any:
        with open(tar, "rb") as f:
            def read(ext: str) -> bytes:
                offset, size = members[ext]
                f.seek(offset)
                data = f.read(size)
                if len(data) != size:
                    raise BadSampleError(f"{tar}:{key}.{ext} is cut short", reason=BAD_RECORD,
                                         media=f"{tar}:{key}.{ext}")
                return data

            meta: dict[str, Any] = {}
            if "json" in members:
                try:
                    meta = json.loads(read("json"))
                except (json.JSONDecodeError, UnicodeDecodeError):
                    meta = {}
            found = {"image": [e for e in members if e in IMAGE_EXTS],
                     "video": [e for e in members if e in VIDEO_EXTS]}
            if not found["image"] and not found["video"]:
                status = (f" (img2dataset status {meta.get('status')!r}: "
                          f"{meta.get('error_message')})" if "status" in meta else "")
                raise MediaMissingError(f"key {key} has no image or video member{status}",
                                        media=f"{tar}:{key}")
            if "txt" in members:
                caption = _decode_utf8(read("txt"), f"{tar}:{key}.txt")
            elif isinstance(meta.get("caption"), str):
                caption = meta["caption"]
            else:
                raise BadSampleError(f"key {key} has no caption ({key}.txt or json 'caption')",
                                     reason=BAD_RECORD)
            record: dict[str, Any] = {"id": key, "caption": caption}
            for kind, exts in found.items():
                if exts:
                    record[kind] = [{"bytes": read(e), "path": f"{tar}:{key}.{e}"} for e in exts]
            return record

    return load


def iter_tars(tars: list[Path]) -> Iterator[Record]:
    """Samples of WebDataset tar shards, in shard order then tar order (read in place)."""
    for tar in tars:
        keys, error = index_tar(tar)
        for key, members in keys.items():
            yield f"{tar}:{key}", _tar_load(tar, key, members)
        if error is not None:
            exc = BadSampleError(f"unreadable tar {tar} after {len(keys)} samples: {error}",
                                 reason=BAD_RECORD, media=str(tar))
            yield f"{tar}:<end>", _fail(exc)


# --------------------------------------------------------------------------- HF parquet files


def _hf_features(schema: Any) -> dict[str, Any]:
    raw = (schema.metadata or {}).get(b"huggingface")
    try:
        return json.loads(raw)["info"]["features"] if raw else {}
    except (ValueError, KeyError, TypeError):
        return {}


def _feature_is_image(feature: Any) -> bool:
    return isinstance(feature, dict) and feature.get("_type") == "Image"


def _feature_is_image_list(feature: Any) -> bool:
    if isinstance(feature, list):  # datasets' [Image()] notation
        return len(feature) == 1 and _feature_is_image(feature[0])
    return (isinstance(feature, dict) and feature.get("_type") in ("Sequence", "List", "LargeList")
            and _feature_is_image(feature.get("feature")))


def _parquet_layout(path: Path, schema: Any) -> dict[str, str | None]:
    """Column roles (image/images/texts/text/id) of an HF parquet file, or ValueError."""
    import pyarrow as pa

    features = _hf_features(schema)
    names = list(schema.names)

    def is_bytes_struct(name: str, listed: bool) -> bool:
        t = schema.field(name).type
        if listed:
            if not (pa.types.is_list(t) or pa.types.is_large_list(t)):
                return False
            t = t.value_type
        return pa.types.is_struct(t) and t.get_field_index("bytes") >= 0

    image = next((n for n in names if _feature_is_image(features.get(n))), None)
    if image is None and "image" in names and is_bytes_struct("image", False):
        image = "image"
    images = next((n for n in names if _feature_is_image_list(features.get(n))), None)
    if images is None and "images" in names and is_bytes_struct("images", True):
        images = "images"
    text = next((n for n in TEXT_COLUMNS if n in names
                 and pa.types.is_string(schema.field(n).type)), None)
    layout = {"id": next((n for n in ("id", "key") if n in names), None)}
    if images and "texts" in names:
        return {**layout, "images": images, "texts": "texts"}
    if image and text:
        return {**layout, "image": image, "text": text}
    if URL_COLUMNS & {n.lower() for n in names}:
        raise unknown_input(path, f"parquet columns {names[:8]} carry URLs, not image bytes "
                                  "(URL-only rows are out of scope: download the images first, "
                                  "e.g. with img2dataset, and pass its .tar folder)")
    raise unknown_input(path, f"parquet columns {names[:8]} are neither captioning (an image "
                              f"{{bytes, path}} column + one of {list(TEXT_COLUMNS)}) nor "
                              "interleaved (images + texts lists)")


def _parquet_media(cell: Any, name: str, root: Path) -> Any:
    """An HF Image cell -> a ``records.py`` media value (bytes inside, or a local path)."""
    if not isinstance(cell, dict):
        raise MediaMissingError(f"{name}: no image", media=name)
    hf_path = cell.get("path") or ""
    if cell.get("bytes") is not None:
        return {"bytes": cell["bytes"], "path": f"{name}:{hf_path}" if hf_path else name}
    if hf_path and not _is_url(hf_path):
        return str(root / hf_path)
    raise MediaMissingError(f"{name}: image has no bytes, only {hf_path or 'nothing'!r} "
                            "(URL-only rows are out of scope: download the images first)",
                            media=name)


class _RowGroupCache:
    """The last row group read (records are loaded in order, so each group is read once)."""

    def __init__(self, path: Path, columns: list[str]) -> None:
        self.path, self.columns = path, columns
        self.file: Any = None
        self.group, self.table = -1, None

    def row(self, group: int, index: int) -> dict[str, Any]:
        if self.group != group:
            import pyarrow.parquet as pq

            if self.file is None:
                self.file = pq.ParquetFile(self.path)
            self.group, self.table = group, self.file.read_row_group(group, columns=self.columns)
        return {c: self.table.column(c)[index].as_py() for c in self.columns}


def _parquet_load(cache: _RowGroupCache, layout: dict[str, str | None], group: int, index: int,
                  row: int, root: Path) -> Callable[[], Any]:
    def load() -> Any:
        values = cache.row(group, index)
        name = f"{cache.path}:row {row}"
        rid = values.get(layout["id"]) if layout["id"] else None
        record: dict[str, Any] = {"id": str(rid) if rid is not None
                                  else f"{cache.path.stem}_{row}"}
        if "image" in layout:
            record["image"] = _parquet_media(values[layout["image"]], name, root)
            record["caption"] = values[layout["text"]]
            return record
        images, texts = values[layout["images"]] or [], values[layout["texts"]] or []
        if len(images) != len(texts):
            raise BadSampleError(f"{len(images)} images but {len(texts)} texts (interleaved "
                                 "lists must be aligned)", reason=BAD_RECORD)
        segments: list[dict[str, Any]] = []
        for j, (image, text) in enumerate(zip(images, texts)):
            if image is not None and text is not None:
                raise BadSampleError(f"position {j} has both an image and a text",
                                     reason=BAD_RECORD)
            if text is not None:
                segments.append({"text": text})
            elif image is not None:
                segments.append({"image": _parquet_media(image, f"{name}:images[{j}]", root)})
        record["segments"] = segments
        return record

    return load


def iter_parquet(path: Path, root: Path) -> Iterator[Record]:
    """Rows of an HF ``datasets`` parquet file with image bytes (captioning or interleaved)."""
    import pyarrow.parquet as pq

    try:
        pfile = pq.ParquetFile(path)
    except Exception as exc:  # pyarrow.ArrowInvalid and friends: not a parquet file
        raise unknown_input(path, f"unreadable parquet ({type(exc).__name__})") from None
    layout = _parquet_layout(path, pfile.schema_arrow)
    cache = _RowGroupCache(path, [c for c in layout.values() if c])
    groups = [pfile.metadata.row_group(g).num_rows for g in range(pfile.num_row_groups)]

    def rows() -> Iterator[Record]:
        row = 0
        for group, num_rows in enumerate(groups):
            for index in range(num_rows):
                yield f"{path}:row {row}", _parquet_load(cache, layout, group, index, row, root)
                row += 1

    return rows()


# ---------------------------------------------------------------------------------- dispatch


def _is_binary(head: bytes) -> bool:
    if b"\0" in head:
        return True
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as exc:
        return exc.start < len(head) - 3  # not just a character cut at the end of the sample
    return False


def expand_inputs(paths: list[Path]) -> list[Path]:
    """Input paths with every folder of WebDataset shards replaced by its ``.tar`` files (sorted,
    hidden folders skipped), so whole-file slicing can split a folder of shards.

    Raises:
        ValueError: A folder with no ``.tar`` shards (one line naming the formats).
    """
    out: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            tars = _tar_files(path)
            if not tars:
                raise unknown_input(path, "a directory with no .tar shards")
            out += tars
        else:
            out.append(path)
    return out


def iter_input(path: Path, media_root: Path | None = None) -> Iterator[Record]:
    """``(where, load)`` for every record of one input (file or folder), in a fixed order.

    Args:
        path: An input file or folder (see the module docstring for the formats).
        media_root: Base of relative media paths (default: the input file's directory, or the
            folder itself). ``.jsonl``/``.json`` records keep their paths relative (the caller
            resolves them against the same root); the CSV and parquet readers resolve theirs.

    Raises:
        ValueError: ``path`` is missing or of no known format (one line naming the formats).
    """
    path = Path(path)
    if not path.exists():
        raise unknown_input(path, "no such file or directory")
    if path.is_dir():
        tars = _tar_files(path)
        if not tars:
            raise unknown_input(path, "a directory with no .tar shards")
        return iter_tars(tars)
    # absolute: the CSV and parquet readers hand out resolved paths, which the caller must not
    # join to a relative root a second time
    root = (Path(media_root) if media_root is not None else path.parent).absolute()
    suffix = path.suffix.lower()
    with open(path, "rb") as f:
        head = f.read(4096)
    if suffix == ".tar" or head[257:262] == b"ustar":
        return iter_tars([path])
    if suffix == ".parquet" or head[:4] == b"PAR1":
        return iter_parquet(path, root)
    if _is_binary(head):
        raise unknown_input(path, "a binary file of no known format")
    readers: dict[str, Callable[[], Iterator[Record]]] = {
        ".jsonl": lambda: iter_jsonl(path),
        ".txt": lambda: iter_txt(path),
        ".json": lambda: iter_json_list(path),
        ".csv": lambda: iter_csv(path, root),
    }
    if suffix not in readers:
        raise unknown_input(path, f"unknown extension {suffix!r}")
    return readers[suffix]()

