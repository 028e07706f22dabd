"""Our megatron checkpoints (``checkpoint/dist.py`` layout), written and read tensor by tensor.

Writing: the model is built on the ``meta`` device (no memory), so its ``sharded_state_dict``
gives every key, shape, offset and ``_extra_state`` object megatron will expect on load.
megatron's ``dist_checkpointing.save`` then plans the save and ``slices.py`` writes the chunks,
each produced from the HF tensors just before it is written (and the next one meanwhile), by one
or several processes (slices) that each write their own files. The manifest, rank file and
atomic rename follow ``checkpoint/dist.py`` (``load_checkpoint`` reads the result).

Reading: megatron's (safe) torch_dist load strategy, asked for a few whole (TP=1) tensors at a
time; DCP reads only their byte ranges and reassembles them from whatever TP/EP layout the
checkpoint was saved in.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor
from torch import Tensor
from torch.distributed.checkpoint import FileSystemWriter

# The sharded-state-dict metadata our checkpoints are saved and loaded with (checkpoint/dist.py).
from megatron_vlm.checkpoint.dist import _SHARDED_METADATA as SHARDED_METADATA
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
    from megatron_vlm.families import get_family
    from megatron_vlm.models.llm import build_llm

    groups = ensure_single_process_groups().pg_collection
    parallel = ParallelConfig()
    with torch.device("meta"):
        if model.is_vlm:
            return get_family(model.family).build_vlm(model, parallel, pg_collection=groups)
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
                     config_yaml: str, extra: dict, produce_owns_results: bool = False,
                     threads: int = 2) -> Path:
    """Write ``root/step_0000000`` -- a model-only checkpoint in ``checkpoint/dist.py``'s format
    (``load_checkpoint`` reads it) -- for ``sharded``, a model's ``sharded_state_dict`` (taken
    with ``SHARDED_METADATA``), whose tensors come from ``produce(name)``; into a temporary
    directory renamed into place (nothing is left behind on error). Returns the step directory.

    One process, one slice (``slices.py``: ``threads`` writer threads with copy-ahead, hashes
    taken while writing). ``produce_owns_results`` is kept for callers; the writer never
    frees or changes what ``produce`` returns (it drops its references once written)."""
    from megatron_vlm.convert.slices import finish_checkpoint, parts_dir, write_slice

    del produce_owns_results
    root = Path(root)
    if (root / "step_0000000").exists():
        raise FileExistsError(f"{root / 'step_0000000'} exists")
    root.mkdir(parents=True, exist_ok=True)
    try:
        write_slice(root, sharded, produce, 0, 1, threads)
        return finish_checkpoint(root, 1, config_yaml, extra)
    except BaseException:
        shutil.rmtree(parts_dir(root), ignore_errors=True)
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
