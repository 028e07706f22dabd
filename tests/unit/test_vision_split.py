"""Split mode's pure parts (parallel/vision_split.py): item costs, the balanced assignment, the
item order of the gathered rows, checkpoint replica ids."""

from __future__ import annotations

import itertools
import random

import pytest
import torch

from megatron_vlm.parallel.vision_split import (
    assign_items,
    item_costs,
    rank_major_order,
    set_replica_ids,
)


def test_item_cost_is_linears_plus_attention_per_layer():
    # One layer of width D, MLP F over N patches: q,k,v,proj 4*N*D*D and fc1, fc2 2*N*D*F
    # multiply-adds (x2 FLOPs), scores and weighted values 2*N*N*D multiply-adds (x2).
    d, f = 8, 24
    grid = torch.tensor([[1, 2, 2], [4, 2, 6]])
    for cost, n in zip(item_costs(grid, d, f), (4, 48)):
        assert cost == 2 * (4 * n * d * d + 2 * n * d * f) + 2 * (2 * n * n * d)


@pytest.mark.parametrize("num_ranks", [2, 3])
def test_assignment_is_within_grahams_lpt_bound_of_the_optimum(num_ranks):
    """Longest-processing-time-first makespan <= (4/3 - 1/(3m)) x optimal (Graham, 1969);
    optimum by brute force over every assignment."""
    rng = random.Random(num_ranks)
    for _ in range(30):
        costs = [float(rng.randint(1, 50)) for _ in range(rng.randint(1, 7))]
        owners = assign_items(costs, num_ranks)
        assert all(0 <= o < num_ranks for o in owners)
        loads = [sum(c for c, o in zip(costs, owners) if o == r) for r in range(num_ranks)]
        best = min(max(sum(c for c, o in zip(costs, combo) if o == r) for r in range(num_ranks))
                   for combo in itertools.product(range(num_ranks), repeat=len(costs)))
        assert max(loads) <= (4 / 3 - 1 / (3 * num_ranks)) * best + 1e-9
        assert assign_items(costs, num_ranks) == owners  # deterministic


def test_assignment_by_hand():
    # 24, 16, 4, 12, 12: 24 -> r0; 16 -> r1; 12 (item 3) -> r1 (16 < 24); 12 (item 4) -> r0
    # (24 < 28); 4 -> r1 (28 < 36).
    assert assign_items([24.0, 16.0, 4.0, 12.0, 12.0], 2) == [0, 1, 1, 1, 0]
    assert assign_items([5.0], 4) == [0]
    assert assign_items([], 2) == []


def test_rank_major_rows_come_back_in_item_order():
    rng = random.Random(0)
    for _ in range(20):
        num_ranks = rng.randint(1, 4)
        rows = [rng.randint(1, 5) for _ in range(rng.randint(0, 8))]
        owners = [rng.randrange(num_ranks) for _ in rows]
        counts, order = rank_major_order(rows, owners, num_ranks)
        # Label every row with its item, lay them out as the gather does, then reorder.
        item_rows = [[m] * n for m, n in enumerate(rows)]
        rank_major = [m for r in range(num_ranks) for m, o in enumerate(owners) if o == r
                      for m in item_rows[m]]
        assert counts == [sum(n for n, o in zip(rows, owners) if o == r)
                          for r in range(num_ranks)]
        assert [rank_major[i] for i in order.tolist()] == [m for m in item_rows for m in m]


def test_replica_ids_name_the_tp_rank():
    from megatron.core.dist_checkpointing.mapping import ShardedObject, ShardedTensor

    state = {
        "w": ShardedTensor.from_rank_offsets("w", torch.zeros(2, 2), replica_id=(0, 0, 1)),
        "nested": {"o": ShardedObject("o", None, (1,), (0,), replica_id=0)},
    }
    set_replica_ids(state, 1)
    assert state["w"].replica_id == (0, 1, 1)
    assert state["nested"]["o"].replica_id == (0, 1)
    set_replica_ids(state, 0)  # rank 0 of the TP group stays the main replica
    assert state["w"].replica_id == (0, 0, 1) and state["nested"]["o"].replica_id == (0, 0)
