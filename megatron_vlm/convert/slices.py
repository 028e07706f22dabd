"""Our checkpoint written by N independent processes (slices), then joined by a finishing step.

A checkpoint is megatron's torch_dist layout: ``__<r>_<t>.distcp`` data files, one pickled DCP
``.metadata`` (every tensor's chunks and, per chunk, the file, offset and length of its bytes),
``common.pt`` / ``metadata.json`` (megatron's) and our rank file and manifest. Nothing in it ties
a data file to a process, so slice ``i`` of ``N`` plans the whole save (the same plan in every
process: the model is built on the meta device, no communication) and writes only the tensors it
owns -- a contiguous, byte-balanced run of tensors (whole layers and experts) -- into files of
its own, ``__<i>_<t>.distcp``, in ``<root>/.parts-step_0000000/slice_<i>/`` (a folder every
slice computes alike, so separate hosts agree on it). Each slice writes with ``threads`` writer
threads (one file each) and reads the next tensor while writing the current one (copy-ahead);
every file's sha256 is computed from the bytes as they are written (no re-read) and kept with
its size in ``done.json``. :func:`finish_checkpoint` then joins the slices' storage records into
one ``.metadata``, moves the files into a temporary step directory, writes the rank file and the
manifest (the hashes from the slices) and renames the directory into place.

A finished slice returns at once when asked again (a re-queued SLURM task redoes nothing).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import pickle
import queue
import secrets
import shutil
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.strategies import torch as mcore_torch
from megatron.core.dist_checkpointing.strategies.base import SaveShardedStrategy
from torch import Tensor
from torch.distributed.checkpoint import save as dcp_save
from torch.distributed.checkpoint.filesystem import _StorageInfo, _StoragePrefix
from torch.distributed.checkpoint.planner import WriteItem, WriteItemType
from torch.distributed.checkpoint.storage import WriteResult
from torch.futures import Future

from megatron_vlm.convert.mcore import TensorSlot, _Writer, tensor_slots
from megatron_vlm.convert.rules import ConversionError

STEP_NAME = "step_0000000"
_DONE = "done.json"


def parts_dir(root: Path) -> Path:
    """Where the slices of ``root``'s step-0 checkpoint are staged (the same for every slice)."""
    return Path(root) / f".parts-{STEP_NAME}"


def slice_dir(root: Path, index: int) -> Path:
    return parts_dir(root) / f"slice_{index:05d}"


def parse_slice(text: str) -> tuple[int, int]:
    """``"3/8"`` -> ``(3, 8)``; ValueError naming ``--slice`` otherwise."""
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise ValueError(f"--slice {text!r}: write INDEX/COUNT, e.g. 0/4") from None
    if not 0 <= i < n:
        raise ValueError(f"--slice {text!r}: INDEX must be in [0, COUNT)")
    return i, n


def partition(sizes: list[int], count: int) -> list[range]:
    """``count`` contiguous index ranges of ``sizes`` with near-equal byte sums (some may be
    empty when there are fewer items than slices)."""
    total = sum(sizes)
    bounds, acc, k = [0], 0, 1
    for i, s in enumerate(sizes):
        acc += s
        while k < count and acc * count >= total * k:
            bounds.append(i + 1)
            k += 1
    bounds += [len(sizes)] * (count + 1 - len(bounds))
    return [range(bounds[j], bounds[j + 1]) for j in range(count)]


