"""Glue between our checkpoints and megatron-core ``dist_checkpointing`` / torch DCP file I/O.

megatron-core 0.16.1 has no hooks for any of this, so each piece subclasses a megatron strategy
and, where megatron builds a helper inside a function, rebinds that module attribute for the
duration of one call (``_patched``). Why each piece exists:

* ``InProcessTorchDistSaveStrategy`` (with ``_InProcessFileSystemWriter`` and
  ``async_writer.write_buckets_to_queue``): the torch_dist save strategy writes through
  ``FileSystemWriterAsync``, which even for a synchronous save starts a ``spawn``
  multiprocessing Manager (re-importing ``__main__``) and forks one writer process per bucket
  (``strategies/filesystem_async.py:54,266``).
  We write the same buckets, with fsync and megatron's result protocol, in this process instead:
  one thread per bucket file, every byte hashed as it is written (``hashed_io.py``), so the
  manifest needs no second read of the data (and megatron's writer, whose memory logging
  needs psutil, ``filesystem_async.py:642``, never runs).
* ``AsyncTorchDistSaveStrategy`` (with ``_AsyncFileSystemWriter``): megatron's own async path
  (forked writer, per-bucket processes, results through a Manager queue) with our writer
  process instead (``async_writer.py``) and a plain result queue: megatron starts a
  ``spawn``-context Manager (``filesystem_async.py:51``), which re-imports ``__main__`` --
  re-running any script without a ``__main__`` guard that calls ``train()`` -- and dies from a
  preemption signal sent to the trainer's process group (torchrun's ``killpg``, SLURM), taking
  the result queue of the save in flight with it. The queue is built inside a function with no
  hook, so it is rebound for the call.
* ``SafeCommonLoadStrategy``: megatron reads ``common.pt`` with torch's loader (map_location cpu)
  and no ``weights_only`` argument (``strategies/common.py:86``): safe only because torch >= 2.6
  defaults to ``weights_only=True`` and an env var (``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD``) can flip
  it. We pass ``weights_only=True`` explicitly, and refuse megatron's unsafe fallback load of
  ShardedObjects stored outside the torch_dist files.
* ``SafeTorchDistLoadStrategy`` (with ``_SafeLoadPlanner``, ``_SafeMetadataReader`` and
  ``MetadataUnpickler``): ShardedObjects (the model's ``_extra_state`` entries,
  DistributedOptimizer param groups under ``dp_reshardable``) are unpickled by torch DCP's
  ``DefaultLoadPlanner.load_bytes`` with ``weights_only=False`` (torch 2.13
  ``default_planner.py:387``), and DCP's ``.metadata`` with a bare ``pickle.load``
  (``filesystem.py:930``). The planner loads those bytes with ``weights_only=True``; the reader
  unpickles ``.metadata`` constructing only DCP's own plain data classes and torch value types.
* ``weights_only_load``: the one ``torch.load`` that every checkpoint file goes through (also the
  per-rank files in ``dist.py``); a refused object becomes a ``CheckpointError`` rather than
  torch's advice to retry with ``weights_only=False``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import pickle
import queue
from collections.abc import Iterator
from enum import Enum
from functools import partial
from pathlib import Path
from typing import Any

import torch
from megatron.core.dist_checkpointing.strategies import filesystem_async as _fs_async
from megatron.core.dist_checkpointing.strategies import torch as _torch_strategy
from megatron.core.dist_checkpointing.strategies.cached_metadata_filesystem_reader import (
    CachedMetadataFileSystemReader,
)
from megatron.core.dist_checkpointing.strategies.common import (
    COMMON_STATE_FNAME,
    TorchCommonLoadStrategy,
)
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.metadata import StorageMeta

from megatron_vlm.checkpoint import async_writer
from megatron_vlm.checkpoint.hashed_io import WRITE_THREADS
from megatron_vlm.checkpoint.manifest import CheckpointError


@contextlib.contextmanager
def _patched(module: Any, name: str, value: Any) -> Iterator[None]:
    """Rebind ``module.name`` for the duration of the block (megatron has no hook there)."""
    old = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, old)


# --- save strategy: torch_dist, written in this process -----------------------------------------


class _HashingWriterMixin:
    """Writes the buckets with ``async_writer.write_buckets_to_queue`` (hashes into
    ``digests``), looked up at each save."""

    digests: dict

    def get_save_function_and_args(self):
        fn, preload_fn, args = super().get_save_function_and_args()
        if fn is None:
            return fn, preload_fn, args
        transform_list = [self.transforms] if hasattr(self, "transforms") else []
        return (partial(async_writer.write_buckets_to_queue, transform_list, self.digests),
                preload_fn, args)


def _writer_factory(cls: type, digests: dict):
    """``FileSystemWriterAsync(...)`` stand-in: ``cls`` sharing the strategy's ``digests``."""
    def make(*args, **kwargs):
        writer = cls(*args, **kwargs)
        writer.digests = digests
        return writer
    return make


