"""Videos fitted to the micro-batch budgets instead of dropped, and what a recipe would drop.

A document whose tokens exceed ``seq_length`` or whose ViT patches exceed
``max_patches_per_micro_batch`` used to be skipped (``too_long``) whole; with video that is most
real clips (a 5 s 720p clip is 11,440 patches at Kimi K2.5's 1,024 patches per frame, over
``kimi_k25``'s 8,192). ``fit_videos`` finds, for the uniform (Kimi) sampler, the settings at which
the document fits, in this order:

1. **Resolution.** Lower the per-frame patch budget ``max_patches`` of ``navit_resize`` (the
   family's resize rule; it never upscales) from ``video_chunk_max_patches`` down to
   ``video_min_patches_per_frame``, keeping the sampling rate: the **largest** integer budget
   that fits (binary search: the padded grid, hence patches and placeholder tokens, never shrink
   as the budget grows).
2. **Sampling rate.** At the minimum per-frame budget, lower the rate from ``video_fps`` down to
   ``video_min_fps``: the **highest** rate that fits, among the rates where some video of the
   document changes its frame count (``fps_candidates``: for ``n`` frames, the smallest float
   rate that samples ``n``, i.e. ``n`` frames spread evenly over the clip) plus ``video_min_fps``
   itself (binary search over them, highest first).
3. Otherwise the document stays ``too_long``.

All videos of one document share the fitted budget and rate. The choice is deterministic and a
function of the headers only, so planning (header probe) and decoding (``decode_document``) use
the same numbers: ``PlannedMedia.frame_max_patches`` / ``PlannedMedia.fps``. Text timestamps can
lengthen by a digit as the rate changes, so the search assumes costs monotone in both knobs; the
chosen settings are always checked to fit. The SlowFast sampler (Keye-VL 1.5) is not fitted: its
grids come from the pixels and ``slowfast.max_video_tokens`` already bounds a video.

``drop_report`` plans every video sample of a prepared dataset under a recipe's budgets and counts
how many are unchanged, fitted (by resolution, by rate) or still dropped
(``prepare_data --recipe NAME``).
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from megatron_vlm.data.image import PATCH_SIZE, navit_resize
from megatron_vlm.data.media_errors import BadSampleError
from megatron_vlm.data.records import BAD_RECORD
from megatron_vlm.data.video import (
    TEMPORAL_PATCH_SIZE,
    Clip,
    VideoChunk,
    clip_frame_range,
    sample_frame_indices,
)

FIT_KINDS = ("unchanged", "resolution", "fps")
_NO_PIXELS = torch.empty(0, 3, PATCH_SIZE, PATCH_SIZE)


@dataclass(frozen=True)
class VideoHeader:
    """What planning knows of a video without decoding it."""

    total_frames: int
    fps: float
    """Rate frames are timed by (the nominal rate when timestamps were repaired)."""
    height: int
    width: int
    timestamps_repaired: bool = False
    clip: Clip | None = None

    def frame_indices(self, fps: float, max_frames: int | None):
        """Indices ``decode_video`` samples at ``fps``."""
        return sample_frame_indices(self.total_frames, self.fps, fps, max_frames, self.clip)

    def num_frames(self, fps: float, max_frames: int | None) -> int:
        return len(self.frame_indices(fps, max_frames))


def video_chunks(header: VideoHeader, frame_max_patches: int, fps: float,
                 max_frames: int | None) -> list[VideoChunk]:
    """Chunks (grids and timestamps, no pixels) ``process_video`` makes at these settings."""
    timestamps = header.frame_indices(fps, max_frames) / header.fps
    _, padded = navit_resize(header.height, header.width, max_patches=frame_max_patches)
    h, w = padded[0] // PATCH_SIZE, padded[1] // PATCH_SIZE
    chunks = []
    for start in range(0, len(timestamps), TEMPORAL_PATCH_SIZE):
        stamps = tuple(float(t) for t in timestamps[start : start + TEMPORAL_PATCH_SIZE])
        chunks.append(VideoChunk(_NO_PIXELS, (len(stamps), h, w), stamps[0], stamps))
    return chunks


def media_clip(meta: dict) -> Clip | None:
    """The ``clip`` of a canonical media entry (``[start_s, end_s]`` float seconds), checked.

    Raises:
        BadSampleError: Not two numbers with ``0 <= start_s < end_s`` (``bad_record``).
    """
    clip = meta.get("clip")
    if clip is None:
        return None
    try:
        start, end = (float(x) for x in clip)
    except (TypeError, ValueError) as exc:
        raise BadSampleError(f"media clip {clip!r:.60} is not [start_s, end_s]",
                             reason=BAD_RECORD) from exc
    if not 0.0 <= start < end:
        raise BadSampleError(f"media clip {clip!r:.60} needs 0 <= start_s < end_s",
                             reason=BAD_RECORD)
    return (start, end)


@dataclass(frozen=True)
class VideoFit:
    """The per-frame patch budget and sampling rate a document's videos are planned with."""

    frame_max_patches: int
    fps: float
    kind: str
    """``unchanged``, ``resolution`` (lower per-frame budget) or ``fps`` (lower rate too)."""