class HashingFile(io.RawIOBase):
    """A write-only file that sha256-hashes the bytes it is given in a thread of its own (the
    hash runs beside the write instead of after it), counts them, and fsyncs on :meth:`finish`.
    ``torch.save`` writes through it (it only needs ``write``). Large buffers are hashed in
    place: call :meth:`settle` before the memory written may change or be freed."""

    _COPY_BELOW = 1 << 20

    def __init__(self, path: Path) -> None:
        self._f = open(path, "wb", buffering=0)  # noqa: SIM115 (closed in finish/close)
        self._h = hashlib.sha256()
        self._q: queue.Queue = queue.Queue()
        self._hasher = threading.Thread(target=self._hash, daemon=True)
        self._hasher.start()
        self._small = bytearray()
        self.pos = 0

    def _hash(self) -> None:
        while True:
            b = self._q.get()
            if b is not None:
                self._h.update(b)
            self._q.task_done()
            if b is None:
                return

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        mv = memoryview(b).cast("B")
        n = len(mv)
        self.pos += n
        if n < self._COPY_BELOW:  # torch.save's many small records: gathered, written at once
            self._small += mv
            if len(self._small) >= self._COPY_BELOW:
                self._flush()
            return n
        self._flush()
        self._q.put(mv)
        self._write(mv)
        return n

    def _write(self, mv: memoryview) -> None:
        done = 0
        while done < len(mv):
            done += self._f.write(mv[done:])

    def _flush(self) -> None:
        if self._small:
            data = bytes(self._small)
            self._small.clear()
            self._q.put(data)
            self._write(memoryview(data))

    def tell(self) -> int:
        return self.pos

    def settle(self) -> None:
        """Wait until everything written so far is hashed."""
        self._q.join()

    def finish(self) -> dict:
        """fsync and close; ``{"size", "sha256"}`` of what was written."""
        self._flush()
        self._q.put(None)
        self._hasher.join()
        os.fsync(self._f.fileno())
        self._f.close()
        return {"size": self.pos, "sha256": self._h.hexdigest()}

    def close(self) -> None:
        if self._hasher.is_alive():
            self._q.put(None)
            self._hasher.join()
        if not self._f.closed:
            self._f.close()
        super().close()


def _own_storage(t: Tensor) -> Tensor:
    """``t`` if it is all of its storage (torch.save writes whole storages), else a copy."""
    if t.is_contiguous() and t.untyped_storage().nbytes() == t.nbytes and t.storage_offset() == 0:
        return t
    return t.clone(memory_format=torch.contiguous_format)


class _Stopped(ConversionError):
    """A writer thread stopped because another one failed."""


@dataclasses.dataclass
class _Unit:
    """One tensor of ours and the write items (chunks) it fills."""

    name: str
    items: list[WriteItem]
    nbytes: int


