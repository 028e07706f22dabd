"""Decode once per replica: one rank builds each batch, the others receive its tensors.

Every rank of a data-parallel replica (its TP x CP x PP ranks) trains on the same micro-batches.
Building them on every rank decodes and packs each sample ``tp * cp * pp`` times, so only the
replica's *source* builds them: tensor-parallel rank 0, context-parallel rank 0, pipeline stage 0
(:func:`is_batch_source`). CP ranks count as copies too: the loader is keyed by the DP rank (DP
excludes CP), so all CP ranks of a replica read the same batches and each keeps its own share in
``forward_step``; decoding on one of them is enough.

:func:`hand_off` moves a structure of batches (a list of ``PackedBatch``, a dict of lists for
validation) from the source to the other ranks over the runtime's explicit groups
(``Runtime.pg_collection``), every collective through ``parallel/comm.py`` on its group's device:

1. Across pipeline stages, between the stages' leads (TP rank 0, CP rank 0; they form a PP
   group): the fields every stage reads (``cu_seqlens``, position ids, anything a family adds)
   over the PP group; the fields only the last stage reads (labels, loss mask) over megatron's
   embedding group, which holds exactly the first and the last stage (the whole PP group if a
   custom embedding layout says otherwise). Fields only the first stage reads (tokens, media)
   never leave it.
2. Within each stage, from its lead to its TP x CP group (``tp_cp``).

A field a stage does not read arrives as a *stand-in*: a tensor of the right shape and dtype with
one zero element broadcast over it (no bytes sent, no memory), or None for a non-tensor field
(``vision`` on later stages), so ``forward_step`` runs unchanged on every stage. Which fields a
stage reads is :class:`StageFields` (checked against ``training/step.py``: later stages read no
tokens and no media, since the embedding and the vision tower live on stage 0 and the model has no
multi-token prediction; only the last stage applies the loss); a field it does not name goes to
every stage, so a family that adds one needs no change here.

Wire format (megatron's ``broadcast_data`` is not used: it hard-codes CUDA, sends sizes over the
default TP group whatever group it is given, and misreads a zero-size dimension): the structure
is walked over ``dataclasses.fields`` (nested dataclasses, lists, tuples, dicts), each tensor is
replaced by a slot (dtype, shape, byte offset) and its bytes appended to one uint8 payload; the
skeleton (ints, lists of tuples, None, slots) is pickled after the payload. Two broadcasts per
hop: the two lengths, then payload and header together. Any dtype (bf16, bool, int64), empty and
zero-dimensional tensors travel as raw bytes; received tensors are views of the one buffer.
"""

from __future__ import annotations

import copy
import dataclasses
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from megatron_vlm.parallel import comm

_ALIGN = 16
"""Byte alignment of each tensor in the payload (a view as any dtype needs its offset aligned)."""


@dataclass(frozen=True, kw_only=True)
class StageFields:
    """Which batch fields only one pipeline stage reads; every other field goes to every stage."""

    first_stage_only: frozenset[str] = frozenset({"tokens", "vision"})
    """Read only where the embedding and the vision tower are (PP stage 0)."""
    last_stage_only: frozenset[str] = frozenset({"labels", "loss_mask"})
    """Read only where the loss is (the last PP stage)."""


@dataclass(frozen=True)
class _Slot:
    """A tensor's place in the payload."""

    offset: int
    nbytes: int
    dtype: torch.dtype
    shape: tuple[int, ...]


@dataclass(frozen=True)
class _StandIn:
    """A tensor field this stage does not read: its shape and dtype only."""

    dtype: torch.dtype
    shape: tuple[int, ...]


def is_batch_source(pg_collection) -> bool:
    """Whether this rank builds its replica's batches (TP 0, CP 0, PP stage 0; True without
    groups)."""
    if pg_collection is None:
        return True
    pgs = pg_collection
    return pgs.tp.rank() == 0 and pgs.cp.rank() == 0 and pgs.pp.rank() == 0


