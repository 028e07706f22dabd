"""The temporal-pool patch merger (``tpool_patch_merger``, SPEC §2).

Per item ``(t, h, w)``: ``x.view(t, h/kh, kh, w/kw, kw, d).transpose(2, 3).mean(0)`` reshaped to
``(h/kh * w/kw, kh * kw, d)``: each LLM token gathers a ``kh x kw`` block of patches (sub-token
order row-major inside the block) averaged over the item's frames. Images (t = 1) only regroup.

Items of different t (images next to video chunks, a short last chunk) are merged in one call:
items are grouped by t (at most ``temporal_patch_size`` groups), each group is one gather and one
mean, and a final gather restores item order -- deterministic, no per-item kernels, no atomics.
"""

from __future__ import annotations

import torch
from torch import Tensor


def merge_index(
    grid_thw: Tensor, kernel_height: int, kernel_width: int
) -> tuple[dict[int, Tensor], Tensor]:
    """Gather indices for :func:`tpool_patch_merger` (CPU).

    Returns:
        ``(by_t, order)``: ``by_t[t]`` is ``[n_t * kh * kw, t]``, the source patches of every
        sub-token of the items with ``t`` frames (frame axis last, to be averaged);
        ``order [num_merged * kh * kw]`` maps item order to rows of ``cat(by_t values)``.
    """
    by_t: dict[int, list[Tensor]] = {}
    position: dict[int, list[Tensor]] = {}  # where each group's rows go in item order
    start = merged = 0
    k = kernel_height * kernel_width
    for t, h, w in grid_thw.tolist():
        if h % kernel_height or w % kernel_width:
            raise ValueError(
                f"grid (t={t}, h={h}, w={w}) is not divisible by the merge kernel "
                f"{kernel_height}x{kernel_width}; pad images to multiples of patch x merge"
            )
        nh, nw = h // kernel_height, w // kernel_width
        idx = torch.arange(start, start + t * h * w).view(t, nh, kernel_height, nw, kernel_width)
        by_t.setdefault(t, []).append(idx.permute(1, 3, 2, 4, 0).reshape(nh * nw * k, t))
        position.setdefault(t, []).append(torch.arange(merged, merged + nh * nw * k))
        start += t * h * w
        merged += nh * nw * k
    groups = sorted(by_t)
    dest = torch.cat([torch.cat(position[t]) for t in groups])
    order = torch.empty_like(dest)
    order[dest] = torch.arange(len(dest))
    return {t: torch.cat(by_t[t]) for t in groups}, order


def tpool_patch_merger(
    x: Tensor, grid_thw: Tensor, kernel_height: int = 2, kernel_width: int = 2
) -> Tensor:
    """``x [sum(t*h*w), d]`` -> ``[sum(h*w / (kh*kw)), kh*kw, d]`` (frame mean per sub-token)."""
    by_t, order = merge_index(grid_thw.cpu(), kernel_height, kernel_width)
    pooled = []
    for t, index in by_t.items():
        rows = x.index_select(0, index.flatten().to(x.device)).view(*index.shape, x.shape[-1])
        pooled.append(rows[:, 0] if t == 1 else rows.mean(dim=1))
    out = torch.cat(pooled).index_select(0, order.to(x.device))
    return out.view(-1, kernel_height * kernel_width, x.shape[-1])
