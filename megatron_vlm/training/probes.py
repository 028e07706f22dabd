"""Does the vision path carry information? Held-out loss with the true media vs corrupted media.

* ``shuffle``: media items are permuted between samples (only among items of the same grid, so
  every placeholder count still matches) -- a model that ignores pixels is unaffected.
* ``reverse``: the frames of every video chunk are reversed -- a model that ignores time (or
  motion direction) is unaffected.

Both keep the text, the placeholders and the packing identical; only pixels move.
"""

from __future__ import annotations

import dataclasses

import torch

from megatron_vlm.data.contract import PackedBatch, VisionInputs


def _item_slices(vision: VisionInputs) -> list[slice]:
    bounds = vision.cu_seqlens.tolist()
    return [slice(a, b) for a, b in zip(bounds[:-1], bounds[1:])]


def shuffle_media(batches: list[PackedBatch], seed: int = 0) -> list[PackedBatch]:
    """Permute media items across all ``batches`` among items with an identical grid.

    Items whose grid is unique keep their pixels. Returns new batches (inputs are not changed).
    """
    items = []  # (batch index, item index, grid, pixels)
    for b, batch in enumerate(batches):
        if batch.vision is None:
            continue
        for i, sl in enumerate(_item_slices(batch.vision)):
            grid = tuple(batch.vision.grid_thw[i].tolist())
            items.append((b, i, grid, batch.vision.pixel_values[sl]))
    gen = torch.Generator().manual_seed(seed)
    new_pixels: dict[tuple[int, int], torch.Tensor] = {}
    for grid in {it[2] for it in items}:
        group = [it for it in items if it[2] == grid]
        # A cyclic shift of a random order: nobody keeps their own pixels when the group has > 1.
        order = torch.randperm(len(group), generator=gen).tolist()
        for k, idx in enumerate(order):
            src = group[order[(k + 1) % len(order)]]
            new_pixels[(group[idx][0], group[idx][1])] = src[3]
    return [_with_pixels(batch, b, new_pixels) for b, batch in enumerate(batches)]


def reverse_frames(batches: list[PackedBatch]) -> list[PackedBatch]:
    """Reverse the frame order inside every video chunk (t > 1)."""
    out = []
    for b, batch in enumerate(batches):
        new_pixels = {}
        if batch.vision is not None:
            for i, sl in enumerate(_item_slices(batch.vision)):
                t, h, w = batch.vision.grid_thw[i].tolist()
                if t > 1:
                    frames = batch.vision.pixel_values[sl].reshape(t, h * w, 3, 14, 14)
                    new_pixels[(b, i)] = frames.flip(0).reshape(t * h * w, 3, 14, 14)
        out.append(_with_pixels(batch, b, new_pixels))
    return out


def _with_pixels(batch: PackedBatch, b: int, new_pixels: dict) -> PackedBatch:
    if batch.vision is None:
        return batch
    pixels = batch.vision.pixel_values.clone()
    for i, sl in enumerate(_item_slices(batch.vision)):
        if (b, i) in new_pixels:
            pixels[sl] = new_pixels[(b, i)]
    vision = dataclasses.replace(batch.vision, pixel_values=pixels)
    return dataclasses.replace(batch, vision=vision)


def count_changed_items(before: list[PackedBatch], after: list[PackedBatch]) -> int:
    """Media items whose pixels differ (to check a probe really corrupted something)."""
    changed = 0
    for x, y in zip(before, after):
        if x.vision is None:
            continue
        for sl in _item_slices(x.vision):
            changed += int(not torch.equal(x.vision.pixel_values[sl], y.vision.pixel_values[sl]))
    return changed
