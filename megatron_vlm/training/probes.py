"""Does the vision path carry information? Held-out loss with the true media vs corrupted media.

* ``shuffle_media``: media items are permuted between samples (only among items of the same
  grid, so every placeholder count still matches) -- a model that ignores pixels is unaffected.
* ``reverse_frames``: every video is played backwards: all its frames (over all its chunks) in
  reverse order, cut again into the same chunk sizes (a 6-frame video, chunks 4 + 2, becomes
  frames 6,5,4,3 | 2,1) -- a model that ignores time is unaffected, both inside a chunk and in
  the order of chunks.
* ``restrict_loss``: keep the loss only on the caption tokens a probe is about (e.g. the
  direction word after "moves from the"), so a few order-dependent tokens are not drowned by the
  many that any video of the right content predicts.

All keep the text, the placeholders and the packing identical; only pixels (or the loss mask)
change. Inputs are never modified.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

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
    for grid in sorted({it[2] for it in items}):
        group = [it for it in items if it[2] == grid]
        # A cyclic shift of a random order: nobody keeps their own pixels when the group has > 1.
        order = torch.randperm(len(group), generator=gen).tolist()
        for k, idx in enumerate(order):
            src = group[order[(k + 1) % len(order)]]
            new_pixels[(group[idx][0], group[idx][1])] = src[3]
    return [_with_pixels(batch, b, new_pixels) for b, batch in enumerate(batches)]


def video_items(vision: VisionInputs) -> list[list[int]]:
    """Item indices of each video of a micro-batch, chunks in time order. A video whose items
    differ in frame size (Keye's SlowFast: slow and fast frames) gives one list per frame size,
    so ``reverse_frames`` plays each size's frames backwards among the slots of that size (the
    placeholders stay; the slow frames' order and the fast frames' order both reverse).

    Raises:
        ValueError: The batch does not say which chunks form one video (``media_index``).
    """
    if vision.media_index is None:
        raise ValueError("VisionInputs.media_index is None: the producer did not record which "
                         "chunks belong to one video, so frame order cannot be reversed")
    videos: dict[int, dict[tuple[int, int], list[int]]] = {}
    for i, (media, is_video) in enumerate(zip(vision.media_index.tolist(),
                                              vision.is_video.tolist())):
        if is_video:
            size = tuple(vision.grid_thw[i, 1:].tolist())
            videos.setdefault(media, {}).setdefault(size, []).append(i)
    return [items for sizes in videos.values() for items in sizes.values()]


def reverse_frames(batches: list[PackedBatch]) -> list[PackedBatch]:
    """Play every video backwards: its frames in reverse order, re-cut into its chunk sizes.

    The chunk sizes (so every grid and placeholder count) stay as they were; a video's first
    chunk now holds its last frames, last one first. A video whose frame sequence is a
    palindrome (e.g. static) keeps its pixels exactly.
    """
    out = []
    for b, batch in enumerate(batches):
        new_pixels = {}
        if batch.vision is not None:
            vision, slices = batch.vision, _item_slices(batch.vision)
            for items in video_items(vision):
                _, h, w = vision.grid_thw[items[0]].tolist()
                frames = torch.cat([vision.pixel_values[slices[i]].reshape(-1, h * w, 3, 14, 14)
                                    for i in items]).flip(0)
                start = 0
                for i in items:
                    t = int(vision.grid_thw[i, 0])
                    new_pixels[(b, i)] = frames[start : start + t].reshape(t * h * w, 3, 14, 14)
                    start += t
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


def only_changed_documents(before: list[PackedBatch],
                           after: list[PackedBatch]) -> list[PackedBatch]:
    """``before`` with the loss mask kept only on documents that hold a media item whose pixels
    differ in ``after`` (a probe that could not move an item -- e.g. the only one of its grid --
    then does not dilute the comparison). Apply the same masks to both sides."""
    out = []
    for x, y in zip(before, after):
        keep = torch.zeros_like(x.loss_mask)
        if x.vision is not None:
            bounds = x.cu_seqlens_padded.tolist()
            for i, sl in enumerate(_item_slices(x.vision)):
                if torch.equal(x.vision.pixel_values[sl], y.vision.pixel_values[sl]):
                    continue
                start = int(x.vision.placeholder_starts[i])
                doc = max(d for d in range(len(bounds) - 1) if bounds[d] <= start)
                keep[0, bounds[doc] : bounds[doc + 1]] = 1
        out.append(dataclasses.replace(x, loss_mask=x.loss_mask * keep))
    return out


def _with_loss_mask(batches: list[PackedBatch], masked: list[PackedBatch]) -> list[PackedBatch]:
    return [dataclasses.replace(b, loss_mask=m.loss_mask) for b, m in zip(batches, masked)]


def phrase_targets(tokens: torch.Tensor, prefix: Sequence[int],
                   words: Sequence[Sequence[int]]) -> torch.Tensor:
    """[S] bool: True at input positions that predict a token of one of ``words`` written
    directly after ``prefix`` (position ``i`` predicts ``tokens[i + 1]``).

    Args:
        tokens: [S] token ids of a packed sequence.
        prefix: Token ids that must precede the word (e.g. ``encode("moves from the")``).
        words: Token ids of each word of interest (e.g. ``encode(" left")``).
    """
    ids = tokens.tolist()
    out = torch.zeros(len(ids), dtype=torch.bool)
    p = len(prefix)
    for word in words:
        n = len(word)
        for j in range(p, len(ids) - n + 1):  # j: first token of the word
            if ids[j - p : j] == list(prefix) and ids[j : j + n] == list(word):
                out[j - 1 : j - 1 + n] = True
    return out


def restrict_loss(batches: list[PackedBatch], prefix: Sequence[int],
                  words: Sequence[Sequence[int]]) -> list[PackedBatch]:
    """Batches whose loss mask keeps only the positions predicting one of ``words`` after
    ``prefix`` (and already in the loss); everything else is unchanged."""
    out = []
    for batch in batches:
        keep = phrase_targets(batch.tokens[0], prefix, words).to(batch.loss_mask.dtype)
        out.append(dataclasses.replace(batch, loss_mask=batch.loss_mask * keep.unsqueeze(0)))
    return out


# ------------------------------------------------------------------------------ the probe run

DIRECTION_PREFIX = "moves from the"
"""Video captions say ``first the <shape> moves from the <direction> to the <direction>``: the
word after this prefix is the one the direction of motion decides (the words after it follow
from the text alone)."""
DIRECTION_WORDS = ("left", "right", "top", "bottom")


def phrase_ids(tokenizer, prefix: str, words: Sequence[str]) -> tuple[list[int], list[list[int]]]:
    """Token ids of ``prefix`` and of each word as tokenised right after it.

    Raises:
        ValueError: ``prefix + " " + word`` does not start with the tokens of ``prefix``.
    """
    pre = list(tokenizer.encode(prefix))
    out = []
    for word in words:
        full = list(tokenizer.encode(f"{prefix} {word}"))
        if full[: len(pre)] != pre or len(full) == len(pre):
            raise ValueError(f"{prefix!r} + {word!r} does not tokenise as prefix then word")
        out.append(full[len(pre):])
    return pre, out


def run_vision_probes(run_dir: str, num_batches: int = 16) -> dict[str, dict[str, float]]:
    """Held-out losses of a trained VLM run with true, shuffled and reversed media.

    Loads the newest checkpoint of ``run_dir`` (one process), takes up to ``num_batches``
    held-out micro-batches of ``image_caption`` and ``video`` and returns, per dataset, the
    per-token loss with the true media and media shuffled between samples (``true`` /
    ``shuffled``, on the documents whose media the shuffle moved), and -- for videos -- with every
    video played backwards (``true_all`` / ``reversed``, all documents); for videos also the true,
    shuffled and reversed loss on the direction words only (``*_direction``, ``direction_tokens``
    of them), and how many media items each corruption changed.
    """
    from pathlib import Path

    from megatron_vlm.checkpoint import find_latest_checkpoint, load_checkpoint
    from megatron_vlm.config import apply_overrides, load_yaml
    from megatron_vlm.parallel.init import init_distributed
    from megatron_vlm.training.data_setup import build_data
    from megatron_vlm.training.model_setup import build_model_chunks
    from megatron_vlm.training.trainer import run_forward_backward

    run = Path(run_dir)
    job = apply_overrides(load_yaml(str(run / "job.yaml")), [f"train.eval_batches={num_batches}"])
    if not job.model.is_vlm:
        raise ValueError(f"{run} is a text-only run; the vision probes need a VLM")
    runtime = init_distributed(job.parallel, job.train.seed, model=job.model)
    data = build_data(job, 0, 1, run)
    chunks = build_model_chunks(job, runtime=runtime)
    ckpt = find_latest_checkpoint(run / "checkpoints")
    if ckpt is None:
        raise ValueError(f"{run / 'checkpoints'} holds no complete checkpoint")
    load_checkpoint(ckpt, chunks, None, None, load_optimizer=False)
    for c in chunks:
        c.eval()

    def loss(batches: list[PackedBatch]) -> float:
        with torch.no_grad():
            total = run_forward_backward(chunks, batches, job.data.seq_length, forward_only=True,
                                         pg_collection=runtime.pg_collection)
        return (total[0] / total[1].clamp(min=1)).item()

    out: dict[str, dict[str, float]] = {}
    try:
        for name in ("image_caption", "video"):
            batches = data.valid.get(name)
            if not batches:
                continue
            shuffled = shuffle_media(batches)
            # Compared on the documents whose media the shuffle could move (unique grids stay).
            moved = only_changed_documents(batches, shuffled)
            r = {"true": loss(moved), "shuffled": loss(_with_loss_mask(shuffled, moved)),
                 "shuffled_items": count_changed_items(batches, shuffled),
                 "items": sum(len(b.vision.grid_thw) for b in batches if b.vision is not None)}
            if name == "video":
                reversed_ = reverse_frames(batches)
                r.update(true_all=loss(batches), reversed=loss(reversed_),
                         reversed_items=count_changed_items(batches, reversed_))
                prefix, words = phrase_ids(data.tokenizer, DIRECTION_PREFIX, DIRECTION_WORDS)
                only = [restrict_loss(x, prefix, words) for x in (batches, shuffled, reversed_)]
                r.update(true_direction=loss(only[0]), shuffled_direction=loss(only[1]),
                         reversed_direction=loss(only[2]),
                         direction_tokens=sum(b.num_loss_tokens for b in only[0]))
            out[name] = r
    finally:
        data.close()
    return out