class _InProcessFileSystemWriter(_HashingWriterMixin, _fs_async.FileSystemWriterAsync):
    """megatron 0.16.1's async writer, made synchronous and in-process (see module docstring)."""

    def prepare_write_data(self, plan, planner) -> None:
        # filesystem_async.py:54 would start a spawn-context Manager for the results queue.
        with _patched(_fs_async, "_get_write_results_queue", queue.Queue):
            super().prepare_write_data(plan, planner)


class InProcessTorchDistSaveStrategy(_torch_strategy.TorchDistSaveShardedStrategy):
    """The torch_dist save strategy with :class:`_InProcessFileSystemWriter`; used synchronously.

    ``thread_count=WRITE_THREADS``: that many data files per rank, written by as many threads.
    After a save, ``digests`` holds ``{relative path: manifest entry}`` of this rank's data
    files, hashed while they were written.
    """

    def __init__(self) -> None:
        super().__init__("torch_dist", 1, thread_count=WRITE_THREADS)
        self.digests: dict[str, dict] = {}

    def async_save(self, sharded_state_dict, checkpoint_dir):
        writer = _writer_factory(_InProcessFileSystemWriter, self.digests)
        with _patched(_torch_strategy, "FileSystemWriterAsync", writer):
            return super().async_save(sharded_state_dict, checkpoint_dir)


# --- save strategy: megatron's async torch_dist, written by our writer process -----------------


class _AsyncFileSystemWriter(_HashingWriterMixin, _fs_async.FileSystemWriterAsync):
    """megatron 0.16.1's async writer, its buckets written (and hashed) by threads of our
    writer process (``async_writer.WriterProcess``), which hands the results back into a plain
    queue of this process (megatron's is a spawned Manager's; see the module docstring)."""

    def prepare_write_data(self, plan, planner) -> None:
        with _patched(_fs_async, "_get_write_results_queue", queue.Queue):
            super().prepare_write_data(plan, planner)


class AsyncTorchDistSaveStrategy(_torch_strategy.TorchDistSaveShardedStrategy):
    """megatron's torch_dist async save with :class:`_AsyncFileSystemWriter`.

    ``thread_count=WRITE_THREADS``: the same files as :class:`InProcessTorchDistSaveStrategy`,
    so async and synchronous checkpoints are alike. ``digests`` is filled in the writer process
    (its copy of the request; read it there, after the write).
    """

    def __init__(self) -> None:
        super().__init__("torch_dist", 1, thread_count=WRITE_THREADS)
        self.digests: dict[str, dict] = {}

    def async_save(self, sharded_state_dict, checkpoint_dir):
        writer = _writer_factory(_AsyncFileSystemWriter, self.digests)
        with _patched(_torch_strategy, "FileSystemWriterAsync", writer):
            return super().async_save(sharded_state_dict, checkpoint_dir)


# --- load strategies: nothing is unpickled unrestricted ----------------------------------------


