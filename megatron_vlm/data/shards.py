"""Canonical samples -> verified energon WebDataset shards (SPEC §10).

Record shapes and their normalisation live in ``records.py``. Every record becomes one canonical
sample, stored as tar members ``<key>.json`` (id, kind, segments ``{"text", "loss"}`` /
``{"media": i}``, media types) plus ``<key>.m<i>.<ext>`` per media item. Sample keys are
``<split>_<index>`` (energon wants unique, dot-free keys); record ids must be unique within a
dataset. Rejected records (missing or undecodable media, empty text, media special tokens in the
text, duplicate ids, malformed records) are counted per reason and never written.

Each shard is hashed while it is written and then re-read in full (size, SHA-256, every member,
sample count), so a shard cut short on disk is caught before training; the energon index
(``.nv-meta``, built with ``BaseWebdatasetFactory.prepare_dataset``) must agree on every count.
``verify_shards`` repeats the check at load time (cheap size check, or deep).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import shutil
import sys
import tarfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megatron_vlm.data.media_errors import BadSampleError
from megatron_vlm.data.records import (  # noqa: F401  (re-exported: the names lived here)
    ASSISTANT_PREFIX,
    BAD_RECORD,
    DUPLICATE_ID,
    FORMAT,
    USER_PREFIX,
    CanonicalSample,
    MediaItem,
    normalize_record,
    read_records,
)

MANIFEST_NAME = "mm_dataset.json"
"""Per-dataset manifest written next to ``.nv-meta``."""
SPLITS = ("train", "val")


class ShardVerificationError(RuntimeError):
    """A shard on disk differs from what was written (truncated, altered, missing)."""


# ------------------------------------------------------------------------------------ writing


class _HashingFile:
    """Write-only file wrapper that hashes and counts what tarfile writes."""

    def __init__(self, f) -> None:
        self.f = f
        self.sha = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self.sha.update(data)
        self.size += len(data)
        return self.f.write(data)

    def tell(self) -> int:
        return self.size


class ShardWriter:
    """Writes samples into ``<dir>/shard_NNNNNN.tar`` files of at most ``samples_per_shard``.

    Tar headers are deterministic (mtime 0, uid/gid 0, mode 0644): same input, same bytes.
    """

    def __init__(self, out_dir: Path, samples_per_shard: int) -> None:
        if samples_per_shard < 1:
            raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
        self.out_dir = out_dir
        self.samples_per_shard = samples_per_shard
        self.shards: list[dict[str, Any]] = []
        self._file = self._hasher = self._tar = None
        self._count = 0

    def _open(self) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / f"shard_{len(self.shards):06d}.tar"
        self._file = open(path, "wb")
        self._hasher = _HashingFile(self._file)
        self._tar = tarfile.open(fileobj=self._hasher, mode="w", format=tarfile.USTAR_FORMAT)
        self.shards.append({"path": path, "samples": 0})
        self._count = 0

    def write(self, members: dict[str, bytes]) -> None:
        if self._tar is None or self._count >= self.samples_per_shard:
            self.close_shard()
            self._open()
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            self._tar.addfile(info, io.BytesIO(data))
        self._count += 1
        self.shards[-1]["samples"] = self._count

    def close_shard(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        self._file.close()
        self.shards[-1].update(sha256=self._hasher.sha.hexdigest(), bytes=self._hasher.size)
        self._tar = self._file = self._hasher = None


def iter_shard(path: str | os.PathLike) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {extension: bytes}) of every sample in a shard, in order (full read).

    Raises:
        ShardVerificationError: A tar that cannot be read to its end.
    """
    current, members = None, {}
    try:
        with tarfile.open(path, mode="r:") as tar:
            for info in tar:
                if not info.isfile():
                    continue
                key, _, ext = info.name.partition(".")
                f = tar.extractfile(info)
                data = f.read() if f is not None else b""
                if len(data) != info.size:
                    raise ShardVerificationError(f"{path}: member {info.name} is cut short")
                if key != current and current is not None:
                    yield current, members
                    members = {}
                current = key
                members[ext] = data
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise ShardVerificationError(f"{path}: unreadable tar: {exc}") from exc
    if current is not None:
        yield current, members


