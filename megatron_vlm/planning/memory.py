"""Bytes one GPU holds for parameters, gradients and optimizer state (megatron-core 0.16.1).

What each configuration allocates (``training/model_setup.py``, ``optim/builder.py``):

* **Gradients**: megatron DDP keeps one contiguous fp32 grad buffer per (chunk, dense/expert,
  param dtype) (``grad_reduce_in_fp32=True``), never sharded (ZeRO-1).
* **Flat sharding** (AdamW with ``parallel.use_distributed_optimizer``, megatron's
  DistributedOptimizer): the params also move into a contiguous buffer; with the distributed
  optimizer each parameter starts at a multiple of 64 elements and each buffer ends at a multiple
  of ``lcm(dp, 128)`` (``param_and_grad_buffer.py``; one bucket per buffer, as we build DDP).
  Each DP rank keeps optimizer state for ``1/dp`` of every buffer: fp32 main params (bf16 params
  only; fp32 params are stepped in place) and Adam's two moments, 4 bytes each. Dense buffers
  shard over DP x CP, routed experts over the expert-DP group. Per-rank state is counted as
  ``ceil(real elements / dp)`` (exact at dp=1; off by at most the padding otherwise).
* **Layer-wise sharding** (Muon with ``parallel.use_distributed_optimizer``, megatron's
  LayerWiseDistributedOptimizer): parameters sorted by size and dealt to DP ranks ping-pong
  (``0..dp-1, dp-1..0, ...``, dense and expert lists apart), each rank holding the state of
  whole parameters it owns: fp32 master (bf16 params only), Muon's momentum (fp32) or Adam's two
  moments. The busiest rank is reported.
* **No sharding**: every rank holds the state of all its parameters.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from megatron_vlm.planning.tensors import DTYPE_BYTES, ParamTensor

Sharding = Literal["flat", "layerwise", "none"]
OptimizerName = Literal["adamw", "muon"]
FP32 = 4


@dataclass(frozen=True)
class StaticMemory:
    """Bytes on one GPU that do not depend on the micro-batch."""

    params: int
    """Model parameters (with megatron's buffer padding under flat sharding)."""
    grads: int
    """fp32 gradient buffers."""
    main_params: int
    """fp32 master copies of bf16 parameters held by this rank's optimizer."""
    optimizer_state: int
    """Adam moments / Muon momentum held by this rank."""
    num_params: int
    """Parameters on this GPU (elements, no padding)."""

    @property
    def total(self) -> int:
        return self.params + self.grads + self.main_params + self.optimizer_state

    def as_dict(self) -> dict[str, int]:
        return {"params": self.params, "grads": self.grads, "main_params": self.main_params,
                "optimizer_state": self.optimizer_state, "total": self.total}


@dataclass(frozen=True)
class TensorTable:
    """A parameter list as arrays (module order): what memory depends on, without names."""

    numel: np.ndarray
    dtype_bytes: np.ndarray
    expert: np.ndarray
    matrix: np.ndarray
    """2-D and not an embedding/output/position table (Muon's candidates)."""
    router: np.ndarray
    trainable: np.ndarray

    @classmethod
    def of(cls, tensors: Sequence[ParamTensor]) -> TensorTable:
        def arr(values, dtype):
            return np.fromiter(values, dtype=dtype, count=len(tensors))

        return cls(numel=arr((t.numel for t in tensors), np.int64),
                   dtype_bytes=arr((DTYPE_BYTES[t.dtype] for t in tensors), np.int64),
                   expert=arr((t.expert for t in tensors), bool),
                   matrix=arr((t.uses_muon(True) for t in tensors), bool),
                   router=arr((t.name.endswith("router.weight") for t in tensors), bool),
                   trainable=arr((t.trainable for t in tensors), bool))

    def select(self, mask: np.ndarray) -> TensorTable:
        return TensorTable(*(getattr(self, f)[mask] for f in _FIELDS))

    @classmethod
    def concat(cls, tables: Sequence[TensorTable]) -> TensorTable:
        return cls(*(np.concatenate([getattr(t, f) for t in tables]) for f in _FIELDS))


_FIELDS = ("numel", "dtype_bytes", "expert", "matrix", "router", "trainable")


def buffer_numel(numels: Sequence[int] | np.ndarray, dp: int, distributed: bool) -> int:
    """Elements of one megatron DDP buffer holding parameters of ``numels`` (module order, one
    bucket): params are laid out in reverse order, each start padded to 64 and the end to
    ``lcm(dp, 128)`` with the distributed optimizer; no padding without it."""
    n = np.asarray(numels, dtype=np.int64)
    if not distributed or n.size == 0:
        return int(n.sum())
    # Reverse order: every parameter but the last placed (module-order first) is followed by
    # padding to 64; the buffer end is padded to lcm(dp, 128).
    end = int((-(-n[1:] // 64) * 64).sum() + n[0])
    return -(-end // math.lcm(dp, 128)) * math.lcm(dp, 128)


def layerwise_ranks(numels: Sequence[int] | np.ndarray, dp: int) -> np.ndarray:
    """The DP rank megatron's ``LayerWiseDistributedOptimizer.shard_params`` gives each
    parameter (in the chained optimizers' order): stable sort by size, dealt ping-pong
    ``0..dp-1, dp-1..0, ...``."""
    loop = np.array(list(range(dp)) + list(range(dp))[::-1])
    order = np.argsort(np.asarray(numels, dtype=np.int64), kind="stable")
    ranks = np.empty(len(order), dtype=np.int64)
    ranks[order] = loop[np.arange(len(order)) % len(loop)]
    return ranks


def _muon_mask(table: TensorTable, optimizer: OptimizerName, router_in_muon: bool) -> np.ndarray:
    if optimizer != "muon":
        return np.zeros_like(table.matrix)
    return table.matrix & (router_in_muon | ~table.router)


def layerwise_deal(table: TensorTable, dp: int, optimizer: OptimizerName,
                   router_in_muon: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """``(order, ranks)``: ``table``'s parameters in the chained optimizers' order (Muon dense,
    Muon expert, AdamW dense, AdamW expert; ``optim/muon_optimizer.py``, which breaks ties of
    megatron's stable size sort) and the DP rank each gets (:func:`layerwise_ranks`)."""
    muon = _muon_mask(table, optimizer, router_in_muon)
    order = np.lexsort((table.expert, ~muon))  # primary: Muon first; then dense before expert
    return order, layerwise_ranks(table.numel[order], dp)


def _layerwise_busiest(table: TensorTable, dp: int, optimizer: OptimizerName,
                       router_in_muon: bool) -> tuple[int, int]:
    """(fp32 master bytes, state bytes) of the busiest rank of :func:`layerwise_deal`."""
    if table.numel.size == 0:
        return 0, 0
    order, ranks = layerwise_deal(table, dp, optimizer, router_in_muon)
    numel = table.numel[order]
    master = np.where(table.dtype_bytes[order] != FP32, numel * FP32, 0)
    muon = _muon_mask(table, optimizer, router_in_muon)[order]
    state = np.where(muon, 1, 2) * numel * FP32
    per_master = np.bincount(ranks, weights=master, minlength=dp)
    per_state = np.bincount(ranks, weights=state, minlength=dp)
    busiest = int(np.argmax(per_master + per_state))
    return int(per_master[busiest]), int(per_state[busiest])


def ddp_buffers(table: TensorTable, dp: int, expert_dp: int,
                distributed: bool) -> list[tuple[bool, int, int, np.ndarray]]:
    """megatron DDP's buffers of one model chunk: ``(expert, param bytes per element, buffer
    elements, mask of its parameters)`` for each (dense/expert, param dtype) group of trainable
    parameters, dense first (``distributed.py:_allocate_buffers_for_parameters``)."""
    out = []
    for expert in (False, True):
        for nbytes in (2, 4):
            mask = table.trainable & (table.expert == expert) & (table.dtype_bytes == nbytes)
            if mask.any():
                size = buffer_numel(table.numel[mask], expert_dp if expert else dp, distributed)
                out.append((expert, nbytes, size, mask))
    return out


def static_memory(
    chunks: Sequence[Sequence[ParamTensor] | TensorTable],
    *,
    optimizer: OptimizerName = "adamw",
    sharding: Sharding = "flat",
    dp: int = 1,
    expert_dp: int = 1,
    router_in_muon: bool = True,
) -> StaticMemory:
    """Bytes for parameters, gradients and optimizer state of one GPU holding ``chunks`` (its
    model chunks' parameter lists, :func:`~megatron_vlm.planning.tensors.chunk_tensors`).

    Args:
        chunks: parameter tensors (or their :class:`TensorTable`) per model chunk (virtual
            pipeline stage) of this rank.
        optimizer: ``adamw`` or ``muon`` (Muon for 2-D hidden matrices, AdamW for the rest).
        sharding: ``flat`` (DistributedOptimizer), ``layerwise`` or ``none``.
        dp: ranks the dense parameters' optimizer state is sharded over (DP x CP).
        expert_dp: ranks the routed experts' state is sharded over (world / (pp x ep x etp)).
        router_in_muon: the MoE router weight goes to Muon (``optim.muon_router``).

    Raises:
        ValueError: Muon with flat sharding (megatron's flat shards cut matrices; SPEC §2).
    """
    if optimizer == "muon" and sharding == "flat":
        raise ValueError("Muon needs whole matrices: flat DistributedOptimizer shards cut them "
                         "(Megatron-LM #2164); use layer-wise sharding")
    params = grads = masters = state = num = 0
    owned: dict[bool, list[TensorTable]] = {False: [], True: []}
    for chunk in chunks:
        table = chunk if isinstance(chunk, TensorTable) else TensorTable.of(chunk)
        num += int(table.numel.sum())
        frozen = ~table.trainable
        params += int((table.numel[frozen] * table.dtype_bytes[frozen]).sum())
        for expert, nbytes, size, mask in ddp_buffers(table, dp, expert_dp,
                                                      distributed=sharding == "flat"):
            params += size * nbytes
            grads += size * FP32
            if sharding == "flat":
                shard = -(-int(table.numel[mask].sum()) // (expert_dp if expert else dp))
                masters += shard * FP32 if nbytes != FP32 else 0
                state += 2 * shard * FP32
            else:
                owned[expert].append(table.select(mask))
    if sharding != "flat":
        for expert, tables in owned.items():
            if not tables:
                continue
            merged = TensorTable.concat(tables)
            group_dp = (expert_dp if expert else dp) if sharding == "layerwise" else 1
            m, st = _layerwise_busiest(merged, group_dp, optimizer, router_in_muon)
            masters += m
            state += st
    return StaticMemory(params=params, grads=grads, main_params=masters, optimizer_state=state,
                        num_params=num)
