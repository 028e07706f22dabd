"""The background checkpoint writer: one process per trainer, started once, fed a staged copy.

An async save used to fork a writer per save (megatron's ``TemporalAsyncCaller``): the fork was a
free snapshot, but it write-protected the trainer's whole address space, so every page the next
steps touched took a copy-on-write fault (measured: ~5,000 faults and +70% CPU per step of the
tiny run while a writer was alive). Here instead:

* ``async_save.WriterProcess`` starts one writer at construction: a fresh interpreter
  (``python -m megatron_vlm.checkpoint.async_writer``, nothing inherited, ``__main__`` never
  re-imported), at lower priority (:data:`WRITER_NICE`), blind to SIGTERM/SIGUSR1/SIGINT (a
  preemption signal to the trainer's process group must not kill the write in flight; it ends
  when the trainer closes it or its socket closes).
* the snapshot is a copy of this rank's tensors into a shared staging buffer (a ``memfd``
  mapped by both processes, allocated at the first save, grown when needed, reused), blocking,
  at memory speed; the write request (megatron's ``AsyncRequest`` minus the tensors, which the
  writer rebuilds over the buffer) goes through a socket.
* the writer runs the request's function, then reports megatron's write results back; the
  trainer puts them into the writer object's result queue (a plain ``queue.Queue``), where
  megatron's finalize step reads them. No multiprocessing Manager is involved.

:class:`~megatron_vlm.checkpoint.async_save.WriterProcess` (the trainer's side) is a megatron
``AsyncCaller``, so megatron's ``AsyncCallsQueue`` keeps its protocol: the done-check is one
all-reduce per poll and finalize runs on every rank. This module is the writer's side and what
both sides share; it imports torch but not megatron (the writer starts in ~2 CPU-s, not ~7).
"""

from __future__ import annotations

import json
import mmap
import os
import pickle
import queue
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from multiprocessing.connection import Connection
from multiprocessing.reduction import recv_handle
from pathlib import Path
from typing import Any

import torch

from megatron_vlm.checkpoint import hashed_io
from megatron_vlm.checkpoint.manifest import CheckpointError, file_entries

WRITER_NICE = 10
"""Niceness of the writer process: on cores shared with training (or with other jobs) the step
loop wins and the write takes longer instead."""

_ALIGN = 64
RESULTS_PLACEHOLDER = "<the writer's result queue>"
"""Stands in for megatron's result queue in a write request (the writer fills its own)."""


class _Staged:
    """Stands in for a tensor in a write request: where its bytes lie in the staging buffer."""

    __slots__ = ("offset", "nbytes", "dtype", "size", "stride")

    def __init__(self, offset: int, nbytes: int, dtype: torch.dtype, size: tuple,
                 stride: tuple) -> None:
        self.offset, self.nbytes, self.dtype = offset, nbytes, dtype
        self.size, self.stride = size, stride

    def __getstate__(self):
        return (self.offset, self.nbytes, self.dtype, self.size, self.stride)

    def __setstate__(self, state) -> None:
        self.offset, self.nbytes, self.dtype, self.size, self.stride = state


def _layout(t: torch.Tensor) -> tuple[tuple, tuple]:
    """Size and strides of the staged copy: the tensor's own where it covers its storage
    densely (so ``torch.save`` writes the same bytes as from the original), else contiguous."""
    size = tuple(t.shape)
    dense = (t.storage_offset() == 0
             and t.untyped_storage().nbytes() == t.numel() * t.element_size())
    return size, tuple(t.stride()) if dense else tuple(torch.empty(size, device="meta").stride())


class StagingBuffer:
    """A shared, reusable byte buffer (``memfd``), mapped here and by the writer."""

    def __init__(self, nbytes: int) -> None:
        self.nbytes = max(nbytes, _ALIGN)
        self.fd = os.memfd_create("megatron-vlm-ckpt-staging", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, self.nbytes)
        self.map = mmap.mmap(self.fd, self.nbytes)
        self.bytes = torch.frombuffer(self.map, dtype=torch.uint8)

    def close(self) -> None:
        del self.bytes
        self.map.close()
        os.close(self.fd)


