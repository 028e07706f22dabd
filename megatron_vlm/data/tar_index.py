"""Index of a WebDataset tar without unpacking it: sample key -> member data offsets and sizes.

``index_tar`` walks the headers with ``tarfile`` (``TarInfo.offset_data``; member data is read
later, by offset, only for the records a caller loads). A tar cut short or followed by garbage is
reported (tarfile stops quietly at a cut header), with the samples indexed before the damage.
"""

from __future__ import annotations

import os
import tarfile
from pathlib import Path


def scan_tarfile(tar: Path) -> tuple[list[tuple[str, int, int]], str | None]:
    """(name, data offset, size) of every regular file, and the error that cut the walk short."""
    members: list[tuple[str, int, int]] = []
    end = 0
    try:
        with tarfile.open(tar, "r:") as tf:
            for member in tf:
                end = member.offset_data + -(-member.size // 512) * 512
                if member.isfile():
                    members.append((member.name, member.offset_data, member.size))
        with open(tar, "rb") as f:  # tarfile stops quietly at a cut header: check the end
            f.seek(end)
            tail = f.read()
    except (tarfile.TarError, OSError) as exc:
        return members, f"{type(exc).__name__}: {exc}"
    if len(tail) < 1024 or tail.strip(b"\0"):
        return members, f"no end-of-archive blocks after byte {end} (truncated or trailing data)"
    return members, None


def index_tar(tar: Path) -> tuple[dict[str, dict[str, tuple[int, int]]], str | None]:
    """key -> {ext: (data offset, size)} in tar order, and the read error that cut it short."""
    members, error = scan_tarfile(tar)
    keys: dict[str, dict[str, tuple[int, int]]] = {}
    for name, offset, size in members:
        folder, base = os.path.split(name)
        if base.startswith("."):
            continue
        stem, _, ext = base.partition(".")
        key = f"{folder}/{stem}" if folder else stem
        keys.setdefault(key, {})[ext.lower()] = (offset, size)
    return keys, error
