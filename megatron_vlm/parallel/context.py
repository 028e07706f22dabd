"""Context parallelism for packed (THD) sequences: the load-balanced split and the K/V gather.

Convention (megatron-core / Transformer Engine, ``utils.get_thd_batch_on_this_cp_rank`` with TE's
``thd_get_partitioned_indices``): every document span of the packed sequence -- its *padded*
length ``L`` a multiple of ``2*cp`` (SPEC §11), the tail after the last document counted as one
more document -- is cut into ``2*cp`` equal chunks, and CP rank ``r`` holds chunks ``r`` and
``2*cp - 1 - r`` of every document, in document order. Under causal attention chunk ``j`` costs
about ``j + 1/2`` units, so each rank's pair costs the same ``2*cp`` units (load balance).

What is split and what is not (the same as megatron's THD path with TE):

* split: every per-token tensor -- the merged multimodal embeddings (vision features already
  scattered in, ``models/vlm.py``), labels, loss mask, position ids (1D ``[1, S]`` and an M-RoPE
  family's ``[3, S]`` ``mrope_position_ids``, both along their last dim, so each token keeps its
  own (t, h, w)), the MoE padding mask;
* **not** split: ``PackedSeqParams``. Every CP rank keeps the *global* ``cu_seqlens`` /
  ``cu_seqlens_padded`` / ``max_seqlen``: megatron's THD RoPE
  (``models/common/embeddings/rope_utils.py:_apply_rotary_pos_emb_thd``) divides the padded
  lengths by ``cp`` and takes positions ``[r*c, (r+1)*c)`` and ``[L-(r+1)*c, L-r*c)`` of each
  document (``_get_thd_freqs_on_this_cp_rank``), exactly the chunks this module gives rank ``r``,
  so every token keeps its global position within its document; and TE's CP attention takes the
  global boundaries too.

Torch-only (TE's ``thd_get_partitioned_indices`` is a CUDA kernel): :func:`cp_partition_index`
is its equivalent on any device, checked against the 2cp rule in ``tests/unit``.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise

import torch
import torch.distributed as dist
from torch import Tensor


def document_spans(cu_seqlens_padded: Tensor | list[int], total: int) -> list[tuple[int, int]]:
    """``(start, padded length)`` of every document of a packed sequence of ``total`` tokens;
    the tail after the last boundary is one more document (as ``thd_packed_seq_params`` makes it).
    """
    cu = [int(x) for x in (cu_seqlens_padded.tolist() if isinstance(cu_seqlens_padded, Tensor)
                           else cu_seqlens_padded)]
    if cu[-1] > total:
        raise ValueError(f"cu_seqlens_padded ends at {cu[-1]} but the sequence has {total} tokens")
    if cu[-1] < total:
        cu = [*cu, total]
    return [(a, b - a) for a, b in pairwise(cu)]


def check_cp_alignment(spans: list[tuple[int, int]], cp_size: int) -> None:
    """``ValueError`` naming the first document whose padded length is not a multiple of
    ``2*cp`` (the data must pad documents to a multiple of 2*cp, x tp with sequence
    parallelism: ``data.pad_to_multiple``)."""
    for d, (start, length) in enumerate(spans):
        if length % (2 * cp_size):
            raise ValueError(
                f"context parallelism (cp={cp_size}) needs every document span padded to a "
                f"multiple of 2*cp={2 * cp_size}; document {d} at token {start} spans {length} "
                "tokens (set data.pad_to_multiple to a multiple of 2*cp, x tp with sequence "
                "parallelism, and data.seq_length to a multiple of 2*cp*tp)")


def cp_partition_index(cu_seqlens_padded: Tensor | list[int], total: int, cp_size: int,
                       cp_rank: int) -> Tensor:
    """Global token indices held by CP rank ``cp_rank``, in its local order: for every document,
    chunk ``cp_rank`` then chunk ``2*cp_size - 1 - cp_rank`` of its ``2*cp_size`` equal chunks.

    The torch equivalent of Transformer Engine's ``tex.thd_get_partitioned_indices
    (cu_seqlens_padded, total, cp_size, cp_rank)``; ``[total / cp_size]`` int64.
    """
    if not 0 <= cp_rank < cp_size:
        raise ValueError(f"cp_rank={cp_rank} outside [0, {cp_size})")
    spans = document_spans(cu_seqlens_padded, total)
    if cp_size == 1:
        return torch.arange(total)
    check_cp_alignment(spans, cp_size)
    pieces = []
    for start, length in spans:
        c = length // (2 * cp_size)
        if c == 0:
            continue
        for j in (cp_rank, 2 * cp_size - 1 - cp_rank):
            pieces.append(torch.arange(start + j * c, start + (j + 1) * c))
    return torch.cat(pieces) if pieces else torch.zeros(0, dtype=torch.long)


def split_for_context_parallel(x: Tensor, index: Tensor, dim: int) -> Tensor:
    """This rank's tokens of ``x`` along ``dim`` (``index`` from :func:`cp_partition_index`)."""
    return x.index_select(dim, index.to(x.device))