def stage_size(buckets: list) -> int:
    total = 0
    for _, _, (_, tensor_data) in buckets:
        for _, t in tensor_data:
            total += -(-t.numel() * t.element_size() // _ALIGN) * _ALIGN
    return total


COPY_THREADS = 4
"""At most this many threads copy tensors into the staging buffer (fewer where this process may
use fewer CPUs): the copy blocks the step loop and is memory-bound, so it scales with threads
until the memory bandwidth is used (measured on 2 cores, 425 MB: 1.9x with 2 threads)."""


def stage(buckets: list, staging: StagingBuffer) -> list:
    """Copy every tensor of megatron's write buckets into ``staging`` (several threads); the
    buckets with each tensor replaced by its :class:`_Staged` place."""
    out, copies, offset = [], [], 0
    for file_name, storage_key, (bytes_data, tensor_data) in buckets:
        placed = []
        for item, t in tensor_data:
            nbytes = t.numel() * t.element_size()
            size, stride = _layout(t)
            if nbytes:
                dst = staging.bytes[offset:offset + nbytes].view(t.dtype).as_strided(size, stride)
                copies.append((dst, t.detach()))
            placed.append((item, _Staged(offset, nbytes, t.dtype, size, stride)))
            offset += -(-nbytes // _ALIGN) * _ALIGN
        out.append((file_name, storage_key, (list(bytes_data), placed)))
    _copy_all(copies)
    return out


def _copy_all(copies: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
    """``dst.copy_(src)`` for each pair, the pairs split by size over up to
    :data:`COPY_THREADS` threads (``copy_`` releases the GIL)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else 1
    n = max(1, min(COPY_THREADS, cpus, len(copies)))
    shares: list[list] = [[] for _ in range(n)]
    loads = [0] * n
    for dst, src in sorted(copies, key=lambda c: -c[0].numel() * c[0].element_size()):
        i = loads.index(min(loads))
        shares[i].append((dst, src))
        loads[i] += dst.numel() * dst.element_size()

    def run(share: list) -> None:
        for dst, src in share:
            dst.copy_(src)

    if n == 1:
        run(shares[0])
        return
    with ThreadPoolExecutor(max_workers=n, thread_name_prefix="ckpt-stage") as pool:
        list(pool.map(run, shares))


def _unstage(buckets: list, view: mmap.mmap | None) -> list:
    """In the writer: the buckets with tensors over the staging buffer (each its own storage
    of exactly its bytes, as ``torch.save`` writes whole storages)."""
    out = []
    for file_name, storage_key, (bytes_data, placed) in buckets:
        tensors = []
        for item, s in placed:
            if s.nbytes:
                raw = torch.frombuffer(view, dtype=torch.uint8, count=s.nbytes, offset=s.offset)
                t = raw.view(s.dtype).as_strided(s.size, s.stride)
            else:
                t = torch.empty(s.size, dtype=s.dtype)
            tensors.append((item, t))
        out.append((file_name, storage_key, (bytes_data, tensors)))
    return out


def write_buckets_to_queue(transform_list: list, digests: dict, rank: int, write_buckets: list,
                           results_queue: queue.Queue) -> None:
    """Stand-in for ``FileSystemWriterAsync.write_preloaded_data_multiproc`` (both save paths):
    the same result protocol, the buckets written by threads of this process, each file hashed
    as it is written (``hashed_io.write_buckets``; its manifest entry lands in ``digests``)."""
    # An exception goes into the queue, as from megatron's workers: its finalize step then
    # reports the failure on every rank instead of leaving the others in a collective.
    results_queue.put(hashed_io.write_buckets(transform_list, write_buckets, digests))


def sidecar_path(tmp: Path, rank: int) -> Path:
    """Where the writer leaves this rank's manifest entries and write times."""
    return Path(tmp) / f".write_rank_{rank:05d}.json"


def write_then_hash(write_fn, tmp: str, small: list[str], digests: dict, data: list[str],
                    sidecar: str, *args, **kwargs) -> None:
    """Runs in the writer process: megatron's buckets, hashed while written (into
    ``digests``), then the hashes of this rank's small files; every entry -> sidecar."""
    start = time.time()
    record: dict[str, Any] = {"write_start_unix": start}
    try:
        if write_fn is not None:
            write_fn(*args, **kwargs)  # failures go to megatron's result queue
        missing = [name for name in data if name not in digests]
        if missing:
            raise CheckpointError(f"no digest for data files {missing} (write failed)")
        record["entries"] = ([digests[name] for name in data]
                             + file_entries(Path(tmp), small, fsync=True))
    except Exception as e:  # noqa: BLE001 -- reported by the finalize step on every rank
        record["error"] = f"{type(e).__name__}: {e}"
    record["write_end_unix"] = time.time()
    part = Path(sidecar + ".part")
    part.write_text(json.dumps(record))
    os.replace(part, sidecar)


def _serve(conn: Connection) -> None:
    """The writer's loop: staging buffers and write requests until "stop" or EOF."""
    view = None
    while True:
        try:
            msg = conn.recv()
        except EOFError:
            return
        if msg[0] == "stop":
            return
        if msg[0] == "hello":
            sys.path[:] = msg[1] + [p for p in sys.path if p not in msg[1]]
        elif msg[0] == "staging":
            fd = recv_handle(conn)
            view = mmap.mmap(fd, msg[1])
            os.close(fd)
        elif msg[0] == "write":
            _, call_idx, payload = msg
            local: queue.Queue = queue.Queue()
            try:
                fn, args, kwargs = pickle.loads(payload)
                if args:
                    args = [args[0], _unstage(args[1], view), local]
                fn(*args, **kwargs)
            except Exception as e:  # noqa: BLE001 -- reported through megatron's finalize
                local.put(e)
            results: list[Any] = []
            while not local.empty():
                results.append(local.get())
            try:
                conn.send(("done", call_idx, results))
            except (pickle.PicklingError, TypeError, AttributeError) as e:
                conn.send(("done", call_idx, [RuntimeError(f"{results!r:.2000} ({e})")]))


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGUSR1, signal.SIGINT})
    try:
        os.nice(WRITER_NICE)
    except OSError:
        pass
    torch.set_num_threads(1)
    _serve(Connection(int(argv[0])))


if __name__ == "__main__":
    main()
