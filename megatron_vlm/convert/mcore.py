"""Our megatron checkpoints (``checkpoint/dist.py`` layout), written and read tensor by tensor.

Writing: the model is built on the ``meta`` device (no memory), so its ``sharded_state_dict``
gives every key, shape, offset and ``_extra_state`` object megatron will expect on load.
megatron's ``dist_checkpointing.save`` then runs with :class:`LazySaveStrategy`: torch DCP's
``FileSystemWriter`` with one thread resolves each chunk just before writing it
(``filesystem._SerialCpuLoader``), and our planner produces it then from the HF tensors. Only
the tensor being written (and its HF sources) is in memory. The manifest, rank file and atomic
rename follow ``checkpoint/dist.py`` (``load_checkpoint`` reads the result).

Reading: megatron's (safe) torch_dist load strategy, asked for a few whole (TP=1) tensors at a
time; DCP reads only their byte ranges and reassembles them from whatever TP/EP layout the
checkpoint was saved in.
"""

from __future__ import annotations

import json
import secrets
import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor
from megatron.core.dist_checkpointing.strategies import torch as mcore_torch
from megatron.core.dist_checkpointing.strategies.base import SaveShardedStrategy
from torch import Tensor
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint import save as dcp_save
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.planner import WriteItemType

# The sharded-state-dict metadata our checkpoints are saved and loaded with (checkpoint/dist.py).
from megatron_vlm.checkpoint.dist import _SHARDED_METADATA as SHARDED_METADATA
from megatron_vlm.checkpoint.dist import _fsync_dir
from megatron_vlm.config.model import ModelConfig
from megatron_vlm.config.parallel import ParallelConfig
from megatron_vlm.parallel.runtime import Runtime


def ensure_single_process_groups() -> Runtime:
    """Conversion runs in one process: a world-size-1 gloo group and megatron groups (TP = PP =
    CP = EP = 1), made (seed 0) or reused (``parallel.init.ensure_single_process_groups``)."""
    from megatron_vlm.parallel.init import ensure_single_process_groups as single_process

    return single_process(seed=0)


def build_meta_model(model: ModelConfig) -> torch.nn.Module:
    """Our model (TP = 1) on the meta device: names, shapes and sharding, no storage."""
    from megatron_vlm.models.llm import build_llm
    from megatron_vlm.models.vlm import KimiVLM

    groups = ensure_single_process_groups().pg_collection
    parallel = ParallelConfig()
    with torch.device("meta"):
        if model.is_vlm:
            return KimiVLM(model, parallel, pg_collection=groups)
        return build_llm(model.llm, parallel, model.params_dtype, pg_collection=groups)


@dataclass(frozen=True)
class TensorSlot:
    """Where one of our tensors lives in a megatron checkpoint."""

    key: str
    """The sharded key (expert tensors: one key for all experts of a layer)."""
    prepend: tuple[int, ...]
    """Offsets along the prepended axes (expert index)."""
    prepend_sizes: tuple[int, ...]
    shape: tuple[int, ...]
    dtype: torch.dtype


