"""The export planned before anything is read: every HF tensor's name, shape and dtype, the
shards they go to, and which slice (process) writes which shards.

The plan depends on the checkpoint's metadata, the table and ``max_shard_bytes`` only -- never on
the number of slices -- so any number of processes (``convert_hf.py export --workers N``, or a
SLURM array of ``--slice i/N`` tasks) writes the same bytes: each slice writes whole shards
(``model-0000k-of-0000K.safetensors``, named from the start) with the header first and then
every tensor as it is converted (``hf_io.PlannedShardWriter``); the finishing step writes the
index. A shard holds whole tensors of ours (a fused gate/up never straddles two shards).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from megatron_vlm.convert.hf_io import PlannedShardWriter
from megatron_vlm.convert.rules import ConvertContext, Table, meta_like
from megatron_vlm.convert.slices import partition


@dataclass(frozen=True)
class HfOut:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


@dataclass
class Shard:
    file: str
    ours: list[str]
    """Our tensors, in the order they are written."""
    outs: list[HfOut]
    """The HF tensors, in file order."""

    @property
    def nbytes(self) -> int:
        return sum(o.nbytes for o in self.outs)


_INT4_SUFFIXES = ("weight_packed", "weight_scale", "weight_shape")


def _int4_dtypes() -> dict[str, torch.dtype]:
    from megatron_vlm.convert.int4 import GROUP_SIZE, quantize_int4

    return {k: v.dtype for k, v in quantize_int4(torch.zeros(1, GROUP_SIZE)).items()}


def hf_outputs(table: Table, ctx: ConvertContext, name: str, shape: tuple[int, ...],
               saved: torch.dtype, dtype: torch.dtype, int4: dict | None) -> list[HfOut]:
    """The HF tensors our tensor ``name`` (saved ``shape``/``saved`` dtype) becomes (shapes from
    the transform run on ``meta``; INT4 ones from the packing's arithmetic)."""
    from megatron_vlm.convert.int4 import GROUP_SIZE

    rule, binding = table.lookup(name)
    out = []
    for hf_name, t in zip(rule.hf_names(binding),
                          rule.transform.to_hf(meta_like(shape, saved), ctx)):
        if int4 is not None and rule.int4:
            rows, cols = t.shape
            base = hf_name.removesuffix("weight")
            shapes = ((rows, -(-cols // 8)), (rows, cols // GROUP_SIZE), (2,))
            out += [HfOut(base + s, sh, int4[s]) for s, sh in zip(_INT4_SUFFIXES, shapes)]
        else:
            out.append(HfOut(hf_name, tuple(t.shape), t.dtype if rule.keep_dtype else dtype))
    return out


def plan_shards(table: Table, ctx: ConvertContext, names: list[str],
                shape_of: Callable[[str], tuple[int, ...]], dtype_of: Callable[[str], torch.dtype],
                dtype: torch.dtype, int4: bool, max_shard_bytes: int,
                extra: dict[str, list[HfOut]] | None = None) -> list[Shard]:
    """Our tensors in order, packed into shards of at most ``max_shard_bytes`` (a larger tensor
    gets a shard of its own). ``extra``: names that are no tensor of ours (carried HF tensors)
    with the HF outputs they stand for."""
    int4_dtypes = _int4_dtypes() if int4 else None
    extra = extra or {}
    shards: list[Shard] = []
    current: Shard | None = None
    for name in names:
        outs = extra[name] if name in extra else hf_outputs(
            table, ctx, name, shape_of(name), dtype_of(name), dtype, int4_dtypes)
        size = sum(o.nbytes for o in outs)
        if current is None or (current.ours and current.nbytes + size > max_shard_bytes):
            current = Shard("", [], [])
            shards.append(current)
        current.ours.append(name)
        current.outs += outs
    for i, s in enumerate(shards):
        s.file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    return shards


def slice_shards(shards: list[Shard], index: int, count: int) -> list[Shard]:
    """The shards slice ``index`` of ``count`` writes (contiguous, byte-balanced)."""
    return [shards[i] for i in partition([s.nbytes for s in shards], count)[index]]


def write_shards(out_dir: Path, shards: list[Shard], read: Callable[[list[str]], dict],
                 convert: Callable[[str, Tensor], list[tuple[str, Tensor]]],
                 threads: int = 2, read_group_bytes: int = 2**28,
                 nbytes_of: Callable[[str], int] = lambda n: 0,
                 after_group: Callable[[], None] | None = None) -> None:
    """Write ``shards`` into ``out_dir`` with ``threads`` threads (whole shards each). Our
    tensors are read a group at a time through ``read`` (thread-safe; the groups in memory at
    once, current and read-ahead of every thread, hold ``read_group_bytes`` or one tensor each),
    the next group while the current one is converted and written (copy-ahead);
    ``convert(name, tensor)`` gives the HF tensors to write."""
    locked_read = read

    # read_group_bytes is the whole budget: each thread holds a group and reads the next one.
    budget = max(1, read_group_bytes // (2 * max(1, threads)))

    def groups(names: list[str]) -> list[list[str]]:
        out, group, size = [], [], 0
        for name in names:
            if group and size + nbytes_of(name) > budget:
                out.append(group)
                group, size = [], 0
            group.append(name)
            size += nbytes_of(name)
        return out + ([group] if group else [])

    def write_one(shard: Shard) -> None:
        writer = PlannedShardWriter(out_dir / shard.file,
                                    [(o.name, o.shape, o.dtype) for o in shard.outs])
        try:
            todo = groups(shard.ours)
            with ThreadPoolExecutor(1) as ahead:
                nxt = ahead.submit(locked_read, todo[0])
                for k in range(len(todo)):
                    tensors = nxt.result()
                    if k + 1 < len(todo):
                        nxt = ahead.submit(locked_read, todo[k + 1])
                    for name in todo[k]:
                        for hf_name, t in convert(name, tensors.pop(name)):
                            writer.add(hf_name, t)
                    del tensors
                    if after_group is not None:
                        after_group()
            writer.close()
        except BaseException:
            writer.abort()
            raise

    buckets = [[shards[i] for i in r] for r in partition([s.nbytes for s in shards],
                                                         max(1, threads))]

    def run(bucket: list[Shard]) -> None:
        for shard in bucket:
            write_one(shard)

    with ThreadPoolExecutor(len(buckets)) as pool:
        for fut in [pool.submit(run, b) for b in buckets]:
            fut.result()
