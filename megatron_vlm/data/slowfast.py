"""Keye-VL 1.5 SlowFast video encoding for MoonViT-3D (SPEC §3): the loader's ``slowfast`` sampler.

The rule, as the Keye-VL 1.5 report (arXiv 2509.01563, §2) states it and its released
preprocessing (``keye-vl-utils`` 1.5.2, ``extract_slow_fast_frames`` / ``fetch_video``) does it:

- **Labels.** The first sampled frame is *slow*. Every later frame is compared with the **latest
  slow frame** (keye-vl-utils keeps a ``last_key_frame`` that only a new slow frame replaces; SPEC
  §3's "the previous one" is available as ``reference="previous"``). A frame whose patch similarity
  *exceeds* the threshold (0.95 as in the report and SPEC; keye-vl-utils 1.5.2 ships 0.9 and
  tests ``>=``) is *fast*; otherwise it becomes the new slow frame.
- **Budgets.** Slow frames get the largest patch budget (at most ``max_slow_patches``, the Kimi
  per-frame video budget) for which the whole video fits ``total_tokens`` LLM tokens (binary
  search, as keye-vl-utils searches tokens per frame). A fast frame gets the largest
  ``navit_resize`` grid with at most ``fast_ratio`` (0.3) of the slow grid's patches, i.e. at
  most 30% of a slow frame's tokens (keye-vl-utils: ``fast_max_pixels = int(0.3 * slow tokens)``,
  and its ``smart_resize`` floors, so a fast frame never exceeds it); at least the smallest grid
  ``navit_resize`` produces (1 token). Grids pad to multiples of 28 px, so on tiny frames the fast
  share is coarser than 30% (a 112x84 frame: 12 slow tokens, 2 fast).
- **Patch similarity** is ours: both frames are cut into 14x14 patches; a patch is unchanged when
  its mean absolute difference (0..255, over pixels and channels) is at most ``patch_tolerance``
  (8, above H.264 noise on static content); the similarity is the fraction of unchanged patches.
  (keye-vl-utils: HSV, 28-px patches of frames first resized to <= 256 tokens, a patch is similar
  when its cosine similarity exceeds 0.7.)

**Chunks (MoonViT-3D).** A chunk is up to ``temporal_patch_size`` = 4 consecutive frames of ONE
grid; slow and fast frames have different grids, so a chunk never mixes them: every maximal run of
frames of one kind is cut into chunks of up to 4 (the last one short, never padded) -- fast frames
form their own chunks. With every frame slow and a total that does not bind, the chunks, grids
and pixels equal the uniform Kimi K2.5 path (``video.process_video``) exactly.

**Template.** Each chunk is written as a Kimi video chunk (``HH:MM:SS.mmm<|media_begin|>video
<|media_content|>{h*w/4 placeholders}<|media_end|>``, first-frame timestamp); each maximal run of
fast chunks is wrapped in ``<|fast_start|> ... <|fast_end|>`` (Keye's own processor marks fast
frames with ``<|fast_start|>``/``<|fast_end|>`` and a separate fast placeholder; ours keeps Kimi's
video placeholder, since the packed batch maps features to placeholders by position). The markers
are never loss targets: whether the coming frames are static is decided from pixels the model has
not seen yet.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import numpy as np

from megatron_vlm.data.image import MERGE_SIZE, PATCH_SIZE, grid_for_size
from megatron_vlm.data.media_errors import BadSampleError, SkipReason
from megatron_vlm.data.templates import Segment, SpecialToken
from megatron_vlm.data.video import (
    TEMPORAL_PATCH_SIZE,
    VIDEO_CHUNK_MAX_PATCHES,
    VideoChunk,
    chunk_frames,
)

SIMILARITY_THRESHOLD = 0.95
"""A frame more similar than this to its reference frame is fast."""
FAST_TOKEN_RATIO = 0.3
"""A fast frame's share of a slow frame's patches (and tokens), at most."""
PATCH_TOLERANCE = 8.0
"""Mean absolute difference (0..255) under which a patch counts as unchanged."""
REFERENCES = ("last_slow", "previous")


def patch_similarity(
    a: np.ndarray, b: np.ndarray, patch_size: int = PATCH_SIZE, tolerance: float = PATCH_TOLERANCE
) -> float:
    """Fraction of ``patch_size`` patches of two equal-size frames that are unchanged.

    Args:
        a: [H, W, C] uint8 frame.
        b: [H, W, C] uint8 frame of the same shape.
        patch_size: Patch side in pixels; edge pixels beyond whole patches are ignored (a frame
            smaller than one patch is one patch).
        tolerance: Mean absolute difference at or below which a patch is unchanged.
    """
    if a.shape != b.shape:
        raise ValueError(f"frames differ in shape: {a.shape} vs {b.shape}")
    height, width = a.shape[:2]
    ph, pw = min(patch_size, height), min(patch_size, width)
    h, w = height // ph, width // pw
    diff = np.abs(a[: h * ph, : w * pw].astype(np.int16) - b[: h * ph, : w * pw].astype(np.int16))
    per_patch = diff.reshape(h, ph, w, pw, -1).mean(axis=(1, 3, 4))
    return float((per_patch <= tolerance).mean())


def classify_frames(
    frames: np.ndarray,
    threshold: float = SIMILARITY_THRESHOLD,
    reference: str = "last_slow",
    patch_tolerance: float = PATCH_TOLERANCE,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Label each frame slow or fast.

    Args:
        frames: [T, H, W, 3] uint8 sampled frames.
        threshold: Similarity above which a frame is fast.
        reference: ``"last_slow"`` (Keye-VL 1.5) or ``"previous"``.
        patch_tolerance: See ``patch_similarity``.

    Returns:
        ``is_slow`` [T] bool, ``similarity`` [T] float (NaN for frame 0) and ``reference_index``
        [T] int (the frame each was compared with; -1 for frame 0).
    """
    if reference not in REFERENCES:
        raise ValueError(f"reference must be one of {REFERENCES}, got {reference!r}")
    num = frames.shape[0]
    is_slow = np.zeros(num, dtype=bool)
    similarity = np.full(num, np.nan)
    ref_index = np.full(num, -1, dtype=np.int64)
    if num == 0:
        return is_slow, similarity, ref_index
    is_slow[0] = True
    last_slow = 0
    for i in range(1, num):
        ref = last_slow if reference == "last_slow" else i - 1
        ref_index[i] = ref
        similarity[i] = patch_similarity(frames[ref], frames[i], tolerance=patch_tolerance)
        if similarity[i] <= threshold:
            is_slow[i] = True
            last_slow = i
    return is_slow, similarity, ref_index


