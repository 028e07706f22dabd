"""Index of a WebDataset tar without unpacking it: sample key -> member data offsets and sizes.

``index_tar`` reads only the 512-byte headers (``os.pread``; pax ``x`` headers and GNU ``L`` long
names understood, tarfile for anything else): 20-30k samples/s of 3 members on one shared core
against tarfile's 4-7k, which matters because every preparation slice counts every record of
every input tar. A tar cut
short or followed by garbage is reported (tarfile stops quietly at a cut header), with the
samples indexed before the damage.
"""

from __future__ import annotations

import os
import tarfile
from pathlib import Path

_PLAIN_TYPES = {b"0", b"\0", b"1", b"2", b"3", b"4", b"5", b"6", b"7"}
"""ustar member types; pax ``x`` headers (webdataset's TarWriter writes one per member for its
float mtime) and GNU ``L`` long names are read too; anything else goes to tarfile."""


def _pax_records(data: bytes) -> dict[bytes, bytes]:
    """``"<len> key=value\\n"`` records of a pax extended header."""
    out, pos = {}, 0
    while pos < len(data) and data[pos:pos + 1] != b"\0":
        length = int(data[pos:data.index(b" ", pos)])
        key, _, value = data[data.index(b" ", pos) + 1:pos + length - 1].partition(b"=")
        out[key] = value
        pos += length
    return out


def scan_headers(tar: Path) -> tuple[list[tuple[str, int, int]], str | None] | None:
    """(name, data offset, size) of every regular file by reading only the 512-byte headers
    (~4x tarfile's speed: slices count every record of every tar), and the error that cut the
    scan short; None when the tar needs tarfile (extended headers, base-256 sizes)."""
    members: list[tuple[str, int, int]] = []
    extended: dict[bytes, bytes] = {}
    with open(tar, "rb") as f:
        fd, offset = f.fileno(), 0
        while True:
            header = os.pread(fd, 512, offset)
            if len(header) < 512:
                return members, f"no end-of-archive blocks after byte {offset} (truncated)"
            if header == bytes(512):
                tail = os.pread(fd, 1 << 16, offset)
                if len(tail) < 1024 or tail.strip(b"\0"):
                    return members, f"trailing data or truncation after byte {offset}"
                return members, None
            checksum = sum(header) - sum(header[148:156]) + 8 * 32
            try:
                ok = checksum == int(header[148:156].split(b"\0")[0].strip() or b"-1", 8)
                size = int(header[124:136].split(b"\0")[0].strip() or b"0", 8)
            except ValueError:
                return None  # base-256 numbers and other oddities: tarfile knows them
            if not ok:
                return members, f"corrupt tar header at byte {offset}"
            kind = header[156:157]
            if kind in (b"x", b"L"):  # applies to the next header
                data = os.pread(fd, size, offset + 512)
                try:
                    extended |= (_pax_records(data) if kind == b"x"
                                 else {b"path": data.split(b"\0")[0]})
                except ValueError:
                    return None
                offset += 512 + -(-size // 512) * 512
                continue
            if kind not in _PLAIN_TYPES:
                return None
            if b"size" in extended:
                size = int(extended[b"size"])
            if kind in (b"0", b"\0"):
                name = header[:100].split(b"\0")[0]
                if header[257:262] == b"ustar" and header[345] != 0:
                    name = header[345:500].split(b"\0")[0] + b"/" + name
                name = extended.get(b"path", name)
                members.append((name.decode("utf-8", "surrogateescape"), offset + 512, size))
            extended = {}
            offset += 512 + -(-size // 512) * 512


def scan_tarfile(tar: Path) -> tuple[list[tuple[str, int, int]], str | None]:
    """``scan_headers`` through tarfile (any tar it reads)."""
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
    try:
        scanned = scan_headers(tar)
    except OSError as exc:
        return {}, f"{type(exc).__name__}: {exc}"
    members, error = scanned if scanned is not None else scan_tarfile(tar)
    keys: dict[str, dict[str, tuple[int, int]]] = {}
    for name, offset, size in members:
        folder, base = os.path.split(name)
        if base.startswith("."):
            continue
        stem, _, ext = base.partition(".")
        key = f"{folder}/{stem}" if folder else stem
        keys.setdefault(key, {})[ext.lower()] = (offset, size)
    return keys, error