def _is_stage_lead(pgs) -> bool:
    return pgs.tp.rank() == 0 and pgs.cp.rank() == 0


class _Payload:
    """The tensors of a structure being encoded, each at an aligned byte offset."""

    def __init__(self) -> None:
        self.tensors: list[tuple[_Slot, torch.Tensor]] = []
        self.nbytes = 0

    def add(self, tensor: torch.Tensor) -> _Slot:
        t = tensor.detach().cpu().contiguous()
        slot = _Slot(self.nbytes, t.numel() * t.element_size(), t.dtype, tuple(t.shape))
        self.tensors.append((slot, t))
        self.nbytes += -(-slot.nbytes // _ALIGN) * _ALIGN
        return slot


def _split(obj: Any, drop: Callable[[str], bool], payload: _Payload) -> Any:
    """``obj`` with every tensor replaced by its :class:`_Slot` in ``payload`` and every dataclass
    field named by ``drop`` by a stand-in (tensors) or None."""
    if isinstance(obj, torch.Tensor):
        return payload.add(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        out = copy.copy(obj)
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            if drop(f.name):
                value = (_StandIn(value.dtype, tuple(value.shape))
                         if isinstance(value, torch.Tensor) else None)
            else:
                value = _split(value, drop, payload)
            object.__setattr__(out, f.name, value)  # frozen dataclasses too
        return out
    if isinstance(obj, list | tuple) and not hasattr(obj, "_fields"):
        return type(obj)(_split(x, drop, payload) for x in obj)
    if isinstance(obj, dict):
        return {k: _split(v, drop, payload) for k, v in obj.items()}
    return obj


def _map_leaves(obj: Any, fn: Callable[[Any], Any]) -> Any:
    """``obj`` (a decoded skeleton, modified in place where it is a dataclass) with ``fn``
    applied to every :class:`_Slot` and :class:`_StandIn`."""
    if isinstance(obj, _Slot | _StandIn):
        return fn(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        for f in dataclasses.fields(obj):
            object.__setattr__(obj, f.name, _map_leaves(getattr(obj, f.name), fn))
        return obj
    if isinstance(obj, list | tuple) and not hasattr(obj, "_fields"):
        return type(obj)(_map_leaves(x, fn) for x in obj)
    if isinstance(obj, dict):
        return {k: _map_leaves(v, fn) for k, v in obj.items()}
    return obj


def encode(obj: Any, drop: Callable[[str], bool] = lambda name: False) -> tuple[torch.Tensor, int]:
    """``(buffer, payload_nbytes)``: one uint8 buffer holding every tensor's bytes (aligned),
    then the pickled skeleton; dataclass fields named by ``drop`` become stand-ins."""
    payload = _Payload()
    header = pickle.dumps(_split(obj, drop, payload), protocol=pickle.HIGHEST_PROTOCOL)
    buf = torch.empty(payload.nbytes + len(header), dtype=torch.uint8)
    for slot, t in payload.tensors:
        if slot.nbytes:
            buf[slot.offset:slot.offset + slot.nbytes] = t.reshape(-1).view(torch.uint8)
    buf[payload.nbytes:] = torch.frombuffer(bytearray(header), dtype=torch.uint8)
    return buf, payload.nbytes


def decode(buf: torch.Tensor, payload_nbytes: int) -> Any:
    """The structure :func:`encode` wrote into ``buf``; its tensors are views of ``buf``."""
    skeleton = pickle.loads(buf[payload_nbytes:].numpy().tobytes())

    def tensor(leaf: _Slot | _StandIn) -> torch.Tensor:
        if isinstance(leaf, _StandIn):  # one zero element broadcast over the shape
            return torch.zeros((), dtype=leaf.dtype).expand(leaf.shape)
        raw = buf[leaf.offset:leaf.offset + leaf.nbytes]
        return raw.view(leaf.dtype).reshape(leaf.shape)

    return _map_leaves(skeleton, tensor)


def broadcast_structure(obj: Any, group, *, drop: Callable[[str], bool] = lambda name: False
                        ) -> Any:
    """``obj`` of ``group``'s rank 0 on every rank of ``group`` (others pass None): two
    broadcasts, the lengths then the buffer. The sender gets ``obj`` back unchanged."""
    src = dist.get_global_rank(group, 0)
    sender = group.rank() == 0
    if sender:
        buf, payload_nbytes = encode(obj, drop)
        sizes = torch.tensor([buf.numel(), payload_nbytes], dtype=torch.int64)
    else:
        sizes = torch.zeros(2, dtype=torch.int64)
    comm.broadcast(sizes, src, group)
    total, payload_nbytes = sizes.tolist()
    if not sender:
        buf = torch.empty(total, dtype=torch.uint8)
    comm.broadcast(buf, src, group)
    return obj if sender else decode(buf, payload_nbytes)


def _merge_fields(into: Any, source: Any, names: frozenset[str]) -> Any:
    """``into`` with the fields ``names`` of its dataclasses taken from ``source`` (the same
    structure)."""
    if dataclasses.is_dataclass(into) and not isinstance(into, type):
        for f in dataclasses.fields(into):
            if f.name in names:
                object.__setattr__(into, f.name, getattr(source, f.name))
        return into
    if isinstance(into, list | tuple) and not hasattr(into, "_fields"):
        return type(into)(_merge_fields(a, b, names) for a, b in zip(into, source))
    if isinstance(into, dict):
        return {k: _merge_fields(v, source[k], names) for k, v in into.items()}
    return into


def _embedding_group_is_first_and_last(pgs) -> bool:
    """megatron's embedding group holds exactly the first and the last stage (its default)."""
    embd = getattr(pgs, "embd", None)
    if embd is None:
        return False
    pp = pgs.pp
    ends = [dist.get_global_rank(pp, 0), dist.get_global_rank(pp, pp.size() - 1)]
    return dist.get_process_group_ranks(embd) == ends


def _across_stages(obj: Any, pgs, fields: StageFields) -> Any:
    """Stage leads only: stage 0's ``obj`` to every stage, each getting the fields it reads."""
    pp = pgs.pp
    first, last = pp.rank() == 0, pp.rank() == pp.size() - 1
    only_one = fields.first_stage_only | fields.last_stage_only
    # Whether the embedding group fits is the same answer on every stage lead of this PP group
    # (the first and the last stage ask it; middle stages have no embedding group).
    tail_group = pgs.embd if (first or last) and _embedding_group_is_first_and_last(pgs) else None
    # Without an embedding group of first and last stage, the last stage's fields go to all.
    dropped = only_one if tail_group is not None else fields.first_stage_only
    shared = broadcast_structure(obj if first else None, pp, drop=lambda n: n in dropped)
    if tail_group is None:
        return shared
    # First and last stage only: the last stage's own fields.
    tail = broadcast_structure(obj if first else None, tail_group,
                               drop=lambda n: n not in fields.last_stage_only)
    return obj if first else _merge_fields(shared, tail, fields.last_stage_only)


def hand_off(obj: Any, pg_collection, fields: StageFields = StageFields()) -> Any:
    """The source's ``obj`` (batches, or any structure of dataclasses, lists, dicts, tensors) on
    every rank of its replica, each rank getting the fields its stage reads (module docstring).

    Collective over the replica: every rank calls it at the same point; the source
    (:func:`is_batch_source`) passes its ``obj``, the others None. Without groups (one process)
    ``obj`` is returned as it is.
    """
    pgs = pg_collection
    if pgs is None:
        return obj
    if _is_stage_lead(pgs) and pgs.pp.size() > 1:
        obj = _across_stages(obj, pgs, fields)
    if pgs.tp_cp.size() > 1:
        # The lead (TP 0, CP 0) is the TP x CP group's rank 0 under megatron's rank order
        # (tp fastest, then cp); checked, since broadcast_structure sends from group rank 0.
        if (pgs.tp_cp.rank() == 0) != _is_stage_lead(pgs):
            raise RuntimeError("the TP x CP group's rank 0 is not TP rank 0 / CP rank 0; "
                               "batch hand-off needs megatron's default rank order")
        obj = broadcast_structure(obj, pgs.tp_cp)
    return obj


def hand_off_from_loader(obj: Any, pg_collection, fields: StageFields = StageFields()) -> Any:
    """:func:`hand_off` of what the source's loader just built, with the source's torch CPU
    generator state, which the receivers take over.

    torch's ``DataLoader`` (under energon) draws its base seed from the global CPU generator
    whenever an iterator starts. When every rank ran the loader, every rank of a replica drew
    the same and their generators stayed equal, so what draws next (the model's CPU
    initialisation, which splits one master weight over TP) saw one stream. Receivers run no
    loader; taking the source's state keeps every rank, and rank 0's numbers, as they were.
    """
    if pg_collection is None:
        return obj
    source = is_batch_source(pg_collection)
    got = hand_off({"data": obj, "torch_rng": torch.get_rng_state()} if source else None,
                   pg_collection, fields)
    if not source:
        torch.set_rng_state(got["torch_rng"].clone())
    return got["data"]


class ReplicaLoader:
    """The loader interface on every rank of a replica: the source wraps its real loader and
    hands each step's micro-batches to the other ranks; the others hold no loader and receive.

    ``state_dict`` and ``metrics`` are the source's loader's (checkpoints keep one data-stream
    state per replica, in the source's per-rank file; rank 0, which logs, is a source); a
    receiving rank's state is a marker that its own loader state lives on its source.

    Args:
        loader: the real loader (TextLoader, MultimodalLoader, PrepackedLoader) on the source,
            None on the other ranks.
        pg_collection: the runtime's process groups.
        fields: which fields only one stage reads.
    """

    RECEIVER_STATE = {"batches": "received from the replica's source rank"}

    def __init__(self, loader: Any | None, pg_collection,
                 fields: StageFields = StageFields()) -> None:
        source = is_batch_source(pg_collection)
        if source != (loader is not None):
            raise ValueError("the replica's source rank needs its loader, the others none")
        self.loader, self.pgs, self.fields = loader, pg_collection, fields

    @property
    def is_source(self) -> bool:
        return self.loader is not None

    def next_global_batch(self) -> list:
        """This replica's micro-batches for one step (collective over the replica)."""
        batches = self.loader.next_global_batch() if self.is_source else None
        return hand_off_from_loader(batches, self.pgs, self.fields)

    def describe(self) -> list[str]:
        pgs = self.pgs
        copies = pgs.tp.size() * pgs.cp.size() * pgs.pp.size()
        line = (f"data: decoded once per replica (TP 0, CP 0, PP stage 0), handed to its "
                f"{copies - 1} other rank(s)")
        return [*self.loader.describe(), line] if self.is_source else [line]

    def metrics(self) -> dict[str, float]:
        metrics = getattr(self.loader, "metrics", None)
        return metrics() if metrics is not None else {}

    def state_dict(self) -> dict[str, Any]:
        return self.loader.state_dict() if self.is_source else dict(self.RECEIVER_STATE)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """The source restores its stream; a receiver has none to restore.

        Raises:
            ValueError: a source given a receiving rank's state (the checkpoint was saved in a
                layout where this rank did not build batches).
        """
        if not self.is_source:
            return
        if state == self.RECEIVER_STATE:
            raise ValueError(
                "this rank builds its replica's batches but the checkpoint's state for it is a "
                "receiving rank's (the layout changed); set checkpoint.load_data_state=false to "
                "start the data stream afresh")
        self.loader.load_state_dict(state)

    def close(self) -> None:
        close = getattr(self.loader, "close", None)
        if close is not None:
            close()