def frame_chunks(
    is_slow: Sequence[bool], temporal_patch_size: int = TEMPORAL_PATCH_SIZE
) -> list[tuple[int, int]]:
    """``(start, stop)`` frame ranges of the chunks: each maximal run of frames of one kind cut
    into pieces of up to ``temporal_patch_size`` frames (the last piece of a run short)."""
    if temporal_patch_size < 1:
        raise ValueError(f"temporal_patch_size must be >= 1, got {temporal_patch_size}")
    labels = [bool(s) for s in is_slow]
    chunks: list[tuple[int, int]] = []
    start = 0
    while start < len(labels):
        stop = start + 1
        while (stop < len(labels) and labels[stop] == labels[start]
               and stop - start < temporal_patch_size):
            stop += 1
        chunks.append((start, stop))
        start = stop
    return chunks


def _grid_patches(height: int, width: int, max_patches: int) -> int:
    h, w = grid_for_size(height, width, max(1, max_patches))
    return h * w


def fast_budget(
    frame_hw: tuple[int, int], slow_grid: tuple[int, int], fast_ratio: float = FAST_TOKEN_RATIO
) -> int:
    """Patch budget of a fast frame: the largest ``p`` whose ``navit_resize`` grid has at most
    ``int(fast_ratio * h_slow * w_slow)`` patches (1 if even the smallest grid has more).

    Grid size is monotone in the budget, so the fitting budgets are a prefix: binary search.
    """
    height, width = frame_hw
    target = int(fast_ratio * slow_grid[0] * slow_grid[1])
    lo, hi = 1, max(1, slow_grid[0] * slow_grid[1])
    if _grid_patches(height, width, lo) > target:
        return 1
    while lo < hi:  # invariant: lo fits
        mid = (lo + hi + 1) // 2
        if _grid_patches(height, width, mid) <= target:
            lo = mid
        else:
            hi = mid - 1
    return lo


def allocate_budget(
    frame_hw: tuple[int, int],
    is_slow: np.ndarray,
    total_tokens: int | None,
    fast_ratio: float = FAST_TOKEN_RATIO,
    max_slow_patches: int = VIDEO_CHUNK_MAX_PATCHES,
    temporal_patch_size: int = TEMPORAL_PATCH_SIZE,
) -> tuple[int, int]:
    """Largest slow-frame patch budget whose chunks fit ``total_tokens`` (binary search).

    A chunk costs ``h*w/4`` tokens whatever its ``t`` (MoonViT-3D pools over time), so the cost
    counts chunks (``frame_chunks``), not frames. Token cost is monotone in the slow budget (grids
    never shrink as the budget grows, and the fast budget follows the slow grid).

    Args:
        frame_hw: Source frame size in pixels.
        is_slow: [T] labels.
        total_tokens: LLM token budget of the whole video (None: no limit).
        fast_ratio: See ``fast_budget``.
        max_slow_patches: Cap of the slow budget (Kimi's per-frame video budget).
        temporal_patch_size: Frames per chunk (1: every frame its own item).

    Returns:
        ``(slow_max_patches, fast_max_patches)``.

    Raises:
        BadSampleError: Even the smallest grids exceed ``total_tokens`` (reason ``too_long``).
    """
    height, width = frame_hw
    chunks = frame_chunks(is_slow, temporal_patch_size)
    num_slow = sum(1 for a, _ in chunks if is_slow[a])
    num_fast = len(chunks) - num_slow
    merge = MERGE_SIZE * MERGE_SIZE

    def budgets(p: int) -> tuple[int, int]:
        return p, fast_budget(frame_hw, grid_for_size(height, width, p), fast_ratio)

    def cost(p: int) -> int:
        slow_p, fast_p = budgets(p)
        return (num_slow * _grid_patches(height, width, slow_p)
                + num_fast * _grid_patches(height, width, fast_p)) // merge

    lo, hi = 1, max(1, max_slow_patches)
    if total_tokens is None:
        return budgets(hi)
    if cost(lo) > total_tokens:
        raise BadSampleError(
            f"{len(chunks)} video chunks need >= {cost(lo)} tokens, budget {total_tokens}",
            reason=SkipReason.TOO_LONG,
        )
    while lo < hi:  # invariant: cost(lo) fits
        mid = (lo + hi + 1) // 2
        if cost(mid) <= total_tokens:
            lo = mid
        else:
            hi = mid - 1
    return budgets(lo)