def _rate_for(header: VideoHeader, n: int) -> float:
    """Smallest float rate at which ``header``'s span samples ``n`` frames (HF's
    ``int(frames / video_fps * fps)`` with float rounding accounted for)."""
    first, end = clip_frame_range(header.total_frames, header.fps, header.clip)
    span = end - first
    rate = n * header.fps / span
    while int(span / header.fps * rate) < n:
        rate = math.nextafter(rate, math.inf)
    while rate > 0 and int(span / header.fps * math.nextafter(rate, 0.0)) >= n:
        rate = math.nextafter(rate, 0.0)
    return rate


def fps_candidates(headers: Sequence[VideoHeader], fps: float, min_fps: float,
                   max_frames: int | None) -> list[float]:
    """Rates below ``fps`` at which some video's frame count changes, and ``min_fps``; highest
    first."""
    rates = {float(min_fps)}
    for h in headers:
        low, high = h.num_frames(min_fps, max_frames), h.num_frames(fps, max_frames)
        for n in range(low + 1, high + 1):
            rate = _rate_for(h, n)
            if min_fps < rate < fps:
                rates.add(rate)
    return sorted(rates, reverse=True)


def fit_videos(
    fits: Callable[[int, float], bool],
    headers: Sequence[VideoHeader],
    *,
    frame_max_patches: int,
    fps: float,
    min_patches_per_frame: int,
    min_fps: float,
    max_frames: int | None,
) -> VideoFit | None:
    """The settings a document is planned with (module docstring), or None: too long.

    Args:
        fits: ``fits(frame_max_patches, fps)``: whether the document fits both budgets.
        headers: The document's (uniform-sampled) videos.
        frame_max_patches: Per-frame budget before fitting (``video_chunk_max_patches``).
        fps: Sampling rate before fitting (``video_fps``).
        min_patches_per_frame: Lowest per-frame budget (``video_min_patches_per_frame``).
        min_fps: Lowest rate (``video_min_fps``).
        max_frames: Frame cap per video (``video_max_frames``).
    """
    if fits(frame_max_patches, fps):
        return VideoFit(frame_max_patches=frame_max_patches, fps=fps, kind="unchanged")
    if not headers:
        return None
    low = min(min_patches_per_frame, frame_max_patches)
    if low < frame_max_patches and fits(low, fps):
        a, b = low, frame_max_patches - 1  # fits(a); the largest fitting budget is in [a, b]
        while a < b:
            mid = (a + b + 1) // 2
            if fits(mid, fps):
                a = mid
            else:
                b = mid - 1
        return VideoFit(frame_max_patches=a, fps=fps, kind="resolution")
    rates = fps_candidates(headers, fps, min_fps, max_frames) if min_fps < fps else []
    if not rates or not fits(low, rates[-1]):
        return None
    a, b = 0, len(rates) - 1  # fits at rates[b]; find the first (highest) fitting rate
    while a < b:
        mid = (a + b) // 2
        if fits(low, rates[mid]):
            b = mid
        else:
            a = mid + 1
    return VideoFit(frame_max_patches=low, fps=rates[a], kind="fps")


# ------------------------------------------------------------------------------- drop report


class _ByteTokenizer:
    """Stand-in text tokenizer (one token per UTF-8 byte): counts text at least as long as any
    BPE does, so a report made with it never under-counts drops for the token budget."""

    vocab_size, eos_id, pad_id = 258, 256, 257

    def encode(self, text: str) -> list[int]:
        return list(text.encode())