class _SliceWriter(_Writer):
    """DCP's filesystem writer for one slice: the plan is the whole checkpoint's; ``write_data``
    writes only this slice's units, with threads and copy-ahead, hashing as it writes."""

    def __init__(self, path: Path, index: int, count: int, slots: dict[str, TensorSlot],
                 produce: Callable[[str], Tensor | list[Tensor]], threads: int) -> None:
        super().__init__(str(path), single_file_per_rank=True, sync_files=True, thread_count=1)
        self.index, self.count, self.threads = index, count, max(1, threads)
        self._by_key = {(s.key, s.prepend): n for n, s in slots.items()}
        self._prepend = {s.key: len(s.prepend) for s in slots.values()}
        self._produce = produce
        self.files: dict[str, dict] = {}
        self.num_items = self.total_items = 0
        self._failed = threading.Event()

    def prepare_global_plan(self, plans):
        return [dataclasses.replace(p, storage_data=_StoragePrefix(f"__{self.index}_"))
                for p in plans]

    def _units(self, items: list[WriteItem]) -> tuple[list[WriteItem], list[_Unit]]:
        objects = [it for it in items if it.type == WriteItemType.BYTE_IO]
        units: dict[str, _Unit] = {}
        for it in items:
            if it.type == WriteItemType.BYTE_IO:
                continue
            p = self._prepend[it.index.fqn]
            name = self._by_key[(it.index.fqn, tuple(it.index.offset[:p]))]
            u = units.setdefault(name, _Unit(name, [], 0))
            u.items.append(it)
            chunk = it.tensor_data.chunk
            u.nbytes += torch.Size(chunk.sizes).numel() * it.tensor_data.properties.dtype.itemsize
        return objects, list(units.values())

    def write_data(self, plan, planner) -> Future:
        objects, units = self._units(plan.items)
        self.total_items = len(plan.items)
        mine = [units[i] for i in partition([u.nbytes for u in units], self.count)[self.index]]
        buckets = [[mine[i] for i in r]
                   for r in partition([u.nbytes for u in mine], self.threads)]
        prefix = plan.storage_data.prefix
        results: list[WriteResult] = []
        lock = threading.Lock()

        def run(t: int) -> None:
            name = f"{prefix}{t}.distcp"
            f = HashingFile(Path(self.path) / name)
            try:
                out = []
                if t == 0 and self.index == 0:  # megatron's objects (extra states): slice 0
                    for it in objects:
                        data = planner.resolve_data(it)
                        out.append(self._record(it, name, f.pos, f.write(data.getbuffer())))
                        f.settle()
                out += self._write_units(f, name, buckets[t])
                info = f.finish()
            except BaseException:
                self._failed.set()  # the other threads stop at their next tensor
                raise
            finally:
                f.close()
            with lock:
                results.extend(out)
                self.files[name] = info

        # torch.save's zip CRC32 halves its speed and nothing checks it (torch.load does not;
        # the manifest's sha256 covers every byte): off while this slice writes.
        crc = torch.serialization.get_crc32_options()
        torch.serialization.set_crc32_options(False)
        try:
            with ThreadPoolExecutor(len(buckets)) as pool:
                futures = [pool.submit(run, t) for t in range(len(buckets))]
        finally:
            torch.serialization.set_crc32_options(crc)
        errors = [f.exception() for f in futures if f.exception() is not None]
        if errors:  # the first cause, not a thread that stopped because of it
            raise next((e for e in errors if not isinstance(e, _Stopped)), errors[0])
        self.num_items = len(results)
        done: Future = Future()
        done.set_result(results)
        return done

    @staticmethod
    def _record(item: WriteItem, name: str, offset: int, length: int) -> WriteResult:
        return WriteResult(index=item.index, size_in_bytes=length,
                           storage_data=_StorageInfo(name, offset, length))

    def _chunks(self, unit: _Unit) -> list[Tensor]:
        """The unit's chunks, each with storage of its own (views where the bytes allow)."""
        made = self._produce(unit.name)
        blocks = made if isinstance(made, list) else [made]
        starts, row = [], 0
        for b in blocks:
            starts.append(row)
            row += b.shape[0]
        full = None
        out = []
        for it in unit.items:
            p = self._prepend[it.index.fqn]
            off, sizes = tuple(it.index.offset[p:]), tuple(it.tensor_data.chunk.sizes)
            for b, s in zip(blocks, starts):  # a chunk that is one block: no copy
                if (off[0] == s and all(o == 0 for o in off[1:])
                        and tuple(b.shape) == sizes[p:]):
                    out.append(_own_storage(b).reshape(sizes))
                    break
            else:
                if full is None:
                    full = blocks[0] if len(blocks) == 1 else torch.cat(blocks)
                index = tuple(slice(o, o + s) for o, s in zip(off, sizes[p:]))
                out.append(_own_storage(full[index]).reshape(sizes))
        return out

    def _write_units(self, f: HashingFile, name: str, units: list[_Unit]) -> list[WriteResult]:
        out = []
        with ThreadPoolExecutor(1) as ahead:  # copy-ahead: the next unit is read meanwhile
            nxt = ahead.submit(self._chunks, units[0]) if units else None
            for k, unit in enumerate(units):
                chunks = nxt.result()
                if self._failed.is_set():
                    raise _Stopped("stopped: another writer thread failed")
                nxt = ahead.submit(self._chunks, units[k + 1]) if k + 1 < len(units) else None
                for it, chunk in zip(unit.items, chunks):
                    start = f.pos
                    torch.save(chunk, f)
                    out.append(self._record(it, name, start, f.pos - start))
                f.settle()  # hashed: the chunks' memory may go
                del chunks
        return out


class _SliceStrategy(SaveShardedStrategy):
    """torch_dist save through :class:`_SliceWriter` (the plan of all, the bytes of one slice)."""

    def __init__(self, writer_args: dict) -> None:
        super().__init__("torch_dist", 1)
        self._args = writer_args
        self.writer: _SliceWriter | None = None

    @property
    def can_handle_sharded_objects(self) -> bool:
        return True

    def save(self, sharded_state_dict, checkpoint_dir) -> None:
        state, _, _ = mcore_torch._replace_state_dict_keys_with_sharded_keys(
            sharded_state_dict, keep_only_main_replica=True)
        pyt_state = mcore_torch.mcore_to_pyt_state_dict(state, is_loading=False)
        self.writer = _SliceWriter(Path(checkpoint_dir), **self._args)
        planner = mcore_torch.MCoreSavePlanner(dedup_replicated_tensors=False,
                                               flatten_state_dict=False)
        dcp_save(pyt_state, storage_writer=self.writer, planner=planner)