def _verify_one(root: Path, entry: dict[str, Any], deep: bool) -> str | None:
    path = root / entry["path"]
    if not path.is_file():
        return f"{entry['path']}: missing"
    size = path.stat().st_size
    if size != entry["bytes"]:
        return f"{entry['path']}: {size} bytes on disk, {entry['bytes']} written (truncated?)"
    if not deep:
        return None
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            sha.update(block)
    if sha.hexdigest() != entry["sha256"]:
        return f"{entry['path']}: SHA-256 differs from the one written (altered on disk)"
    try:
        num = sum(1 for key, members in iter_shard(path) if "json" in members)
    except ShardVerificationError as exc:
        return str(exc)
    if num != entry["samples"]:
        return f"{entry['path']}: {num} samples readable, {entry['samples']} written"
    return None


def verify_shards(dataset_dir: str | os.PathLike, deep: bool = True) -> dict[str, Any]:
    """Check every shard of a prepared dataset against its manifest.

    Args:
        dataset_dir: A directory written by ``prepare_dataset``.
        deep: Re-read every tar in full (SHA-256, members, sample counts); else sizes only.

    Returns:
        The manifest.

    Raises:
        ShardVerificationError: Listing every bad shard and the fix.
    """
    root = Path(dataset_dir)
    manifest = load_manifest(root)
    problems = [
        p
        for split in manifest["splits"].values()
        for entry in split["shards"]
        if (p := _verify_one(root, entry, deep)) is not None
    ]
    if problems:
        raise ShardVerificationError(
            f"{len(problems)} bad shard(s) in {root}: " + "; ".join(problems)
            + ". Re-run tools/prepare_data.py for this dataset (it rewrites every shard)."
        )
    return manifest


def load_manifest(dataset_dir: str | os.PathLike) -> dict[str, Any]:
    """``mm_dataset.json`` of a prepared dataset."""
    path = Path(dataset_dir) / MANIFEST_NAME
    if not path.is_file():
        raise ValueError(
            f"{dataset_dir} is not a prepared multimodal dataset (no {MANIFEST_NAME}); "
            "prepare it with tools/prepare_data.py"
        )
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path}: format {manifest.get('format')!r}, expected {FORMAT!r}")
    return manifest


# ---------------------------------------------------------------------------------- preparing


@dataclass
class PrepareSummary:
    """What ``prepare_dataset`` wrote and rejected."""

    name: str
    modality: str
    written: dict[str, int]
    """Samples per split."""
    rejected: Counter
    """Reason -> records."""
    examples: dict[str, str]
    """Reason -> first rejected record's location and message."""
    num_shards: int
    num_bytes: int
    seconds: float

    def format(self) -> str:
        lines = [
            f"{self.name} ({self.modality}): wrote "
            + ", ".join(f"{n} {s}" for s, n in self.written.items())
            + f" samples in {self.num_shards} shards ({self.num_bytes / 1e6:.1f} MB, "
            f"{self.seconds:.1f} s); rejected {sum(self.rejected.values())}"
        ]
        for reason, n in sorted(self.rejected.items()):
            lines.append(f"  rejected {n:6d} {reason}: e.g. {self.examples[reason][:200]}")
        return "\n".join(lines)


def _infer_modality(kinds: Counter, media: Counter) -> str:
    if kinds["interleaved"] > kinds["caption"] + kinds["conversation"]:
        return "interleaved"
    if media["video"]:
        return "video"
    return "image" if media["image"] else "text"


def _progress(it: Iterable, enabled: bool, desc: str) -> Iterable:
    if not enabled:
        return it
    from tqdm import tqdm

    return tqdm(it, desc=desc, unit="rec", file=sys.stderr, mininterval=0.5)


def _write_energon_index(out: Path, shards: list[dict[str, Any]], verbose: bool) -> None:
    from megatron.energon.flavors.webdataset import BaseWebdatasetFactory

    rel = [str(Path(s["path"])) for s in shards]
    present = {p.split("/")[0] for p in rel}
    patterns = [(split, rf"^{split}/") for split in SPLITS if split in present]
    sink = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
    with sink:
        BaseWebdatasetFactory.prepare_dataset(
            out, rel, split_parts_patterns=patterns, shuffle_seed=None, workers=1
        )
    (out / ".nv-meta" / "dataset.yaml").write_text(
        "__module__: megatron.energon\n__class__: CrudeWebdataset\n"
    )
    counts = json.loads((out / ".nv-meta" / ".info.json").read_text())["shard_counts"]
    wrong = [f"{s['path']}: energon indexed {counts.get(s['path'])}, wrote {s['samples']}"
             for s in shards if counts.get(s["path"]) != s["samples"]]
    if wrong:
        raise ShardVerificationError("energon index disagrees: " + "; ".join(wrong))


