"""Checkpoint bytes hashed on the way: sha256 and XXH3 while writing, XXH3 checks on loading.

Hashing was a second pass over every byte after a save (and before a load); on a few cores that
pass cost as much as the write itself. Here:

* **save**: each data file of a rank's torch_dist buckets is written through
  :class:`HashingWriter` (every byte hashed as it goes to the file, no re-read), one thread per
  bucket file (:data:`WRITE_THREADS`); :func:`write_buckets` returns megatron's write results and
  fills a ``{relative path: manifest entry}`` dict.
* **load**: :class:`BackgroundHasher` checks this rank's share of the files against the
  manifest's XXH3-128 (``manifest.FAST_DIGEST``, recorded beside sha256 while writing; sha256
  for checkpoints without it), each file hashed from a memory map, in threads while torch DCP
  reads them or first (:data:`OVERLAP_MIN_CPUS`); the digests are compared before any loaded
  state reaches the live model or optimizer (each data file is verified by the rank that reads
  it, so the hasher finds its bytes in the page cache).
  Chosen by measurement: with sha256 (~1 GB/s per core) the check alone cost 0.35 CPU-s of a
  425 MB state against DCP's whole 0.43 CPU-s load, and neither hashing beside the read nor
  inside it (a ``read_data`` that read each file once, hashing as it went) helped on 2 busy
  cores (CPU-s per verified load 0.98 beside, 1.13 inside, 1.00 first). XXH3 from a memory map
  costs ~0.2 CPU-s per GB (page mapping included), so the check is a small part of the load.
"""

from __future__ import annotations

import hashlib
import inspect
import os
import re
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

from torch.distributed.checkpoint.filesystem import _write_item

from megatron_vlm.checkpoint.manifest import (
    FAST_DIGEST,
    fast_digest_file,
    fast_hasher,
    sha256_file,
)

WRITE_THREADS = 2
"""Data files per rank, each written (and hashed) by its own thread. Both save paths (sync and
async) use it, so their checkpoints have the same files."""

_SERIALIZATION_KWARGS: dict[str, Any] = {}
if "serialization_format" in inspect.signature(_write_item).parameters:
    from torch.distributed.checkpoint.filesystem import SerializationFormat

    _SERIALIZATION_KWARGS["serialization_format"] = SerializationFormat.TORCH_SAVE


class HashingWriter:
    """A write-only stream over an open binary file that hashes every byte written (sha256
    and, with xxhash, :data:`~megatron_vlm.checkpoint.manifest.FAST_DIGEST`).

    Only sequential writes (``write``/``tell``/``flush``): a seek would make the digest differ
    from the file, so it raises.
    """

    def __init__(self, raw) -> None:
        self.raw = raw
        self.size = 0
        self._hash = hashlib.sha256()
        self._fast = fast_hasher()

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        n = self.raw.write(view)
        if n is not None and n != view.nbytes:
            raise OSError(f"short write to {self.raw.name}: {n} of {view.nbytes} bytes")
        self._hash.update(view)
        if self._fast is not None:
            self._fast.update(view)
        self.size += view.nbytes
        return view.nbytes

    def tell(self) -> int:
        return self.size

    def flush(self) -> None:
        self.raw.flush()

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False

    def seek(self, *args: Any) -> int:
        raise OSError("HashingWriter is sequential: a seek would invalidate the running sha256")

    def hexdigest(self) -> str:
        return self._hash.hexdigest()

    def digests(self) -> dict[str, str]:
        """The manifest's digests of what was written: ``sha256`` (and the fast one)."""
        out = {"sha256": self._hash.hexdigest()}
        if self._fast is not None:
            out[FAST_DIGEST] = self._fast.hexdigest()
        return out


def _write_bucket(transform_list: list, bucket) -> tuple[list, dict[str, Any]]:
    """One bucket file (megatron's ``(path, relative name, (bytes, tensors))``), fsynced;
    returns its write results and its manifest entry."""
    file_name, storage_key, (bytes_data, tensor_data) = bucket
    results = []
    with open(file_name, "wb") as f:
        stream = HashingWriter(f)
        for item, data in list(bytes_data) + list(tensor_data):
            results.append(_write_item(*transform_list, stream, data, item, storage_key,
                                       **_SERIALIZATION_KWARGS))
        f.flush()
        if f.tell() != stream.size:  # internal invariant: every byte went through the hash
            raise OSError(f"{file_name}: {f.tell()} bytes written, {stream.size} hashed")
        os.fsync(f.fileno())
    entry = {"path": Path(file_name).name, "size": stream.size, **stream.digests()}
    return results, entry


