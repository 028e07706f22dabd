"""Checkpoint saving that overlaps training: megatron-core's async ``dist_checkpointing``.

:class:`CheckpointSaver` is the trainer's one handle on saving, synchronous or asynchronous
(``checkpoint.async_save``). An async save of step N:

1. *blocking, in the step loop*: build the sharded state dict, plan the torch_dist write
   (``dist_checkpointing.save(..., async_sharded_save=True)``; rank 0 writes ``common.pt``),
   write this rank's ``rank_XXXXX.pt`` (RNG states and loader position *of step N*), then
   megatron's ``AsyncCallsQueue`` forks the writer. On CPU the fork is the snapshot: the child
   sees the tensors as they were at step N (copy-on-write) while the parent trains on; on GPU
   megatron's ``preload_fn`` copies them to host memory first.
2. *in the background*: the forked process writes the tensors (one thread per bucket file,
   each byte hashed as it is written, fsync; ``hashed_io.py``), hashes this rank's small files
   (its rank file, rank 0's ``common.pt``) and leaves the hashes in a sidecar file.
3. *blocking, at a later step boundary* (``poll`` finds every rank's writer done, one small
   all-reduce per step while a save is in flight): megatron's finalize (``.metadata``,
   ``metadata.json``), then ours: the ranks' hashes are gathered and rank 0 writes the
   manifest and renames ``.tmp-step_N-*`` to ``step_N`` -- exactly the synchronous path's last
   phase (``dist.complete_save``). Until then ``step_N`` does not exist, so a crash or a kill
   mid-write leaves the previous complete checkpoint as the newest one resume finds.

At most one save is in flight: a new save (or :meth:`finish`) first waits for the previous
one. The time each save blocked the step loop (1 + polls + 3) is measured and reported.
"""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.strategies.async_utils import AsyncCallsQueue
from megatron.core.dist_checkpointing.strategies.common import COMMON_STATE_FNAME

from megatron_vlm.checkpoint.dist import (
    Layout,
    PendingSave,
    _all_gather_json,
    begin_save,
    complete_save,
    rank_file,
    save_checkpoint,
    wait_for_pruning,
    write_rank_state,
)
from megatron_vlm.checkpoint.manifest import CheckpointError, file_entries
from megatron_vlm.checkpoint.megatron_io import (
    AsyncTorchDistSaveStrategy,
    shutdown_results_queue,
    without_psutil,
    write_results_queue,
)

logger = logging.getLogger(__name__)


@dataclass
class SaveReport:
    """One finished save, as the trainer logs it."""

    step: int
    """The step the checkpoint holds."""
    path: Path
    """The complete checkpoint directory."""
    async_save: bool
    blocked_s: float
    """Seconds the training process spent in this save: schedule + polls + wait + finalize."""
    schedule_s: float
    """Async: state dict, plan, common/rank files and fork; sync: the whole save."""
    finalize_s: float
    """Async: megatron's finalize + gather of hashes + manifest + rename + prune."""
    write_start_unix: float
    """When this rank's background writer started (sync: when the save started)."""
    write_end_unix: float
    """When it had written and hashed its files."""
    finalized_unix: float
    """When the checkpoint became complete (renamed into place)."""
    wait_s: float = 0.0
    """Async: time spent waiting for the writer in a blocking finish (a new save while this one
    was still writing, a stop, the end of training)."""

    def metrics(self) -> dict[str, float]:
        return {"blocked_s": self.blocked_s, "schedule_s": self.schedule_s,
                "finalize_s": self.finalize_s, "wait_s": self.wait_s,
                "async": float(self.async_save),
                "write_s": self.write_end_unix - self.write_start_unix,
                "write_start_unix": self.write_start_unix, "write_end_unix": self.write_end_unix,
                "finalized_unix": self.finalized_unix}


@dataclass
class _InFlight:
    pending: PendingSave
    schedule_s: float
    poll_s: float = 0.0
    finalize_start: float | None = None
    """perf_counter when the finalize steps (megatron's, then ours) began."""
    report: SaveReport | None = None
    """Set by the finalize step once the checkpoint is complete."""


WRITER_NICE = 10
"""Niceness added to the forked writer, so on cores shared with training (or with other jobs)
the step loop wins and the write takes longer instead."""


def _sidecar(tmp: Path, rank: int) -> Path:
    return tmp / f".write_rank_{rank:05d}.json"


def _write_then_hash(write_fn, tmp: str, small: list[str], digests: dict, data: list[str],
                     sidecar: str, *args, **kwargs):
    """Runs in the forked writer: megatron's buckets, hashed while written (into ``digests``),
    then the hashes of this rank's small files; every entry -> sidecar."""
    start = time.time()
    record: dict[str, Any] = {"write_start_unix": start}
    try:
        os.nice(WRITER_NICE)  # this forked process only: training keeps the CPU when contended
    except OSError:
        pass
    try:
        with without_psutil():
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