def _leaves(value) -> Iterable:
    if isinstance(value, dict):
        for v in value.values():
            yield from _leaves(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _leaves(v)
    else:
        yield value


def tensor_slots(sharded: dict) -> dict[str, TensorSlot]:
    """Our tensor name -> slot, from a model's ``sharded_state_dict`` (factories applied to a
    copy: the gated ``linear_fc1`` factory stores gate and up as two chunks of one key)."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensorFactory

    slots = {}
    for name, value in sharded.items():
        if isinstance(value, ShardedObject):
            continue
        if isinstance(value, ShardedTensorFactory):
            value = value.build()
        tensors = [t for t in _leaves(value) if isinstance(t, ShardedTensor)]
        if not tensors:
            continue
        t = tensors[0]
        p = t.prepend_axis_num
        data = value.data if isinstance(value, ShardedTensor) else sharded[name].data
        slots[name] = TensorSlot(t.key, tuple(t.global_offset[:p]), tuple(t.global_shape[:p]),
                                 tuple(data.shape), data.dtype)
    return slots


# --- write ----------------------------------------------------------------------------------------


class _Writer(FileSystemWriter):
    """DCP's filesystem writer without ``storage_meta`` (its checkpoint id is a ``Path``, which
    our restricted ``.metadata`` unpickler refuses, and nothing reads it)."""

    def storage_meta(self):
        return None


class _LazyPlanner(mcore_torch.MCoreSavePlanner):
    """megatron's save planner whose tensor chunks come from ``produce`` when DCP writes them.

    torch 2.13's writer keeps every tensor it has written to a file in a dict until the file is
    closed (``filesystem._write_files_from_queue``: ``tensor_dict[fqn] = tensor``, line 451,
    used only for its safetensors format), i.e. the whole checkpoint with one file per rank. DCP
    asks for the next chunk only after writing the previous one, so each call here first frees
    the previous chunk's storage (the written bytes are on disk; the dict is never read with the
    torch_save format). Chunks are returned with storage of their own, so DCP's loader does not
    clone them (``_SerialCpuLoader.values``) and the storage freed is the one it holds (a chunk
    whose storage cannot be resized, e.g. read through numpy, is copied first).
    """

    def __init__(self, chunk: Callable[[str, tuple[int, ...], tuple[int, ...]], Tensor]) -> None:
        super().__init__(dedup_replicated_tensors=False, flatten_state_dict=False)
        self._chunk = chunk
        self._previous: Tensor | None = None

    def resolve_data(self, write_item):
        if write_item.type == WriteItemType.BYTE_IO:
            return super().resolve_data(write_item)
        if self._previous is not None:
            self._previous.untyped_storage().resize_(0)
        out = self._chunk(write_item.index.fqn, tuple(write_item.index.offset),
                          tuple(write_item.tensor_data.chunk.sizes))
        self._previous = out
        return out


class LazySaveStrategy(SaveShardedStrategy):
    """torch_dist save whose tensors are produced one at a time by ``produce(name)``."""

    def __init__(self, slots: dict[str, TensorSlot], produce: Callable[[str], Tensor],
                 produce_owns_results: bool = False) -> None:
        super().__init__("torch_dist", 1)
        self._owned = produce_owns_results
        self._by_key = {(s.key, s.prepend): n for n, s in slots.items()}
        self._prepend = {s.key: len(s.prepend) for s in slots.values()}
        self._produce = produce
        self._last: tuple[str, Tensor] | None = None

    @property
    def can_handle_sharded_objects(self) -> bool:
        return True

    def _chunk(self, key: str, offset: tuple[int, ...], sizes: tuple[int, ...]) -> Tensor:
        p = self._prepend[key]
        name = self._by_key[(key, offset[:p])]
        if self._last is None or self._last[0] != name:  # gate and up chunks come in a row
            self._last = (name, self._produce(name))
        full = self._last[1]
        index = tuple(slice(o, o + s) for o, s in zip(offset[p:], sizes[p:]))
        chunk = full[index].reshape(sizes)
        storage = chunk.untyped_storage()
        # The planner frees every chunk's storage once written: hand it a storage of its own
        # unless ``produce`` made this one for us alone and the chunk is all of it.
        if (not self._owned or storage.nbytes() != chunk.nbytes or not storage.resizable()
                or not chunk.is_contiguous()):
            return chunk.clone(memory_format=torch.contiguous_format)
        self._last = None  # the whole tensor is this one chunk: the planner frees it later
        return chunk

    def save(self, sharded_state_dict, checkpoint_dir) -> None:
        state, _, _ = mcore_torch._replace_state_dict_keys_with_sharded_keys(
            sharded_state_dict, keep_only_main_replica=True)
        pyt_state = mcore_torch.mcore_to_pyt_state_dict(state, is_loading=False)
        # One thread and no copy-ahead: DCP then resolves each chunk right after writing the
        # previous one (filesystem._SerialCpuLoader, also with CUDA present), as the planner's
        # freeing of the previous chunk requires.
        writer = _Writer(str(checkpoint_dir), single_file_per_rank=True, sync_files=True,
                         thread_count=1, per_thread_copy_ahead=0)
        dcp_save(pyt_state, storage_writer=writer, planner=_LazyPlanner(self._chunk))


def _manifest(config_yaml: str, extra: dict, entries: list[dict]) -> dict:
    """The fields ``checkpoint/dist.py`` writes for a one-rank, model-only step-0 save."""
    import datetime
    import time
    from importlib import metadata

    import megatron.core

    from megatron_vlm.checkpoint.manifest import (
        FORMAT,
        FORMAT_VERSION,
        model_section,
        structural_hash,
    )

    try:
        ours = metadata.version("megatron_vlm")
    except metadata.PackageNotFoundError:
        ours = "unknown (not installed)"
    now = time.time()
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "step": 0, "time_unix": now,
        "time_utc": datetime.datetime.fromtimestamp(now, datetime.timezone.utc).isoformat(),
        "versions": {"torch": torch.__version__, "megatron_core": megatron.core.__version__,
                     "megatron_vlm": ours},
        "world_size": 1,
        "layout": {"tp": 1, "pp": 1, "vpp": 1, "cp": 1, "ep": 1, "etp": 1, "dp": 1},
        "optimizer_state": False, "distributed_optimizer": False,
        "sharded_state_dict_metadata": dict(SHARDED_METADATA),
        "model_config_sha256": structural_hash(model_section(config_yaml)),
        "config_yaml": config_yaml, "extra_rank0": extra,
        "files": sorted(entries, key=lambda e: e["path"]),
    }


def write_checkpoint(root: Path, sharded: dict, produce: Callable[[str], Tensor],
                     config_yaml: str, extra: dict, produce_owns_results: bool = False) -> Path:
    """Write ``root/step_0000000`` -- a model-only checkpoint in ``checkpoint/dist.py``'s format
    (``load_checkpoint`` reads it) -- for ``sharded``, a model's ``sharded_state_dict`` (taken
    with ``SHARDED_METADATA``), whose tensors come from ``produce(name)``; into a temporary
    directory renamed into place (nothing is left behind on error). Returns the step directory.

    ``produce_owns_results``: each tensor ``produce`` returns is new and referenced nowhere else,
    so the writer may free it after writing instead of copying it first."""
    from megatron_vlm.checkpoint.manifest import FORMAT, file_entries, list_files, write_manifest
    from megatron_vlm.checkpoint.rng import capture_rng_state

    root = Path(root)
    final = root / "step_0000000"
    if final.exists():
        raise FileExistsError(f"{final} exists")
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-{final.name}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        slots = tensor_slots(sharded)
        try:
            strategy = LazySaveStrategy(slots, produce, produce_owns_results)
            dist_checkpointing.save({"model": sharded, "step": 0}, str(tmp),
                                    sharded_strategy=strategy)
        except CheckpointException as e:  # DCP wraps what our producer raised
            cause = next(iter(e.failures.values()))[0] if e.failures else e
            raise cause from e
        # Per-rank state as dist.py writes it (plain values, read with weights_only=True).
        torch.save({"format": FORMAT, "rank": 0, "world_size": 1, "step": 0,
                    "rng": capture_rng_state(), "extra_json": json.dumps(extra)},
                   tmp / "rank_00000.pt")
        entries = file_entries(tmp, list_files(tmp), fsync=True)
        write_manifest(tmp, _manifest(config_yaml, extra, entries))
        _fsync_dir(tmp)
        tmp.rename(final)
        _fsync_dir(root)
        return final
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# --- read -----------------------------------------------------------------------------------------


class CheckpointReader:
    """Whole (TP=1) tensors of our checkpoint at ``step_dir``, any saved layout."""

    def __init__(self, step_dir: Path, slots: dict[str, TensorSlot]) -> None:
        from megatron_vlm.checkpoint.megatron_io import SafeTorchDistLoadStrategy

        self.step_dir = Path(step_dir)
        self.slots = slots
        self._strategy = SafeTorchDistLoadStrategy()
        saved = self._strategy.load_tensors_metadata(self.step_dir)
        self.global_shapes = {k: tuple(v.global_shape) for k, v in saved.items()}
        self.dtypes = {k: v.dtype for k, v in saved.items()}

    def saved_shape(self, name: str) -> tuple[int, ...]:
        """The tensor's shape as saved (the vocabulary is padded per the saving TP size)."""
        slot = self.slots[name]
        if slot.key not in self.global_shapes:
            raise KeyError(slot.key)
        return self.global_shapes[slot.key][len(slot.prepend):]

    def read(self, names: list[str]) -> dict[str, Tensor]:
        request = {}
        for name in names:
            slot = self.slots[name]
            shape = self.saved_shape(name)
            # Expert tensors are asked for as [1, ...] blocks of the [E, ...] global tensor (not
            # with megatron's prepended axes, whose load path assumes that the ranks together
            # ask for every expert in one call): any subset of experts can then be read.
            data = torch.empty((1,) * len(slot.prepend) + shape, dtype=self.dtypes[slot.key])
            axes = [(i, off, size) for i, (off, size) in
                    enumerate(zip(slot.prepend, slot.prepend_sizes))]
            request[name] = ShardedTensor.from_rank_offsets(slot.key, data, *axes, replica_id=0)
        loaded = self._strategy.load(request, self.step_dir)
        return {n: t.reshape(self.saved_shape(n)) for n, t in loaded.items()}