def write_buckets(transform_list: list, buckets: list,
                  digests: dict[str, dict]) -> dict[int, list] | Exception:
    """Write megatron's buckets, one thread each; megatron's result protocol (``{bucket index:
    write results}``, or the first exception). Fills ``digests`` with each file's manifest
    entry (paths relative to the checkpoint directory)."""
    if not buckets:
        return {}
    try:
        with ThreadPoolExecutor(max_workers=len(buckets),
                                thread_name_prefix="ckpt-write") as pool:
            futures = [pool.submit(_write_bucket, transform_list, b) for b in buckets]
            out = {}
            for idx, fut in enumerate(futures):
                results, entry = fut.result()
                out[idx] = results
                digests[entry["path"]] = entry
            return out
    except Exception as e:  # noqa: BLE001 -- megatron's finalize reports it on every rank
        return e


OVERLAP_MIN_CPUS = 4
"""A load hashes beside the DCP read only when this process may use at least this many CPUs
(a core to spare for the hasher); with fewer it hashes first. Measured on 2 busy cores, 425 MB:
hashing first 0.92-0.95 CPU s per verified load, beside the read 1.04-1.11 (no spare core, so
the overlap only adds contention)."""


def overlap_hashing() -> bool:
    """Whether a load should hash beside the read (:data:`OVERLAP_MIN_CPUS`)."""
    return _cpus() >= OVERLAP_MIN_CPUS


def check_digest(path: Path, entry: dict) -> tuple[str, str]:
    """``(algorithm, hex digest)`` of a file, by the fastest digest its manifest entry has:
    :data:`FAST_DIGEST` where recorded (and xxhash is installed), else sha256."""
    if FAST_DIGEST in entry and fast_hasher() is not None:
        return FAST_DIGEST, fast_digest_file(path)
    return "sha256", sha256_file(path)


class BackgroundHasher:
    """Digests of some files of a checkpoint (:func:`check_digest`), computed in threads from
    construction on.

    Args:
        ckpt_dir: the checkpoint directory.
        entries: manifest entries (``path``, ``sha256``, maybe :data:`FAST_DIGEST`) to check.
        threads: hashing threads (default: half the CPUs this process may use, at least 1, so
            the load keeps the rest).
    """

    def __init__(self, ckpt_dir: Path, entries: list[dict], threads: int | None = None) -> None:
        self.ckpt_dir = Path(ckpt_dir)
        self.entries = list(entries)
        if threads is None:
            threads = max(1, _cpus() // 2)
        self._pool = ThreadPoolExecutor(max_workers=max(1, min(threads, len(self.entries) or 1)),
                                        thread_name_prefix="ckpt-verify")
        # Largest first, so the threads finish together.
        order = sorted(self.entries, key=lambda e: -e.get("size", 0))
        self._futures: dict[str, Future] = {
            e["path"]: self._pool.submit(check_digest, self.ckpt_dir / e["path"], e)
            for e in order}
        self._lock = threading.Lock()

    def problems(self) -> list[str]:
        """Wait for every digest; one message per file whose digest differs from the manifest
        (or that could not be read)."""
        known: dict[str, tuple[str, str]] = {}
        with self._lock:
            for e in self.entries:
                try:
                    known[e["path"]] = self._futures[e["path"]].result()
                except OSError as err:
                    known[e["path"]] = ("sha256", f"unreadable ({err})")
            self._pool.shutdown(wait=True)
        return mismatches(self.ckpt_dir, self.entries, known)


def mismatches(ckpt_dir: Path, entries: list[dict],
               digests: dict[str, tuple[str, str]]) -> list[str]:
    """One message per entry whose digest (``{path: (algorithm, hex)}`` from ``digests``, else
    hashed now by :func:`check_digest`) is not the manifest's."""
    out = []
    for e in entries:
        p = Path(ckpt_dir) / e["path"]
        found = digests.get(e["path"])
        if found is None:
            try:
                found = check_digest(p, e)
            except OSError as err:
                found = ("sha256", f"unreadable ({err})")
        algo, digest = found
        if digest != e[algo]:
            out.append(f"{algo} mismatch for {p}: {digest[:16]}..., "
                       f"manifest says {e[algo][:16]}...")
    return out


def _cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 2


_DATA_FILE = re.compile(r"^__(\d+)_\d+\.distcp$")


def verify_share(entries: list[dict], rank: int, world: int) -> list[dict]:
    """The files this rank verifies: the data files written by rank ``k`` go to rank
    ``k % world`` (the rank that reads them when the layout is unchanged, so the hasher finds
    them in the page cache), the other files round-robin."""
    data = [(e, _DATA_FILE.match(e["path"])) for e in entries]
    other = [e for e, m in data if m is None]
    return ([e for e, m in data if m is not None and int(m.group(1)) % world == rank]
            + other[rank::world])
