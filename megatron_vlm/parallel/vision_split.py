"""Split mode for the vision tower: every media item encoded on exactly one rank of its group.

Under tensor parallelism every TP rank holds the same micro-batch, so a tower that simply ran on
each rank would encode each image ``tp`` times. Two ways avoid that (``model.vision.
parallel_mode``):

* ``tp``: megatron TP (+SP) inside the tower; the TP group encodes each item jointly, once.
* ``split`` (this module): the tower is *replicated* over the TP group (built with a TP size of
  one, :func:`replica_process_groups`) and each rank encodes a cost-balanced share of the items
  (:func:`assign_items`); the merged features are gathered in item order
  (:func:`gather_items`) before the projector, which stays tensor-parallel.

Gradients in split mode. The projector runs replicated over TP with megatron's
``copy_to_tensor_model_parallel_region`` at its input, so the gradient arriving at the gathered
features is already complete and identical on every rank: the gather's backward keeps this
rank's rows, with no communication. Each rank's tower weights then hold the gradient of its own
items only; megatron's ``finalize_model_grads`` sums over TP the gradients of parameters flagged
``sequence_parallel`` (``distributed/finalize_model_grads.py:354``, the flag it uses for weights
whose TP ranks saw different tokens) -- exactly this case, so :func:`mark_replicated` sets it.
Their ``tensor_model_parallel`` flag is cleared so the grad norm counts them once
(``param_is_not_tensor_parallel_duplicate``), and :func:`set_replica_ids` gives their checkpoint
shards one main replica per TP group.

Context parallelism. Every CP rank builds the merged embeddings of the whole micro-batch and keeps
its own chunks (``models/vlm.py``), so items are split over the TP x CP ranks (split mode) or over
the CP ranks, each encoded jointly by its TP group (``tp`` mode): never on two CP ranks. The
gradient arriving at the gathered features is then *partial* per CP rank (only its tokens' share),
so the gather's backward first sums it over the CP group (``reduce_group``), then keeps this
rank's rows. The tower's weight gradients are summed over DP x CP by megatron's DDP.
"""

from __future__ import annotations

import heapq

import torch
import torch.distributed as dist
from torch import Tensor

from megatron_vlm.parallel import comm

_SINGLETON: dict[int, dist.ProcessGroup] = {}


def item_costs(grid_thw: Tensor, hidden_size: int, ffn_hidden_size: int) -> list[float]:
    """Relative encoder cost of each item ``(t, h, w)``: per layer, ``2N(4D^2 + 2DF)`` for the
    linears and ``4N^2 D`` for attention over its ``N = t*h*w`` patches (block-diagonal)."""
    d, f = hidden_size, ffn_hidden_size
    n = grid_thw.prod(dim=1).double()
    return (2 * n * (4 * d * d + 2 * d * f) + 4 * n * n * d).tolist()


def assign_items(costs: list[float], num_ranks: int) -> list[int]:
    """Owner rank of each item: longest-processing-time-first onto the least loaded rank (ties to
    the lower rank, then the lower item index), so every rank computes the same answer."""
    owners = [0] * len(costs)
    loads = [(0.0, r) for r in range(num_ranks)]
    for m in sorted(range(len(costs)), key=lambda i: (-costs[i], i)):
        load, rank = heapq.heappop(loads)
        owners[m] = rank
        heapq.heappush(loads, (load + costs[m], rank))
    return owners


def singleton_group() -> dist.ProcessGroup:
    """A process group holding only this rank (created once per default group; only this rank
    takes part in creating it, so no other rank has to call this)."""
    key = id(dist.distributed_c10d._get_default_group())
    if key not in _SINGLETON:
        _SINGLETON[key] = dist.new_group([dist.get_rank()], use_local_synchronization=True)
    return _SINGLETON[key]


def forget_groups() -> None:
    """Drop the cached singleton groups (``destroy_distributed`` calls this: a later default
    group may reuse the old one's id)."""
    _SINGLETON.clear()


def replica_process_groups(pg_collection):
    """The groups a module replicated over the real TP x CP ranks is built with: ``pg_collection``'s
    pipeline group, and TP, CP and TP x CP of this rank alone (the module is unsharded)."""
    from megatron.core.process_groups_config import ProcessGroupCollection

    alone = singleton_group()
    return ProcessGroupCollection(tp=alone, cp=alone, tp_cp=alone, pp=pg_collection.pp)


def mark_replicated(module: torch.nn.Module) -> None:
    """Flag ``module``'s parameters as replicated over TP with per-rank partial gradients (see
    the module docstring): summed over TP by ``finalize_model_grads``, counted once in norms."""
    for p in module.parameters():
        p.tensor_model_parallel = False
        p.partition_dim, p.partition_stride = -1, 1
        p.sequence_parallel = True


