"""Checkpoint bytes hashed on the way: sha256 while writing, and verification beside the load.

Hashing was a second pass over every byte after a save (and before a load); on a few cores that
pass cost as much as the write itself. Here:

* **save**: each data file of a rank's torch_dist buckets is written through
  :class:`HashingWriter` (every byte hashed as it goes to the file, no re-read), one thread per
  bucket file (:data:`WRITE_THREADS`); :func:`write_buckets` returns megatron's write results and
  fills a ``{relative path: manifest entry}`` dict.
* **load**: :func:`read_data_hashed` is torch DCP's ``FileSystemReader.read_data`` reading each
  data file once, front to back, hashing every byte it reads (gaps and the tail included) for
  the files this rank verifies; :class:`BackgroundHasher` hashes the small files (and any data
  file the read did not cover) in a thread meanwhile. One read of the bytes, no second pass;
  the digests are compared before any loaded state reaches the live model or optimizer.
"""

from __future__ import annotations

import hashlib
import inspect
import io
import os
import threading
from collections.abc import Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch
from torch.distributed._shard._utils import narrow_tensor_by_index
from torch.distributed.checkpoint.filesystem import _write_item
from torch.distributed.checkpoint.planner import LoadItemType

from megatron_vlm.checkpoint.manifest import sha256_file

WRITE_THREADS = 2
"""Data files per rank, each written (and hashed) by its own thread. Both save paths (sync and
async) use it, so their checkpoints have the same files."""

_SERIALIZATION_KWARGS: dict[str, Any] = {}
if "serialization_format" in inspect.signature(_write_item).parameters:
    from torch.distributed.checkpoint.filesystem import SerializationFormat

    _SERIALIZATION_KWARGS["serialization_format"] = SerializationFormat.TORCH_SAVE


class HashingWriter:
    """A write-only stream over an open binary file that hashes every byte written.

    Only sequential writes (``write``/``tell``/``flush``): a seek would make the digest differ
    from the file, so it raises.
    """

    def __init__(self, raw) -> None:
        self.raw = raw
        self.size = 0
        self._hash = hashlib.sha256()

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        n = self.raw.write(view)
        if n is not None and n != view.nbytes:
            raise OSError(f"short write to {self.raw.name}: {n} of {view.nbytes} bytes")
        self._hash.update(view)
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
    entry = {"path": Path(file_name).name, "size": stream.size, "sha256": stream.hexdigest()}
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


class BackgroundHasher:
    """sha256 of some files of a checkpoint, computed in threads from construction on.

    Args:
        ckpt_dir: the checkpoint directory.
        entries: manifest entries (``path``, ``sha256``) to check.
        skip: paths among ``entries`` hashed elsewhere (the hashing read); their digests come
            to :meth:`problems`.
        threads: hashing threads (default: half the CPUs this process may use, at least 1, so
            the load keeps the rest).
    """

    def __init__(self, ckpt_dir: Path, entries: list[dict], threads: int | None = None,
                 skip: Iterable[str] = ()) -> None:
        self.ckpt_dir = Path(ckpt_dir)
        self.all_entries = list(entries)
        skip = set(skip)
        self.entries = [e for e in entries if e["path"] not in skip]
        if threads is None:
            threads = max(1, _cpus() // 2)
        self._pool = ThreadPoolExecutor(max_workers=max(1, min(threads, len(self.entries) or 1)),
                                        thread_name_prefix="ckpt-verify")
        # Largest first, so the threads finish together.
        order = sorted(self.entries, key=lambda e: -e.get("size", 0))
        self._futures: dict[str, Future] = {
            e["path"]: self._pool.submit(sha256_file, self.ckpt_dir / e["path"]) for e in order}
        self._lock = threading.Lock()

    def problems(self, known: dict[str, str] | None = None) -> list[str]:
        """Wait for every digest; one message per file whose sha256 differs from the manifest
        (or that could not be read). ``known``: digests computed elsewhere (by the hashing
        read) for entries this hasher was not given; any other entry of theirs is hashed now."""
        known = dict(known or {})
        with self._lock:
            for e in self.entries:
                try:
                    known[e["path"]] = self._futures[e["path"]].result()
                except OSError as err:
                    known[e["path"]] = f"unreadable ({err})"
            self._pool.shutdown(wait=True)
        return mismatches(self.ckpt_dir, self.all_entries, known)


def mismatches(ckpt_dir: Path, entries: list[dict], digests: dict[str, str]) -> list[str]:
    """One message per entry whose digest (from ``digests``, else hashed now) is not the
    manifest's."""
    out = []
    for e in entries:
        p = Path(ckpt_dir) / e["path"]
        digest = digests.get(e["path"])
        if digest is None:
            try:
                digest = sha256_file(p)
            except OSError as err:
                digest = f"unreadable ({err})"
        if digest != e["sha256"]:
            out.append(f"sha256 mismatch for {p}: {digest[:16]}..., "
                       f"manifest says {e['sha256'][:16]}...")
    return out

_SKIP_CHUNK = 1 << 24


def _hash_through(stream, h, nbytes: int | None) -> int:
    """Read ``nbytes`` (None: to EOF) from ``stream`` into ``h``; bytes read."""
    done = 0
    while nbytes is None or done < nbytes:
        want = _SKIP_CHUNK if nbytes is None else min(_SKIP_CHUNK, nbytes - done)
        chunk = stream.read(want)
        if not chunk:
            break
        h.update(chunk)
        done += len(chunk)
    return done


def read_files_hashed(reader, paths: dict[str, Any], reqs: dict[str, list],
                      planner) -> dict[str, str]:
    """:func:`read_file_hashed` for several files, one thread each (hashing and reading release
    the GIL, so files overlap); ``{relative path: sha256}``."""
    if not reqs:
        return {}
    lock = threading.Lock()
    with ThreadPoolExecutor(max_workers=min(len(reqs), _cpus()),
                            thread_name_prefix="ckpt-read") as pool:
        futures = {rel: pool.submit(read_file_hashed, reader, paths[rel], items, planner, lock)
                   for rel, items in reqs.items()}
        return {rel: fut.result() for rel, fut in futures.items()}


def _cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 2


class _MemoryReader(io.RawIOBase):
    """A seekable read-only stream over a memoryview, without copying it (``io.BytesIO`` of a
    bytearray would); ``readinto`` lets torch.load copy straight into its storage."""

    def __init__(self, view: memoryview) -> None:
        super().__init__()
        self._view, self._pos = view, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        n = max(0, min(len(b), len(self._view) - self._pos))
        memoryview(b).cast("B")[:n] = self._view[self._pos:self._pos + n]
        self._pos += n
        return n

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: len(self._view)}[whence]
        self._pos = base + offset
        return self._pos

    def tell(self) -> int:
        return self._pos