def write_slice(root: Path, sharded: dict, produce: Callable[[str], Tensor | list[Tensor]],
                index: int = 0, count: int = 1, threads: int = 2) -> Path:
    """Write slice ``index`` of ``count`` of the step-0 checkpoint of ``sharded`` (a model's
    ``sharded_state_dict`` with ``SHARDED_METADATA``) under ``root``; tensors come from
    ``produce(name)`` (one tensor, or row blocks along dim 0 whose concatenation it is).
    Returns the slice directory; a finished slice is not written again."""
    from torch.distributed.checkpoint.api import CheckpointException

    out = slice_dir(root, index)
    if (out / _DONE).is_file():
        return out
    if out.exists():
        shutil.rmtree(out)  # an interrupted attempt
    out.mkdir(parents=True)
    strategy = _SliceStrategy(dict(index=index, count=count, slots=tensor_slots(sharded),
                                   produce=produce, threads=threads))
    try:
        dist_checkpointing.save({"model": sharded, "step": 0}, str(out),
                                sharded_strategy=strategy)
    except CheckpointException as e:  # DCP wraps what our producer raised
        shutil.rmtree(out, ignore_errors=True)
        cause = next(iter(e.failures.values()))[0] if e.failures else e
        raise cause from e
    except BaseException:
        shutil.rmtree(out, ignore_errors=True)
        raise
    w = strategy.writer
    done = {"index": index, "count": count, "files": w.files, "num_items": w.num_items,
            "total_items": w.total_items}
    tmp = out / f".{_DONE}.tmp"
    tmp.write_text(json.dumps(done))
    os.replace(tmp, out / _DONE)
    return out


def finish_checkpoint(root: Path, count: int, config_yaml: str, extra: dict) -> Path:
    """Join the ``count`` finished slices under ``root`` into ``root/step_0000000`` (renamed
    into place); the staging folder is removed. Returns the step directory."""
    from megatron_vlm.checkpoint.dist import fsync_path
    from megatron_vlm.checkpoint.manifest import FORMAT, file_entries, write_manifest
    from megatron_vlm.checkpoint.megatron_io import MetadataUnpickler
    from megatron_vlm.checkpoint.rng import capture_rng_state
    from megatron_vlm.convert.mcore import _manifest

    root = Path(root)
    final = root / STEP_NAME
    if final.exists():
        raise FileExistsError(f"{final} exists")
    dones = []
    for i in range(count):
        path = slice_dir(root, i) / _DONE
        if not path.is_file():
            raise ConversionError(f"slice {i}/{count} of {root} is not finished (no {path}): "
                                  f"run it (--slice {i}/{count}) before finishing")
        dones.append(json.loads(path.read_text()))
    if any(d["count"] != count for d in dones):
        raise ConversionError(f"the slices under {parts_dir(root)} were written for another "
                              f"count than {count}")
    if sum(d["num_items"] for d in dones) != dones[0]["total_items"]:
        raise ConversionError(f"the slices under {parts_dir(root)} hold "
                              f"{sum(d['num_items'] for d in dones)} of "
                              f"{dones[0]['total_items']} chunks")
    tmp = root / f".tmp-{STEP_NAME}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        first = slice_dir(root, 0)
        with open(first / ".metadata", "rb") as f:
            metadata = MetadataUnpickler(f).load()  # DCP's own classes only
        storage = {}
        entries = []
        for i, done in enumerate(dones):
            src = slice_dir(root, i)
            with open(src / ".metadata", "rb") as f:
                storage.update(MetadataUnpickler(f).load().storage_data)
            for name, info in done["files"].items():
                os.replace(src / name, tmp / name)
                entries.append({"path": name, **info})
        metadata.storage_data = storage
        with open(tmp / ".metadata", "wb") as f:
            pickle.dump(metadata, f)
            f.flush()
            os.fsync(f.fileno())
        for name in ("common.pt", "metadata.json"):
            os.replace(first / name, tmp / name)
            fsync_path(tmp / name)
        torch.save({"format": FORMAT, "rank": 0, "world_size": 1, "step": 0,
                    "rng": capture_rng_state(), "extra_json": json.dumps(extra)},
                   tmp / "rank_00000.pt")
        small = [".metadata", "common.pt", "metadata.json", "rank_00000.pt"]
        entries += file_entries(tmp, small, fsync=True)
        write_manifest(tmp, _manifest(config_yaml, extra, entries))
        fsync_path(tmp)
        tmp.rename(final)
        fsync_path(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(parts_dir(root), ignore_errors=True)
    return final
