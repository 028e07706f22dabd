"""Checkpoint saving that overlaps training: megatron-core's async ``dist_checkpointing``.

:class:`CheckpointSaver` is the trainer's one handle on saving, synchronous or asynchronous
(``checkpoint.async_save``). An async save of step N:

1. *blocking, in the step loop*: build the sharded state dict, plan the torch_dist write
   (``dist_checkpointing.save(..., async_sharded_save=True)``; rank 0 writes ``common.pt``),
   write this rank's ``rank_XXXXX.pt`` (RNG states and loader position *of step N*), then copy
   this rank's tensors into the staging buffer shared with the writer process (the snapshot:
   training may change them from here on) and hand it the request (``async_writer.py``).
2. *in the background*: the writer process -- one per trainer, started with the saver, at
   lower priority -- writes the tensors (one thread per bucket file, each byte hashed as it is
   written, fsync; ``hashed_io.py``), hashes this rank's small files (its rank file, rank 0's
   ``common.pt``) and leaves the hashes in a sidecar file.
3. *blocking, at a later step boundary* (``poll`` finds every rank's writer done, one small
   all-reduce per step while a save is in flight): megatron's finalize (``.metadata``,
   ``metadata.json``), then ours: the ranks' hashes are gathered and rank 0 writes the
   manifest and renames ``.tmp-step_N-*`` to ``step_N`` -- exactly the synchronous path's last
   phase (``dist.complete_save``). Until then ``step_N`` does not exist, so a crash or a kill
   mid-write leaves the previous complete checkpoint as the newest one resume finds.

At most one save is in flight: a new save (or :meth:`finish`) first waits for the previous
one. The time each save blocked the step loop (1 + polls + 3) is measured and reported.

The writer used to be forked per save (megatron's ``TemporalAsyncCaller``): a free snapshot,
but every page the trainer touched afterwards took a copy-on-write fault, which made the tiny
run's steps ~2x slower while a write was in flight (``benchmarks/checkpoint_io.py``).
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import queue
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from functools import partial
from multiprocessing.connection import Connection
from multiprocessing.reduction import send_handle
from pathlib import Path

from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.strategies.async_utils import (
    AsyncCaller,
    AsyncCallsQueue,
    AsyncRequest,
)
from megatron.core.dist_checkpointing.strategies.common import COMMON_STATE_FNAME

from megatron_vlm.checkpoint.async_writer import (
    RESULTS_PLACEHOLDER,
    StagingBuffer,
    sidecar_path,
    stage,
    stage_size,
    write_then_hash,
)
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
from megatron_vlm.checkpoint.megatron_io import AsyncTorchDistSaveStrategy

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
    """Async: state dict, plan, common/rank files and staging copy; sync: the whole save."""
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


class WriterProcess(AsyncCaller):
    """megatron ``AsyncCaller`` running every request in one persistent writer process (see the
    module docstring). At most one request in flight (``CheckpointSaver`` waits for the previous
    one before staging the next: the buffer is reused)."""

    def __init__(self) -> None:
        self._start()
        self._results: queue.Queue | None = None
        self._call_idx: int | None = None
        self._reply: tuple | None = None
        self.stage_s = 0.0
        """Seconds the last request spent copying tensors into the staging buffer."""

    def _start(self) -> None:
        parent, child = socket.socketpair()
        env = dict(os.environ, OMP_NUM_THREADS="1")
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "megatron_vlm.checkpoint.async_writer", str(child.fileno())],
            pass_fds=[child.fileno()], env=env, stdin=subprocess.DEVNULL)
        child.close()
        self._conn = Connection(parent.detach())
        # The writer unpickles requests whose functions live in modules this process imported.
        self._conn.send(("hello", list(sys.path)))
        self._staging: StagingBuffer | None = None

    # --- AsyncCaller ---------------------------------------------------------------------

    def schedule_async_call(self, async_req: AsyncRequest) -> None:
        if async_req.async_fn is None:
            return
        if self._call_idx is not None:
            raise RuntimeError("a checkpoint write is still in flight")
        if self._proc.poll() is not None:  # the writer died (killed?): a new one
            logger.warning("checkpoint writer process exited with %s; starting a new one",
                           self._proc.returncode)
            self._conn.close()
            if self._staging is not None:
                self._staging.close()
            self._start()
        args, results = list(async_req.async_fn_args), None
        t0 = time.perf_counter()
        if args:  # megatron's (rank, write buckets, results queue); none: nothing to write
            rank, buckets, results = args
            need = stage_size(buckets)
            if self._staging is None or self._staging.nbytes < need:
                if self._staging is not None:
                    self._staging.close()
                self._staging = StagingBuffer(need)
                self._conn.send(("staging", self._staging.nbytes))
                send_handle(self._conn, self._staging.fd, self._proc.pid)
            args = [rank, stage(buckets, self._staging), RESULTS_PLACEHOLDER]
        self.stage_s = time.perf_counter() - t0
        payload = pickle.dumps((async_req.async_fn, args, async_req.async_fn_kwargs))
        self._conn.send(("write", async_req.call_idx, payload))
        self._results, self._call_idx, self._reply = results, async_req.call_idx, None

    def is_current_async_call_done(self, blocking: bool = False, no_dist: bool = False) -> bool:
        alive = self._call_idx is not None and not self._collect(blocking)
        done = not alive if no_dist else self.sync_all_async_calls(int(alive))
        if done and self._call_idx is not None:
            self._deliver()
        return bool(done)

    def close(self, abort: bool = False) -> None:
        if self._proc is None:
            return
        if abort:
            self._proc.kill()
        else:
            try:
                self._conn.send(("stop",))
            except OSError:
                pass
        self._proc.wait()
        self._conn.close()
        if self._staging is not None:
            self._staging.close()
        self._proc = self._staging = None

    def __del__(self) -> None:
        pass  # close() is explicit (CheckpointSaver.close); the writer exits on EOF otherwise

    # --- internals -----------------------------------------------------------------------

    def _collect(self, blocking: bool) -> bool:
        """Whether the writer has answered the request in flight (waits if ``blocking``)."""
        if self._reply is not None:
            return True
        if not blocking and not self._conn.poll():
            return False
        try:
            self._reply = self._conn.recv()
        except EOFError:
            code = self._proc.wait()
            self._reply = ("dead", self._call_idx,
                           [RuntimeError(f"checkpoint writer process exited with {code}")])
        return True

    def _deliver(self) -> None:
        """Hand the writer's results to megatron's finalize (the writer object's queue)."""
        self._collect(blocking=True)
        _, _, results = self._reply
        for r in results:
            if self._results is not None:
                self._results.put(r)
            else:  # nothing to write here; a failure still shows as a missing sidecar
                logger.error("checkpoint writer: %r", r)
        self._results = self._call_idx = self._reply = None



class CheckpointSaver:
    """Saves checkpoints under ``root``, synchronously or overlapping training.

    Every method is collective (all ranks call it at the same step).

    Args:
        root: checkpoint root (``root/step_XXXXXXX``).
        keep_last: complete checkpoints kept.
        async_save: write in the background (megatron's ``AsyncCallsQueue`` with our writer
            process, ``async_writer.WriterProcess``, started here).
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
        self._writer: WriterProcess | None = None
        self._in_flight: _InFlight | None = None
        if async_save:
            # Started now (an interpreter start-up, in the background), not at the first save.
            self._writer = WriterProcess()
            self._queue = AsyncCallsQueue(persistent=True)
            self._queue.persistent_caller = self._writer

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
            write_then_hash, request.async_fn, str(pending.tmp), small, strategy.digests, data,
            str(sidecar_path(pending.tmp, pending.rank))))
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
            self._queue.close()  # and the writer process
            self._queue = self._writer = None

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
    sidecar = sidecar_path(pending.tmp, pending.rank)
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