def _load_item(reader, req, item_md, raw: memoryview, planner, lock) -> None:
    """torch 2.13 ``FileSystemReader.read_data``'s per-item body, from bytes in memory."""
    source = reader.transforms.transform_load_stream(
        req, item_md.transform_descriptors or (), _MemoryReader(raw))
    if req.type == LoadItemType.BYTE_IO:
        data = io.BytesIO(source.read(-1))
        with lock:
            planner.load_bytes(req, data)
        return
    if not source.seekable():
        source = io.BytesIO(source.read(-1))
    tensor = torch.load(source, map_location="cpu", weights_only=True)
    tensor = narrow_tensor_by_index(tensor, req.storage_offsets, req.lengths)
    with lock:  # the planner is not thread-safe (megatron's FP8 resolve/commit pair)
        target = planner.resolve_tensor(req).detach()
        if target.size() != tensor.size():
            raise AssertionError(
                f"req {req.storage_index} mismatch sizes {target.size()} vs {tensor.size()}")
        target.copy_(tensor)
        planner.commit_tensor(req, target)


def read_file_hashed(reader, path, reqs: list, planner, lock=None) -> str:
    """Serve ``reqs`` (one file's read items) reading the file once, front to back, and return
    the sha256 of all its bytes."""
    h = hashlib.sha256()
    pos, last = 0, (None, memoryview(b""))
    reqs = sorted(reqs, key=lambda r: reader.storage_data[r.storage_index].offset)
    # One buffer for all items (no fresh pages per item), as large as the largest.
    buf = bytearray(max(reader.storage_data[r.storage_index].length for r in reqs))
    with open(path, "rb", buffering=0) as stream:
        for req in reqs:
            md = reader.storage_data[req.storage_index]
            key = (md.offset, md.length)
            if key != last[0]:  # several requests may share one stored item (resharding)
                if md.offset < pos:
                    raise OSError(f"{path}: overlapping items at offset {md.offset}")
                pos += _hash_through(stream, h, md.offset - pos)
                raw = memoryview(buf)[:md.length]
                got = 0
                while got < md.length:
                    n = stream.readinto(raw[got:])
                    if not n:
                        raise OSError(f"{path}: item at {md.offset} cut short")
                    got += n
                h.update(raw)
                pos += md.length
                last = (key, raw)
            _load_item(reader, req, md, last[1], planner, lock or threading.Lock())
        _hash_through(stream, h, None)
    return h.hexdigest()