@dataclass
class SlowFastPlan:
    """Slow/fast labels, budgets and chunks of one video."""

    is_slow: np.ndarray
    """[T] bool."""
    similarity: np.ndarray
    """[T] similarity to the reference frame (NaN for frame 0)."""
    reference_index: np.ndarray
    """[T] index of the frame compared with (-1 for frame 0)."""
    slow_max_patches: int
    fast_max_patches: int
    slow_grid: tuple[int, int]
    """(h, w) in patches of every slow frame."""
    fast_grid: tuple[int, int]
    """(h, w) in patches of every fast frame."""
    chunks: list[tuple[int, int]]
    """``(start, stop)`` frame range of each chunk (one kind per chunk)."""

    @property
    def labels(self) -> list[str]:
        return ["slow" if s else "fast" for s in self.is_slow]

    @property
    def chunk_is_fast(self) -> list[bool]:
        return [not bool(self.is_slow[a]) for a, _ in self.chunks]

    @property
    def grids(self) -> list[tuple[int, int, int]]:
        """(t, h, w) of each chunk."""
        return [(b - a, *(self.fast_grid if fast else self.slow_grid))
                for (a, b), fast in zip(self.chunks, self.chunk_is_fast)]

    @property
    def num_tokens(self) -> list[int]:
        """LLM tokens h*w/4 of each chunk."""
        return [h * w // (MERGE_SIZE * MERGE_SIZE) for _, h, w in self.grids]


def plan_slowfast(
    frames: np.ndarray,
    total_tokens: int | None,
    threshold: float = SIMILARITY_THRESHOLD,
    fast_ratio: float = FAST_TOKEN_RATIO,
    reference: str = "last_slow",
    max_slow_patches: int = VIDEO_CHUNK_MAX_PATCHES,
    patch_tolerance: float = PATCH_TOLERANCE,
    temporal_patch_size: int = TEMPORAL_PATCH_SIZE,
) -> SlowFastPlan:
    """Labels, budgets and chunks for sampled frames ``[T, H, W, 3]`` under ``total_tokens``."""
    if frames.ndim != 4 or frames.shape[0] < 1:
        raise ValueError(f"expected [T>=1, H, W, 3] frames, got {frames.shape}")
    is_slow, similarity, ref = classify_frames(frames, threshold, reference, patch_tolerance)
    height, width = frames.shape[1:3]
    slow_p, fast_p = allocate_budget((height, width), is_slow, total_tokens, fast_ratio,
                                     max_slow_patches, temporal_patch_size)
    return SlowFastPlan(
        is_slow, similarity, ref, slow_p, fast_p,
        slow_grid=grid_for_size(height, width, slow_p),
        fast_grid=grid_for_size(height, width, fast_p),
        chunks=frame_chunks(is_slow, temporal_patch_size),
    )


def process_slowfast(
    frames: np.ndarray, timestamps: Sequence[float], plan: SlowFastPlan
) -> list[VideoChunk]:
    """The plan's chunks, each resized by its slow/fast budget and patchified, with timestamps.

    Fast chunks carry ``is_fast=True``; each chunk is ``video.chunk_frames`` of its frames."""
    if len(timestamps) != frames.shape[0]:
        raise ValueError(f"{len(timestamps)} timestamps for {frames.shape[0]} frames")
    out: list[VideoChunk] = []
    for (a, b), fast in zip(plan.chunks, plan.chunk_is_fast):
        budget = plan.fast_max_patches if fast else plan.slow_max_patches
        (chunk,) = chunk_frames(frames[a:b], list(timestamps[a:b]), max_patches=budget,
                                temporal_patch_size=b - a)
        out.append(replace(chunk, is_fast=fast))
    return out


def slowfast_segments(items: Sequence[VideoChunk]) -> list[Segment]:
    """Template segments: chunks in order, each run of fast chunks inside fast_start/fast_end
    (markers never loss targets)."""
    segments: list[Segment] = []
    in_fast = False
    for item in items:
        if item.is_fast and not in_fast:
            segments.append(SpecialToken("fast_start", loss=False))
            in_fast = True
        elif not item.is_fast and in_fast:
            segments.append(SpecialToken("fast_end", loss=False))
            in_fast = False
        segments.append(item)
    if in_fast:
        segments.append(SpecialToken("fast_end", loss=False))
    return segments