def weights_only_load(source: Path | io.BytesIO, what: str) -> Any:
    """``torch.load(weights_only=True)`` on CPU; a refused object becomes a CheckpointError."""
    try:
        return torch.load(source, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's text goes on to suggest weights_only=False; never for a checkpoint.
        reason = str(e).split(" In PyTorch 2.6")[0]
        raise CheckpointError(
            f"refusing to load {what}: {reason} It holds objects other than tensors and plain "
            "containers (written by another tool, or tampered with)."
        ) from e


class MetadataUnpickler(pickle.Unpickler):
    """Unpickler for torch DCP's ``.metadata``: constructs only DCP's own plain data classes
    (dataclasses and enums of its metadata/planner/filesystem modules), torch dtypes, layouts,
    memory formats and ``torch.Size``; anything else is refused."""

    _DCP_MODULES = frozenset({
        "torch.distributed.checkpoint.metadata",
        "torch.distributed.checkpoint.planner",
        "torch.distributed.checkpoint.filesystem",
    })
    _GLOBALS = frozenset({
        ("torch.serialization", "_get_layout"),  # layout name -> torch.layout
        ("collections", "OrderedDict"),
        ("builtins", "set"),
        ("builtins", "frozenset"),
    })
    _TORCH_VALUE_TYPES = (torch.dtype, torch.layout, torch.memory_format)

    def find_class(self, module: str, name: str) -> Any:
        if module in self._DCP_MODULES:
            obj = super().find_class(module, name)
            if isinstance(obj, type) and (dataclasses.is_dataclass(obj) or issubclass(obj, Enum)):
                return obj
        elif module == "torch":
            obj = getattr(torch, name, None)
            if obj is torch.Size or isinstance(obj, self._TORCH_VALUE_TYPES):
                return obj
        elif (module, name) in self._GLOBALS:
            return super().find_class(module, name)
        raise CheckpointError(
            f"refusing to unpickle {module}.{name} from a torch DCP .metadata file"
        )


class _SafeMetadataReader(CachedMetadataFileSystemReader):
    """Reads ``.metadata`` with :class:`MetadataUnpickler` (torch 2.13 ``FileSystemReader.
    read_metadata`` is a bare ``pickle.load``); otherwise the same reader megatron uses."""

    def read_metadata(self, *args: Any, **kwargs: Any):
        if self._cached_metadata is None:
            path = self._get_metadata_path(kwargs.get("rank"))
            with self.fs.create_stream(path, "rb") as f:
                metadata = MetadataUnpickler(f).load()
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            self._cached_metadata = metadata
        return self._cached_metadata


def _safe_reader(checkpoint_dir, cache_metadata: bool = False) -> _SafeMetadataReader:
    return _SafeMetadataReader(checkpoint_dir)


class _SafeLoadPlanner(_torch_strategy.MCoreLoadPlanner):
    """megatron's load planner, but ShardedObject bytes load with ``weights_only=True``."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        obj = weights_only_load(value, f"checkpoint object {read_item.dest_index.fqn!r}")
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


class SafeTorchDistLoadStrategy(_torch_strategy.TorchDistLoadShardedStrategy):
    """megatron's torch_dist load strategy with the safe planner and reader swapped in."""

    @contextlib.contextmanager
    def _safe(self) -> Iterator[None]:
        with (
            _patched(_torch_strategy, "MCoreLoadPlanner", _SafeLoadPlanner),
            _patched(_torch_strategy, "_get_filesystem_reader", _safe_reader),
        ):
            yield

    def load(self, sharded_state_dict, checkpoint_dir):
        with self._safe():
            return super().load(sharded_state_dict, checkpoint_dir)

    def load_tensors_metadata(self, checkpoint_dir, metadata=None):
        with self._safe():
            return super().load_tensors_metadata(checkpoint_dir, metadata)

    def load_sharded_metadata(self, checkpoint_dir):
        with self._safe():
            return super().load_sharded_metadata(checkpoint_dir)


class SafeCommonLoadStrategy(TorchCommonLoadStrategy):
    """``common.pt`` with an explicit ``weights_only=True`` (see module docstring)."""

    def load_common(self, checkpoint_dir):
        path = Path(checkpoint_dir) / COMMON_STATE_FNAME
        if not path.is_file():
            raise CheckpointError(f"missing file {path}")
        return weights_only_load(path, str(path))

    def load_sharded_objects(self, sharded_objects_state_dict, checkpoint_dir):
        # torch_dist handles ShardedObjects itself; megatron's fallback here is an unsafe load.
        raise CheckpointError("ShardedObjects outside the torch_dist files are not supported")