def unsplit_context_parallel(parts: list[Tensor], cu_seqlens_padded: Tensor | list[int],
                             total: int, dim: int) -> Tensor:
    """Inverse of the split: every rank's part (rank order) back in global token order."""
    cp_size = len(parts)
    out_shape = list(parts[0].shape)
    out_shape[dim] = total
    out = parts[0].new_zeros(out_shape)
    for rank, part in enumerate(parts):
        index = cp_partition_index(cu_seqlens_padded, total, cp_size, rank).to(part.device)
        out.index_copy_(dim, index, part)
    return out


@dataclass
class ContextParallelLayout:
    """Where this rank's tokens lie in the global packed sequence (one micro-batch)."""

    cp_size: int
    cp_rank: int
    total: int
    """Tokens of the global packed sequence ``S``."""
    local_index: Tensor
    """``[S / cp]`` int64: global index of each local token (this rank's local order)."""
    gathered_to_global: Tensor
    """``[S]`` int64: position in the rank-major all-gather of each global token (so
    ``gathered.index_select(0, gathered_to_global)`` is in global order)."""


def context_parallel_layout(cu_seqlens_padded: Tensor | list[int], total: int, cp_size: int,
                            cp_rank: int, device: torch.device | str = "cpu"
                            ) -> ContextParallelLayout:
    """The :class:`ContextParallelLayout` of rank ``cp_rank`` for a sequence of ``total``
    tokens."""
    gathered = torch.cat([cp_partition_index(cu_seqlens_padded, total, cp_size, r)
                          for r in range(cp_size)])  # gathered position -> global index
    inverse = torch.empty_like(gathered)
    inverse[gathered] = torch.arange(total)
    local = gathered[cp_rank * (total // cp_size):(cp_rank + 1) * (total // cp_size)]
    return ContextParallelLayout(cp_size=cp_size, cp_rank=cp_rank, total=total,
                                 local_index=local.to(device),
                                 gathered_to_global=inverse.to(device))


def gather_context_parallel(x_local: Tensor, layout: ContextParallelLayout,
                            group: dist.ProcessGroup) -> Tensor:
    """All CP ranks' tokens ``[S / cp, ...]`` -> ``[S, ...]`` in global order, differentiable.

    megatron's ``gather_from_sequence_parallel_region`` (all-gather along dim 0 on ``group``)
    with ``tensor_parallel_output_grad=True``: its backward *reduce-scatters* the gradient, so
    each rank receives the sum over all ranks of the gradient of its own tokens (every rank's
    queries attend them) -- the K/V gradient rule of all-gather context parallelism.
    """
    from megatron.core.tensor_parallel.mappings import gather_from_sequence_parallel_region

    gathered = gather_from_sequence_parallel_region(
        x_local.contiguous(), tensor_parallel_output_grad=True, group=group)
    return gathered.index_select(0, layout.gathered_to_global.to(gathered.device))