def set_replica_ids(sharded_state_dict: dict, group_rank: int) -> None:
    """Make ``group_rank`` part of every shard's replica id (in place): a module built with
    :func:`replica_process_groups` tags its shards as TP rank 0 on every TP rank, and
    dist_checkpointing needs exactly one main replica (all-zero id) per shard."""
    from megatron.core.dist_checkpointing.mapping import ShardedBase

    for value in sharded_state_dict.values():
        if isinstance(value, dict):
            set_replica_ids(value, group_rank)
        elif isinstance(value, ShardedBase):
            rid = value.replica_id  # megatron's (pp/other, tp, dp) or a plain int
            if isinstance(rid, int):
                value.replica_id = (rid, group_rank)
            elif len(rid) >= 2:
                value.replica_id = (rid[0], group_rank, *rid[2:])
            else:
                value.replica_id = (*rid, group_rank)


class _GatherItems(torch.autograd.Function):
    """All-gather of per-rank item rows (uneven counts) into item order; backward slices."""

    @staticmethod
    def forward(ctx, local: Tensor, anchor: Tensor, counts: list[int], order: Tensor,
                group: dist.ProcessGroup, reduce_group: dist.ProcessGroup | None) -> Tensor:
        # gloo's all_gather needs equal shapes: pad every rank's rows to the largest count.
        most = max(counts)
        padded = local.new_zeros((most, *local.shape[1:]))
        padded[: local.shape[0]] = local.detach()
        parts = [torch.empty_like(padded) for _ in counts]
        comm.all_gather(parts, padded.contiguous(), group=group)
        rank_major = torch.cat([p[:c] for p, c in zip(parts, counts)])
        ctx.mine = order_rows(order, counts, dist.get_rank(group))
        ctx.reduce_group = reduce_group
        return rank_major.index_select(0, order.to(local.device))

    @staticmethod
    def backward(ctx, grad: Tensor):
        # The consumer runs replicated over TP and its input gradient is complete on every TP
        # rank (module docstring); under CP each CP rank holds only its tokens' share: sum it.
        if ctx.reduce_group is not None and ctx.reduce_group.size() > 1:
            grad = grad.contiguous().clone()
            comm.all_reduce(grad, group=ctx.reduce_group)
        return grad.index_select(0, ctx.mine.to(grad.device)), None, None, None, None, None


def order_rows(order: Tensor, counts: list[int], rank: int) -> Tensor:
    """Rows of the item-ordered output that came from ``rank`` (in that rank's row order)."""
    start = sum(counts[:rank])
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(order.numel())
    return inverse[start: start + counts[rank]]


def rank_major_order(rows_per_item: list[int], owners: list[int],
                     num_ranks: int) -> tuple[list[int], Tensor]:
    """``(rows per rank, order)``: gathering every rank's rows (its items in item order) rank
    after rank gives a rank-major layout; ``rank_major[order]`` is in item order."""
    counts = [0] * num_ranks
    starts = [0] * len(owners)
    for rank in range(num_ranks):
        for m, owner in enumerate(owners):
            if owner == rank:
                starts[m] = sum(counts)  # ranks after this one hold nothing yet
                counts[rank] += rows_per_item[m]
    order = (torch.cat([torch.arange(s, s + n) for s, n in zip(starts, rows_per_item)])
             if owners else torch.zeros(0, dtype=torch.long))
    return counts, order


def gather_items(local: Tensor, anchor: Tensor, rows_per_item: list[int], owners: list[int],
                 group: dist.ProcessGroup, reduce_group: dist.ProcessGroup | None = None
                 ) -> Tensor:
    """Every rank's item rows, in item order.

    Args:
        local: ``[sum of this rank's rows, ...]``: the rows of the items this rank owns, in item
            order.
        anchor: a tower parameter; it keeps the result attached to the autograd graph on a rank
            that owns no item, so every rank runs the same backward collectives downstream.
        rows_per_item: rows of each item (its merged LLM tokens).
        owners: owner rank of each item (:func:`assign_items`).
        group: the ranks sharing the items (TP, CP or TP x CP group).
        reduce_group: ranks whose consumers see partial gradients of the gathered rows (the CP
            group): the backward sums over it. None: the gradient is complete on every rank.
    """
    counts, order = rank_major_order(rows_per_item, owners, group.size())
    if local.shape[0] != counts[dist.get_rank(group)]:
        raise ValueError(f"this rank encoded {local.shape[0]} rows but owns "
                         f"{counts[dist.get_rank(group)]}")
    return _GatherItems.apply(local, anchor, counts, order, group, reduce_group)
