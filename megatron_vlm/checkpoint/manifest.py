"""Checkpoint manifest: what a complete checkpoint holds, and the checks that refuse a bad one.

A checkpoint directory is ours and complete iff it has a ``manifest.json`` with our ``format``
tag, and every file the manifest lists exists with the listed size (and, on a full check, the
listed sha256). The manifest is the last thing written before the directory is renamed into
place, so a crash mid-save never leaves a directory that passes these checks.

Nothing here touches torch.distributed: these are plain file checks any process can run.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

try:  # optional: without it the manifest has sha256 only and loads verify with sha256
    import xxhash
except ImportError:  # pragma: no cover - xxhash is a dependency; older environments lack it
    xxhash = None

MANIFEST_NAME = "manifest.json"
FORMAT = "megatron_vlm.checkpoint"
FORMAT_VERSION = 1
_HASH_CHUNK = 1 << 22  # 4 MiB reads
FAST_DIGEST = "xxh3_128"
"""The manifest's second digest of every file, beside ``sha256``: xxHash's XXH3-128, ~9 GB/s
per core here against sha256's ~1. Loads verify with it (``hashed_io``); sha256 stays for full
checks (``verify_checkpoint(full=True)``) and tools. Both detect damage (a flipped bit, a torn
or truncated copy); neither is a signature: whoever can rewrite a file can rewrite the
manifest."""


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete, corrupt, foreign, or incompatible with this run."""


def sha256_file(path: Path, fsync: bool = False) -> str:
    """Hex sha256 of a file's bytes; optionally fsync it while it is open."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
        if fsync:
            os.fsync(f.fileno())
    return h.hexdigest()


def fast_hasher():
    """A new XXH3-128 hasher, or None without the ``xxhash`` module."""
    return xxhash.xxh3_128() if xxhash is not None else None


def fast_digest_file(path: Path) -> str:
    """Hex XXH3-128 of a file's bytes, hashed from a read-only memory map (no copy)."""
    h = fast_hasher()
    if h is None:
        raise RuntimeError("xxhash is not installed")
    with open(path, "rb") as f:
        if os.fstat(f.fileno()).st_size == 0:
            return h.hexdigest()
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            m.madvise(mmap.MADV_WILLNEED)
            h.update(m)
    return h.hexdigest()


def file_digests(path: Path, fsync: bool = False) -> dict[str, str]:
    """``{"sha256": ..., FAST_DIGEST: ...}`` of a file in one read (sha256 only without
    xxhash); optionally fsync it while it is open."""
    h, fast = hashlib.sha256(), fast_hasher()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
            if fast is not None:
                fast.update(chunk)
        if fsync:
            os.fsync(f.fileno())
    out = {"sha256": h.hexdigest()}
    if fast is not None:
        out[FAST_DIGEST] = fast.hexdigest()
    return out


def list_files(ckpt_dir: Path) -> list[str]:
    """Every regular file under ``ckpt_dir`` (relative POSIX paths, sorted), manifest excluded."""
    out = []
    for p in sorted(ckpt_dir.rglob("*")):
        if p.is_file():
            rel = p.relative_to(ckpt_dir).as_posix()
            if rel != MANIFEST_NAME:
                out.append(rel)
    return out


def file_entries(ckpt_dir: Path, rel_paths: Iterable[str], fsync: bool = False) -> list[dict]:
    """``{"path", "size", "sha256", FAST_DIGEST}`` for each file (fsynced on the way if
    asked)."""
    entries = []
    for rel in rel_paths:
        p = ckpt_dir / rel
        entries.append({"path": rel, "size": p.stat().st_size, **file_digests(p, fsync)})
    return entries


def write_manifest(ckpt_dir: Path, manifest: dict[str, Any]) -> None:
    """Write ``manifest.json`` and fsync it."""
    path = ckpt_dir / MANIFEST_NAME
    with open(path, "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=False)
        f.flush()
        os.fsync(f.fileno())


def read_manifest(ckpt_dir: Path) -> dict[str, Any]:
    """The parsed manifest of ``ckpt_dir``.

    Raises:
        CheckpointError: no directory, no manifest (a foreign directory), unparsable JSON,
            another format tag, or a newer format version.
    """
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        raise CheckpointError(f"checkpoint directory {ckpt_dir} does not exist")
    path = ckpt_dir / MANIFEST_NAME
    if not path.is_file():
        raise CheckpointError(
            f"not a megatron_vlm checkpoint: no {MANIFEST_NAME} in {ckpt_dir} "
            "(an interrupted save, or a directory written by another tool)"
        )
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"corrupt manifest {path}: {e}") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise CheckpointError(
            f"not a megatron_vlm checkpoint: {path} has format {found!r}, expected {FORMAT!r}"
        )
    version = manifest.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path} has format_version {version!r}; this megatron_vlm reads <= {FORMAT_VERSION}"
        )
    if not isinstance(manifest.get("files"), list):
        raise CheckpointError(f"corrupt manifest {path}: no 'files' list")
    return manifest


