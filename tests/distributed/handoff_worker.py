"""Two or three gloo processes (``RANK``, ``WORLD_SIZE``, ``MASTER_PORT``): the batch hand-off
(``parallel/batch_handoff.py``) in the layouts of two ranks -- TP=2 (one stage), PP=2 with
megatron's embedding group of first + last stage, PP=2 without one -- or of three, PP=3 (a
middle stage gets neither tokens nor the loss fields), with batches holding
None vision, empty tensors, int64/float32/bfloat16/bool tensors, ints and a list of tuples, and a
family's batch class that adds fields. Rank 0 is the source; rank 1 rebuilds the expected
batches itself (same seed) and checks what it received. Exit 0 and prints "ok" on success.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from types import SimpleNamespace

import torch
import torch.distributed as dist

from megatron_vlm.data.contract import PackedBatch, VisionInputs
from megatron_vlm.parallel.batch_handoff import hand_off, is_batch_source

S = 24


@dataclass
class FamilyBatch(PackedBatch):
    """A family's batch with fields the hand-off has never heard of."""

    mrope_position_ids: torch.Tensor | None = None
    """[3, 1, S] int64 multi-axis position ids (every stage reads them)."""
    grids: list[tuple[int, int, int]] = field(default_factory=list)
    """A non-tensor field."""


def _text(g: torch.Generator, n_docs: int) -> dict:
    lengths = [8, 6, 4][:n_docs]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    return dict(tokens=torch.randint(0, 1000, (1, S), generator=g),
                labels=torch.randint(0, 1000, (1, S), generator=g),
                loss_mask=torch.rand(1, S, generator=g).round(),
                position_ids=torch.arange(S).unsqueeze(0), cu_seqlens=cu,
                cu_seqlens_padded=cu.clone(), max_seqlen=max(lengths))


def expected_batches() -> dict[str, list[PackedBatch]]:
    """The source's batches (rank 1 builds the same from the seed, independently)."""
    g = torch.Generator().manual_seed(7)
    media = VisionInputs(
        pixel_values=torch.randn(12, 3, 14, 14, generator=g).to(torch.bfloat16),
        grid_thw=torch.tensor([[1, 2, 2], [2, 2, 2]]), placeholder_starts=torch.tensor([1, 5]),
        is_video=torch.tensor([False, True]), media_index=None,
        is_fast=torch.tensor([False, False]))
    no_items = VisionInputs(  # a micro-batch whose media are all empty tensors
        pixel_values=torch.zeros(0, 3, 14, 14), grid_thw=torch.zeros(0, 3, dtype=torch.int64),
        placeholder_starts=torch.zeros(0, dtype=torch.int64),
        is_video=torch.zeros(0, dtype=torch.bool))
    family = FamilyBatch(**_text(g, 3), mrope_position_ids=torch.randint(0, S, (3, 1, S),
                                                                         generator=g),
                         grids=[(1, 2, 2), (2, 2, 2)])
    return {"train": [PackedBatch(**_text(g, 2), vision=media,  # an M-RoPE family's [3, S] ids
                                  mrope_position_ids=torch.randint(0, S, (3, S), generator=g)),
                      PackedBatch(**_text(g, 3), vision=None),
                      PackedBatch(**_text(g, 1), vision=no_items), family],
            "scalar": [torch.tensor(3.5)]}


def check_equal(got, want, where: str) -> None:
    assert type(got) is type(want), (where, type(got), type(want))
    if isinstance(want, torch.Tensor):
        assert got.dtype == want.dtype and got.shape == want.shape, (where, got, want)
        assert torch.equal(got, want), where
    elif isinstance(want, list):
        assert len(got) == len(want), where
        for i, (a, b) in enumerate(zip(got, want)):
            check_equal(a, b, f"{where}[{i}]")
    elif isinstance(want, dict):
        assert got.keys() == want.keys(), where
        for k in want:
            check_equal(got[k], want[k], f"{where}.{k}")
    elif hasattr(want, "__dataclass_fields__"):
        for name in want.__dataclass_fields__:
            check_equal(getattr(got, name), getattr(want, name), f"{where}.{name}")
    else:
        assert got == want, (where, got, want)


def check_stand_in(got: torch.Tensor, want: torch.Tensor, where: str) -> None:
    """A field the stage does not read: shape and dtype only, no bytes behind it."""
    assert got.dtype == want.dtype and got.shape == want.shape, where
    assert not got.any() and all(s == 0 for s in got.stride()), where


def check_later_stage(got: dict, want: dict, name: str, last: bool) -> None:
    """A later stage: no tokens, no media; the loss fields on the last stage only; every other
    field (the family's added ones too) bit-exactly."""
    assert got.keys() == want.keys()
    check_equal(got["scalar"], want["scalar"], name)
    absent = {"tokens"} if last else {"tokens", "labels", "loss_mask"}
    for i, (g, w) in enumerate(zip(got["train"], want["train"])):
        where = f"{name}.train[{i}]"
        assert type(g) is type(w) and g.vision is None, where
        for f in w.__dataclass_fields__:
            if f in absent:
                check_stand_in(getattr(g, f), getattr(w, f), f"{where}.{f}")
            elif f != "vision":
                check_equal(getattr(g, f), getattr(w, f), f"{where}.{f}")
        assert g.seq_length == S and torch.equal(g.padding_mask, w.padding_mask), where


def layouts(rank: int, world_size: int) -> list[tuple[str, SimpleNamespace]]:
    """(name, groups) of this world size; every rank creates every group (new_group's rule)."""
    world = dist.group.WORLD
    solo = [dist.new_group([r]) for r in range(world_size)][rank]
    if world_size == 3:  # PP=3: the embedding group holds the first and the last stage
        ends = dist.new_group([0, 2])
        return [("pp3", SimpleNamespace(tp=solo, cp=solo, pp=world, tp_cp=solo,
                                        embd=ends if rank != 1 else None))]
    return [("tp2", SimpleNamespace(tp=world, cp=solo, pp=solo, tp_cp=world, embd=solo)),
            ("pp2", SimpleNamespace(tp=solo, cp=solo, pp=world, tp_cp=solo, embd=world)),
            ("pp2_no_embedding_group",
             SimpleNamespace(tp=solo, cp=solo, pp=world, tp_cp=solo, embd=None))]


def main() -> None:
    world_size = int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", rank=int(os.environ["RANK"]), world_size=world_size)
    rank = dist.get_rank()
    want = expected_batches()
    for name, pgs in layouts(rank, world_size):
        assert is_batch_source(pgs) == (rank == 0)
        mine = expected_batches() if rank == 0 else None
        got = hand_off(mine, pgs)
        if rank == 0:
            assert got is mine  # the source keeps its own objects
            check_equal(got, want, name)  # and they were not modified by the send
        elif name == "tp2":  # the same stage: everything
            check_equal(got, want, name)
        else:
            check_later_stage(got, want, name, last=rank == world_size - 1)
    dist.barrier()
    print(f"rank {rank} ok", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