def prepare_dataset(
    inputs: dict[str, list[str | os.PathLike]],
    out_dir: str | os.PathLike,
    *,
    name: str,
    modality: str | None = None,
    media_root: str | os.PathLike | None = None,
    samples_per_shard: int = 1000,
    check_media: bool = True,
    overwrite: bool = False,
    progress: bool = True,
    verbose: bool = True,
    after_write: Callable[[Path], None] | None = None,
) -> PrepareSummary:
    """Write, verify and index one energon dataset from raw record files.

    Args:
        inputs: ``split -> input files`` (``.jsonl`` records or ``.txt`` documents); splits are
            ``train`` and ``val``.
        out_dir: Dataset directory to create (``<split>/shard_*.tar``, ``.nv-meta/``,
            ``mm_dataset.json``). Must not exist unless ``overwrite``.
        name: Dataset name (mixes and metrics refer to it).
        modality: ``image`` | ``video`` | ``interleaved`` | ``text``; inferred when None.
        media_root: Base of relative media paths (default: each input file's directory).
        samples_per_shard: Samples per tar.
        check_media: Decode every image and video and reject the ones that fail.
        overwrite: Replace an existing dataset directory.
        progress: tqdm progress bar on stderr.
        verbose: Print the summary (and energon's index messages).
        after_write: Called with each finished shard's path before verification (fault
            injection in tests; a hook for uploads).

    Returns:
        The summary.

    Raises:
        ShardVerificationError: A written shard does not read back as written.
        ValueError: Bad arguments, or nothing could be written.
    """
    start = time.perf_counter()
    out = Path(out_dir)
    if unknown := set(inputs) - set(SPLITS):
        raise ValueError(f"unknown splits {sorted(unknown)}; use {SPLITS}")
    if out.exists():
        if not overwrite:
            raise ValueError(f"{out} exists; pass overwrite=True (--overwrite) to replace it")
        shutil.rmtree(out)
    kinds, media_counts, rejected = Counter(), Counter(), Counter()
    examples: dict[str, str] = {}
    seen_ids: set[str] = set()
    written: dict[str, int] = {}
    shards: list[dict[str, Any]] = []
    for split in SPLITS:  # streaming: one record in memory at a time
        writer = ShardWriter(out / split, samples_per_shard)
        written[split] = 0
        for path in inputs.get(split, []):
            path = Path(path)
            root = Path(media_root) if media_root is not None else path.parent
            for where, obj in _progress(read_records(path), progress, f"{name}/{split}"):
                try:
                    if isinstance(obj, Exception):
                        raise obj
                    sample = normalize_record(obj, root, check_media)
                    if sample.id in seen_ids:
                        raise BadSampleError(f"duplicate id {sample.id!r}", reason=DUPLICATE_ID)
                except BadSampleError as exc:
                    rejected[exc.reason] += 1
                    examples.setdefault(exc.reason, f"{where}: {exc}")
                    continue
                seen_ids.add(sample.id)
                kinds[sample.kind] += 1
                media_counts.update(m.type for m in sample.media)
                writer.write(sample.to_members(f"{split}_{written[split]:09d}"))
                written[split] += 1
        writer.close_shard()
        for s in writer.shards:
            s["path"] = str(s["path"].relative_to(out))
            if after_write is not None:
                after_write(out / s["path"])
        shards += writer.shards
    if not written.get("train"):
        raise ValueError(f"no valid train records for dataset {name!r} "
                         f"(rejected: {dict(rejected)}; e.g. {list(examples.values())[:3]})")
    modality = modality or _infer_modality(kinds, media_counts)
    manifest = {
        "format": FORMAT,
        "name": name,
        "modality": modality,
        "kinds": dict(kinds),
        "media": dict(media_counts),
        "rejected": dict(rejected),
        "splits": {
            split: {"samples": written[split],
                    "shards": [s for s in shards if s["path"].startswith(split + "/")]}
            for split in SPLITS
        },
    }
    (out / MANIFEST_NAME).write_text(json.dumps(manifest, indent=1) + "\n")
    verify_shards(out, deep=True)
    _write_energon_index(out, [s for s in shards if s["samples"]], verbose)
    summary = PrepareSummary(
        name, modality, written, rejected, examples, len(shards),
        sum(s["bytes"] for s in shards), time.perf_counter() - start,
    )
    if verbose:
        print(summary.format())
    return summary