class CheckpointSaver:
    """Saves checkpoints under ``root``, synchronously or overlapping training.

    Every method is collective (all ranks call it at the same step).

    Args:
        root: checkpoint root (``root/step_XXXXXXX``).
        keep_last: complete checkpoints kept.
        async_save: write in the background (megatron's ``AsyncCallsQueue``).
        layout: this run's parallel sizes for the manifests (``Runtime.layout()``; None: those
            of the process groups this process made, ``dist.Layout``).
    """

    def __init__(self, root: Path, keep_last: int, async_save: bool,
                 layout: Layout | None = None) -> None:
        self.root = Path(root)
        self.keep_last = keep_last
        self.async_save = async_save
        self.layout = layout
        self._queue: AsyncCallsQueue | None = None
        self._in_flight: _InFlight | None = None
        if async_save:
            # Start the writers' result queue now (a process start-up, ~1 s), not at the
            # first save inside the step loop.
            write_results_queue()
            self._queue = AsyncCallsQueue(persistent=False)  # fork per save (TemporalAsyncCaller)

    @property
    def in_flight(self) -> bool:
        return self._in_flight is not None

    def save(self, step: int, model_chunks: list, optimizer, scheduler, extra: dict,
             config_yaml: str) -> list[SaveReport]:
        """Save ``step``. Synchronous: returns its report. Async: returns the report of a
        previous save that had to be finished first (if any); this one is reported later by
        :meth:`poll` or :meth:`finish`."""
        if not self.async_save:
            t0, start = time.perf_counter(), time.time()
            path = save_checkpoint(self.root, step, model_chunks, optimizer, scheduler, extra,
                                   config_yaml, keep_last=self.keep_last, layout=self.layout)
            dt, end = time.perf_counter() - t0, time.time()
            return [SaveReport(step=step, path=path, async_save=False, blocked_s=dt, schedule_s=dt,
                               finalize_s=0.0, write_start_unix=start, write_end_unix=end,
                               finalized_unix=end)]
        done = self.finish()
        t0 = time.perf_counter()
        pending = begin_save(self.root, step, model_chunks, optimizer, scheduler, extra,
                             config_yaml, self.keep_last, self.layout)
        strategy = AsyncTorchDistSaveStrategy()
        request = dist_checkpointing.save(
            pending.state, str(pending.tmp), sharded_strategy=strategy, async_sharded_save=True)
        pending.state = {}  # the request holds what it writes; drop our references
        write_rank_state(pending)
        small = [rank_file(pending.rank)]
        if pending.rank == 0:
            small.append(COMMON_STATE_FNAME)  # written by dist_checkpointing.save above
        data = []
        if request.async_fn is not None:
            data = [bucket[1] for bucket in request.async_fn_args[1]]  # (path, name, data)
        request = request._replace(async_fn=partial(
            _write_then_hash, request.async_fn, str(pending.tmp), small, strategy.digests, data,
            str(_sidecar(pending.tmp, pending.rank))))
        flight = _InFlight(pending, schedule_s=0.0)
        request.finalize_fns.insert(0, partial(_mark_finalize_start, flight))
        request.add_finalize_fn(partial(_finalize, flight))
        self._queue.schedule_async_request(request)
        flight.schedule_s = time.perf_counter() - t0
        self._in_flight = flight
        return done

    def poll(self) -> list[SaveReport]:
        """At a step boundary: complete the save in flight if every rank's writer is done."""
        return self._drain(blocking=False)

    def finish(self) -> list[SaveReport]:
        """Wait for the save in flight (if any) and complete it."""
        return self._drain(blocking=True)

    def close(self) -> None:
        """Finish, wait for pruning, then stop the async machinery (the writers' result
        queue)."""
        self.finish()
        wait_for_pruning()
        if self._queue is not None:
            self._queue.close()
            shutdown_results_queue()
            self._queue = None

    # --- internals ------------------------------------------------------------------------

    def _drain(self, blocking: bool) -> list[SaveReport]:
        flight = self._in_flight
        if flight is None:
            return []
        start = time.perf_counter()
        try:
            self._queue.maybe_finalize_async_calls(blocking=blocking)
        except CheckpointError:
            self._in_flight = None
            raise
        except Exception as e:  # megatron's CheckpointException: a writer failed on some rank
            self._in_flight = None
            raise CheckpointError(f"async save of step {flight.pending.step} into "
                                  f"{flight.pending.tmp} failed: {type(e).__name__}: {e}") from e
        spent = time.perf_counter() - start
        if flight.report is None:  # still writing: only the check's all-reduce blocked us
            flight.poll_s += spent
            return []
        self._in_flight = None
        report = flight.report
        report.wait_s = max(0.0, flight.finalize_start - start) if blocking else 0.0
        report.blocked_s = flight.schedule_s + flight.poll_s + spent
        return [report]


def _mark_finalize_start(flight: _InFlight) -> None:
    flight.finalize_start = time.perf_counter()


def _finalize(flight: _InFlight) -> None:
    """megatron's finalize has run on every rank (``.metadata``, ``metadata.json``); now ours:
    gather the writers' hashes, manifest, rename, prune."""
    pending = flight.pending
    sidecar = _sidecar(pending.tmp, pending.rank)
    try:
        record = json.loads(sidecar.read_text())
        sidecar.unlink()
    except (OSError, json.JSONDecodeError) as e:
        record = {"error": f"no hashes from the writer ({sidecar}): {e}"}
    errors = [r for r in _all_gather_json(record.get("error")) if r]
    if errors:
        raise CheckpointError(f"async save of step {pending.step} into {pending.tmp} "
                              f"failed: {errors[0]}")
    entries = record["entries"]
    if pending.rank == 0:  # written by megatron's finalize steps, after the writers
        done = {e["path"] for e in entries}
        rest = [f for f in (".metadata", "metadata.json") if f not in done]
        entries += file_entries(pending.tmp, rest, fsync=True)
    path = complete_save(pending, entries)
    flight.report = SaveReport(
        step=pending.step, path=path, async_save=True, blocked_s=0.0,
        schedule_s=flight.schedule_s, finalize_s=time.perf_counter() - flight.finalize_start,
        write_start_unix=record["write_start_unix"], write_end_unix=record["write_end_unix"],
        finalized_unix=time.time())
