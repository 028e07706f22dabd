"""Canonical samples -> verified energon WebDataset shards (SPEC §10).

Record shapes and their normalisation live in ``records.py``; preparation (slices, merge, reject
log) in ``prepare.py``. Every record becomes one canonical sample, stored as tar members
``<key>.json`` (id, kind, segments ``{"text", "loss"}`` / ``{"media": i}``, media types) plus
``<key>.m<i>.<ext>`` per media item. Sample keys are ``<split>_<global record index:09d>``
(energon wants unique, dot-free keys).

Each shard is hashed while it is written and then re-read in full (size, SHA-256, every member,
sample count), so a shard cut short on disk is caught before training; the energon index
(``.nv-meta``, built with ``BaseWebdatasetFactory.prepare_dataset``) must agree on every count.
``verify_shards`` repeats the check at load time (cheap size check, or deep, in parallel).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import tarfile
from collections import Counter
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from megatron_vlm.data.records import (  # noqa: F401  (re-exported: the names lived here)
    BAD_RECORD,
    DUPLICATE_ID,
    FORMAT,
    CanonicalSample,
    MediaItem,
    normalize_record,
    read_records,
)

MANIFEST_NAME = "mm_dataset.json"
"""Per-dataset manifest written next to ``.nv-meta``."""
REJECTS_NAME = "rejects.jsonl"
"""Per-dataset reject log (one JSON line per rejected record) next to the manifest."""
SPLITS = ("train", "val")
SAMPLE_MODALITIES = ("text", "image", "video", "mixed")
"""Per-sample modality: no media, images only, videos only, both."""

_BLOCK = tarfile.BLOCKSIZE
_RECORD = tarfile.RECORDSIZE


class ShardVerificationError(RuntimeError):
    """A shard on disk differs from what was written (truncated, altered, missing)."""


def __getattr__(name: str) -> Any:
    # prepare.py imports this module; its names stay importable from here (they lived here).
    if name in ("prepare_dataset", "prepare_slice", "merge_slices", "PrepareSummary"):
        from megatron_vlm.data import prepare

        return getattr(prepare, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def default_workers() -> int:
    """The CPUs this process may run on (a SLURM task's ``--cpus-per-task``, a cgroup's set)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def sample_modality(media_types: Iterable[str]) -> str:
    """``text`` (no media), ``image`` (images only), ``video`` (videos only) or ``mixed``."""
    kinds = set(media_types)
    if not kinds:
        return "text"
    if kinds == {"image"}:
        return "image"
    return "video" if kinds == {"video"} else "mixed"


def infer_modality(kinds: Counter, sample_modalities: Counter) -> str:
    """The dataset's label (``manifest["modality"]``) from its per-sample counts.

    ``interleaved`` when interleaved documents outnumber caption and conversation records; else
    the media modality most samples have (``mixed`` samples label ``interleaved``; ties go to
    image, then video), or ``text`` when no sample has media.
    """
    if kinds["interleaved"] > kinds["caption"] + kinds["conversation"]:
        return "interleaved"
    media = [m for m in ("image", "video", "mixed") if sample_modalities[m]]
    if not media:
        return "text"
    top = max(media, key=lambda m: sample_modalities[m])  # max keeps the first of a tie
    return "interleaved" if top == "mixed" else top


# ------------------------------------------------------------------------------------ writing


class TarShard:
    """One ``.tar`` written member by member, hashed and counted as it goes.

    The bytes are those of ``tarfile`` in USTAR format with deterministic headers (mtime 0,
    uid/gid 0, mode 0644): same samples, same bytes. Each member's data is written straight from
    the caller's ``bytes`` (one header, the data, NUL padding): no intermediate copy.
    """

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._file = open(path, "wb")
        self._sha = hashlib.sha256()
        self.size = 0
        self.samples = 0

    def _write(self, data: bytes | memoryview) -> None:
        self._sha.update(data)
        self._file.write(data)
        self.size += len(data)

    def add(self, members: dict[str, bytes]) -> None:
        """Append one sample's members (name -> bytes) in order."""
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            self._write(info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "surrogateescape"))
            self._write(data)
            if pad := -len(data) % _BLOCK:
                self._write(bytes(pad))
        self.samples += 1

    def close(self) -> dict[str, Any]:
        """End-of-archive blocks; returns ``{path, samples, sha256, bytes}``."""
        self._write(bytes(2 * _BLOCK))
        if pad := -self.size % _RECORD:
            self._write(bytes(pad))
        self._file.close()
        return {"path": self.path, "samples": self.samples, "sha256": self._sha.hexdigest(),
                "bytes": self.size}


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