def _report_tokenizer(tokenizer: Any, data_cfg: Any) -> Any:
    from megatron_vlm.data.kimi_tokenizer import SpecialTokensTokenizer

    if tokenizer is None and data_cfg.tokenizer is not None:
        tokenizer = data_cfg.tokenizer
    if tokenizer is None:
        return SpecialTokensTokenizer(_ByteTokenizer())
    if isinstance(tokenizer, (str, os.PathLike)):
        from megatron_vlm.data.tokenizer_loader import load_tokenizer

        tokenizer = load_tokenizer(tokenizer, data_cfg.tokenizer_type)
    if not hasattr(tokenizer, "media_token_ids"):
        tokenizer = SpecialTokensTokenizer(tokenizer)
    return tokenizer


def _video_samples(root: Path, manifest: dict) -> Iterator[tuple[dict, dict[str, bytes]]]:
    """(record, members) of every sample with a video, splits and shards in manifest order."""
    from megatron_vlm.data.shards import iter_shard

    for split in manifest["splits"].values():
        for shard in split["shards"]:
            for _key, members in iter_shard(root / shard["path"]):
                try:
                    record = json.loads(members["json"])
                except (KeyError, ValueError):
                    continue
                media = record.get("media", []) if isinstance(record, dict) else []
                if any(isinstance(m, dict) and m.get("type") == "video" for m in media):
                    yield record, members


def drop_report(dataset_dir: str | os.PathLike, recipe: str, max_samples: int | None = None,
                tokenizer: Any = None) -> dict[str, Any]:
    """How a recipe's budgets treat the video samples of a prepared dataset.

    Plans (header probe, no decoding) every sample with a video, over every split's shards in
    manifest order, with the recipe's ``data.seq_length``, ``data.pad_to_multiple`` and
    ``data.multimodal`` settings.

    Args:
        dataset_dir: A dataset written by tools/prepare_data.py (``mm_dataset.json``).
        recipe: Recipe name (``megatron_vlm.recipes.RECIPES``).
        max_samples: Stop after this many video samples (None: all).
        tokenizer: A tokenizer, or a path for ``load_tokenizer``; None = the recipe's
            ``data.tokenizer`` when set, else one token per UTF-8 byte (over-counts text, so the
            token budget's drops are an upper bound).

    Returns:
        ``videos`` (samples with a video), ``unchanged``, ``fitted_resolution``,
        ``fitted_fps``, ``dropped``, ``dropped_fraction`` (of ``videos``), ``by_reason``
        (skip reason -> dropped samples) and ``repaired_timestamps``.
    """
    from megatron_vlm.data.mm_encode import EncodeSettings, plan_document
    from megatron_vlm.data.shards import load_manifest
    from megatron_vlm.recipes import get_recipe

    data_cfg = get_recipe(recipe).data
    if data_cfg.multimodal is None:
        raise ValueError(f"recipe {recipe!r} has no data.multimodal settings (text-only)")
    settings = EncodeSettings.from_config(data_cfg.multimodal, data_cfg.seq_length,
                                          data_cfg.pad_to_multiple)
    tok = _report_tokenizer(tokenizer, data_cfg)
    media_ids = tok.media_token_ids()
    root = Path(dataset_dir)
    manifest = load_manifest(root)
    counts: Counter[str] = Counter()
    reasons: Counter[str] = Counter()
    for record, members in _video_samples(root, manifest):
        if max_samples is not None and counts["videos"] >= max_samples:
            break
        counts["videos"] += 1
        try:
            _, planned = plan_document(record, members, settings, tok, media_ids)
        except BadSampleError as exc:
            counts["dropped"] += 1
            reasons[exc.reason] += 1
            continue
        videos = [m for m in planned if m.type == "video"]
        kind = videos[0].fit if videos else "unchanged"
        counts[kind if kind == "unchanged" else "fitted_" + kind] += 1
        counts["repaired_timestamps"] += sum(m.timestamps_repaired for m in videos)
    videos = counts["videos"]
    return {
        "recipe": recipe,
        "videos": videos,
        "unchanged": counts["unchanged"],
        "fitted_resolution": counts["fitted_resolution"],
        "fitted_fps": counts["fitted_fps"],
        "dropped": counts["dropped"],
        "dropped_fraction": counts["dropped"] / videos if videos else 0.0,
        "by_reason": dict(sorted(reasons.items())),
        "repaired_timestamps": counts["repaired_timestamps"],
    }
