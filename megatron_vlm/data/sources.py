"""Input readers: the files teams already hold -> ``(where, load)`` per record, read in place.

``iter_input(path, media_root)`` yields one ``(where, load)`` pair per input record in a
deterministic order. ``where`` is the input path as given plus a locator (``data.jsonl:12``);
``load()`` returns the record dict in the shapes ``records.normalize_record`` accepts, or raises
``BadSampleError`` for a malformed record. Reading happens in ``load()``, so a caller that skips
records (sliced preparation) does not pay for them.

Formats:

- ``.jsonl``: one record per line (the project's schema, see ``records.py``);
  ``where`` = ``<file>:<line>``.
- ``.txt``: one plain-text document per non-empty line; ``where`` = ``<file>:<line>``.

Anything else raises ``ValueError`` with one line naming the accepted formats.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from megatron_vlm.data.media_errors import BadSampleError

BAD_RECORD = "bad_record"
"""Skip reason: malformed JSON or a record of no known shape (same value as ``records``)."""
ACCEPTED = ".jsonl records, .txt documents"
"""The formats ``iter_input`` reads, for error messages."""

Record = tuple[str, Callable[[], Any]]


def _jsonl_load(line: str) -> Callable[[], Any]:
    def load() -> Any:
        try:
            return json.loads(line)
        except json.JSONDecodeError as exc:
            raise BadSampleError(f"malformed JSON: {exc}", reason=BAD_RECORD) from None

    return load


def iter_jsonl(path: Path) -> Iterator[Record]:
    """Records of a ``.jsonl`` file, one per non-empty line."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                yield f"{path}:{lineno}", _jsonl_load(line)


def iter_txt(path: Path) -> Iterator[Record]:
    """Plain-text documents of a ``.txt`` file, one per non-empty line (id ``<stem>_<line>``)."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                record = {"id": f"{path.stem}_{lineno}", "text": line.rstrip("\n")}
                yield f"{path}:{lineno}", (lambda r=record: r)


def unknown_input(path: Path, why: str) -> ValueError:
    """The one-line error for an input of no known format."""
    return ValueError(f"{path}: {why}; accepted inputs: {ACCEPTED}")


def iter_input(path: Path, media_root: Path | None = None) -> Iterator[Record]:
    """``(where, load)`` for every record of one input (file or folder), in a fixed order.

    Args:
        path: An input file or folder (see the module docstring for the formats).
        media_root: Base of relative media paths in the records (default: the input file's
            directory). Readers whose records name media files resolve them against it.

    Raises:
        ValueError: ``path`` is missing or of no known format (one line naming the formats).
    """
    path = Path(path)
    del media_root  # relative media paths are resolved by normalize_record for these formats
    if not path.exists():
        raise ValueError(f"{path}: no such file or directory")
    suffix = path.suffix.lower()
    if path.is_file() and suffix == ".jsonl":
        return iter_jsonl(path)
    if path.is_file() and suffix == ".txt":
        return iter_txt(path)
    raise unknown_input(path, "not a known input format")