# ---------------------------------------------------------------------------------- verifying


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


def _verify_star(args: tuple[Path, dict[str, Any], bool]) -> str | None:
    return _verify_one(*args)


def verify_entries(root: Path, entries: list[dict[str, Any]], deep: bool,
                   workers: int | None = None) -> list[str]:
    """Problems of the shards ``entries`` (manifest shard entries) under ``root``, in order.

    A deep check re-reads every shard; with ``workers`` > 1 (default: ``default_workers()``)
    the shards are read by that many processes.
    """
    workers = default_workers() if workers is None else workers
    tasks = [(root, e, deep) for e in entries]
    if deep and workers > 1 and len(tasks) > 1:
        with ProcessPoolExecutor(min(workers, len(tasks)), mp_context=_mp_context()) as pool:
            results = list(pool.map(_verify_star, tasks, chunksize=4))
    else:
        results = [_verify_star(t) for t in tasks]
    return [p for p in results if p is not None]


def _mp_context():
    import multiprocessing

    # fork: the workers need no re-import (seconds per worker); this module's workers start
    # no threads and touch no accelerator.
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("fork" if "fork" in methods else "spawn")


def verify_shards(dataset_dir: str | os.PathLike, deep: bool = True,
                  workers: int | None = None) -> dict[str, Any]:
    """Check every shard of a prepared dataset against its manifest.

    Args:
        dataset_dir: A directory written by ``prepare_dataset`` / ``merge_slices``.
        deep: Re-read every tar in full (SHA-256, members, sample counts); else sizes only.
        workers: Processes for the deep check (default: the CPUs this process may use).

    Returns:
        The manifest.

    Raises:
        ShardVerificationError: Listing every bad shard and the fix.
    """
    root = Path(dataset_dir)
    manifest = load_manifest(root)
    entries = [e for split in manifest["splits"].values() for e in split["shards"]]
    problems = verify_entries(root, entries, deep, workers)
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


# ------------------------------------------------------------------------------- energon index


def write_energon_index(out: Path, shards: list[dict[str, Any]], verbose: bool,
                        exclude: list[str] | None = None, workers: int = 1) -> None:
    """energon's ``.nv-meta`` for ``shards`` (non-empty, paths relative to ``out``).

    ``exclude`` (``"<shard>/<key>"``) goes into ``split.yaml``: energon skips those samples
    (duplicate ids found at merge) while the shards stay as written.
    """
    import yaml
    from megatron.energon.flavors.webdataset import BaseWebdatasetFactory

    rel = [str(Path(s["path"])) for s in shards]
    present = {p.split("/")[0] for p in rel}
    patterns = [(split, rf"^{split}/") for split in SPLITS if split in present]
    sink = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
    with sink:
        BaseWebdatasetFactory.prepare_dataset(
            out, rel, split_parts_patterns=patterns, shuffle_seed=None,
            workers=max(1, min(workers, len(rel))),
        )
    meta = out / ".nv-meta"
    (meta / "dataset.yaml").write_text("__module__: megatron.energon\n__class__: CrudeWebdataset\n")
    if exclude:
        split_yaml = meta / "split.yaml"
        splits = yaml.safe_load(split_yaml.read_text())
        splits["exclude"] = list(exclude)
        split_yaml.write_text(yaml.safe_dump(splits, sort_keys=False))
    counts = json.loads((meta / ".info.json").read_text())["shard_counts"]
    wrong = [f"{s['path']}: energon indexed {counts.get(s['path'])}, wrote {s['samples']}"
             for s in shards if counts.get(s["path"]) != s["samples"]]
    if wrong:
        raise ShardVerificationError("energon index disagrees: " + "; ".join(wrong))


_write_energon_index = write_energon_index  # the name it had