def check_files(
    ckpt_dir: Path, entries: Iterable[dict], hash_paths: set[str] | None = None
) -> list[str]:
    """Problems with the listed files: missing, wrong size, or (for ``hash_paths``) wrong sha256.

    Returns one message per bad file, each naming the file; empty when all is well.
    """
    problems = []
    for e in entries:
        rel, size = e["path"], e["size"]
        p = ckpt_dir / rel
        if not p.is_file():
            problems.append(f"missing file {p}")
            continue
        actual = p.stat().st_size
        if actual != size:
            problems.append(f"wrong size for {p}: {actual} bytes, manifest says {size}")
            continue
        if hash_paths is not None and rel in hash_paths:
            digest = sha256_file(p)
            if digest != e["sha256"]:
                problems.append(f"sha256 mismatch for {p}: {digest[:16]}..., "
                                f"manifest says {e['sha256'][:16]}...")
    return problems


def verify_checkpoint(path: Path, full: bool = False) -> dict[str, Any]:
    """Check a checkpoint directory against its manifest; return the manifest.

    Args:
        path: the checkpoint directory (``<root>/step_0000123``).
        full: also compare every file's sha256 (reads all bytes); otherwise sizes only.

    Raises:
        CheckpointError: naming the first bad file (and how many are bad), or the manifest problem.
    """
    path = Path(path)
    manifest = read_manifest(path)
    entries = manifest["files"]
    hash_paths = {e["path"] for e in entries} if full else None
    raise_problems(path, check_files(path, entries, hash_paths))
    return manifest


def raise_problems(path: Path, problems: list[str]) -> None:
    """Raise one CheckpointError summarising ``problems`` (no-op when empty)."""
    if not problems:
        return
    more = ""
    if len(problems) > 1:
        more = f" (and {len(problems) - 1} more: {'; '.join(problems[1:4])})"
    raise CheckpointError(f"checkpoint {path} is damaged: {problems[0]}{more}")


# --- model-config compatibility -----------------------------------------------------------------


def model_section(config_yaml: str | None) -> Any:
    """The ``model`` section of a JobConfig YAML (None if there is no YAML or no such section)."""
    if not config_yaml:
        return None
    data = yaml.safe_load(config_yaml)
    return data.get("model") if isinstance(data, dict) else None


def structural_hash(obj: Any) -> str:
    """sha256 of a canonical JSON rendering (key order and YAML formatting do not matter)."""
    canon = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canon.encode()).hexdigest()


ABSENT = object()
"""A key one of two compared configs lacks (:func:`field_diffs`)."""


def field_diffs(a: Any, b: Any, prefix: str) -> list[tuple[str, Any, Any]]:
    """``(dotted path, value in a, value in b)`` where two nested dicts differ (leaves, or a
    key only one side has: :data:`ABSENT` on the other)."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            path = f"{prefix}.{k}"
            if k in a and k in b:
                out.extend(field_diffs(a[k], b[k], path))
            else:
                out.append((path, a.get(k, ABSENT), b.get(k, ABSENT)))
        return out
    return [] if a == b else [(prefix, a, b)]


def format_diff(path: str, saved: Any, now: Any) -> str:
    """``"model.x: 1 in checkpoint != 2 now"`` (or which side lacks the field)."""
    if saved is ABSENT:
        return f"{path}: absent in checkpoint, {now!r} now"
    if now is ABSENT:
        return f"{path}: {saved!r} in checkpoint, absent now"
    return f"{path}: {saved!r} in checkpoint != {now!r} now"


def diff_fields(a: Any, b: Any, prefix: str) -> list[str]:
    """Dotted paths where two nested dicts differ, with both values: ``"model.x: 1 != 2"``."""
    return [format_diff(*d) for d in field_diffs(a, b, prefix)]


def check_model_config(manifest: dict[str, Any], config_yaml: str, ckpt_dir: Path) -> None:
    """Refuse a checkpoint whose model section differs from ``config_yaml``'s, naming the fields."""
    current = model_section(config_yaml)
    if manifest.get("model_config_sha256") == structural_hash(current):
        return
    saved = model_section(manifest.get("config_yaml"))
    diffs = diff_fields(saved, current, "model")
    if not diffs:  # same parsed values, hash of an older rendering: compatible
        return
    raise CheckpointError(
        f"checkpoint {ckpt_dir} was saved with a different model config: " + "; ".join(diffs)
    )
