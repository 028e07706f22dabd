"""Keye-VL 1.5 SlowFast video encoding, as an option of the video pipeline (SPEC §3).

The rule (Keye-VL 1.5 technical report, arXiv 2509.01563, §2): the first sampled frame is *slow*;
every later frame is compared with the **latest slow frame** (not with the previous frame -- SPEC
§3 says "the previous one"; the report compares with the most recent slow frame, so a slow drift
still triggers a new slow frame once it has accumulated). A frame whose patch similarity exceeds
95% is *fast*, otherwise it becomes the new slow frame. A fast frame gets 30% of a slow frame's
token budget; the slow budget is the largest one (binary search) that fits the video's total token
budget. Special tokens mark the fast frames: each maximal run of fast frames is wrapped in
``<|fast_start|> ... <|fast_end|>`` (token strings are ours; Keye's processor code is not
available here). ``reference="previous"`` gives the SPEC's wording for comparison.

Patch similarity (ours; the report does not define it further): both frames are cut into 14x14
patches; a patch is unchanged when its mean absolute difference (0..255, over pixels and channels)
is at most ``patch_tolerance`` (8 by default, above H.264 noise on static content); the similarity
is the fraction of unchanged patches.

In our MoonViT-3D pipeline every SlowFast frame is its own item with t = 1 (like an image, so the
zero temporal row), sized by ``navit_resize`` under its budget, written like a video chunk with its
own timestamp.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from megatron_vlm.data.image import MERGE_SIZE, PATCH_SIZE, grid_for_size
from megatron_vlm.data.media_errors import BadSampleError, SkipReason
from megatron_vlm.data.templates import Segment, SpecialToken
from megatron_vlm.data.video import VIDEO_CHUNK_MAX_PATCHES, VideoChunk, chunk_frames

SIMILARITY_THRESHOLD = 0.95
"""A frame more similar than this to its reference frame is fast."""
FAST_TOKEN_RATIO = 0.3
"""A fast frame's patch budget as a fraction of a slow frame's."""
PATCH_TOLERANCE = 8.0
"""Mean absolute difference (0..255) under which a patch counts as unchanged."""


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
    if reference not in ("last_slow", "previous"):
        raise ValueError(f"reference must be 'last_slow' or 'previous', got {reference!r}")
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


def _tokens(height: int, width: int, max_patches: int) -> int:
    h, w = grid_for_size(height, width, max(1, max_patches))
    return h * w // (MERGE_SIZE * MERGE_SIZE)


def allocate_budget(
    frame_hw: tuple[int, int],
    is_slow: np.ndarray,
    total_tokens: int,
    fast_ratio: float = FAST_TOKEN_RATIO,
    max_slow_patches: int = VIDEO_CHUNK_MAX_PATCHES,
) -> tuple[int, int]:
    """Largest slow-frame patch budget whose frames fit ``total_tokens`` (binary search).

    Token cost is monotone in the budget (``navit_resize`` never shrinks a grid as the budget
    grows), so the largest fitting budget is found in log steps.

    Returns:
        ``(slow_max_patches, fast_max_patches)`` with ``fast = max(1, int(fast_ratio * slow))``.

    Raises:
        BadSampleError: Even the smallest grids (1 token per frame) exceed ``total_tokens``
            (reason ``too_long``).
    """
    height, width = frame_hw
    num_slow = int(is_slow.sum())
    num_fast = int(is_slow.shape[0]) - num_slow

    def cost(p: int) -> int:
        fast_p = max(1, int(fast_ratio * p))
        return num_slow * _tokens(height, width, p) + num_fast * _tokens(height, width, fast_p)

    lo, hi = 1, max(1, max_slow_patches)
    if cost(lo) > total_tokens:
        raise BadSampleError(
            f"{is_slow.shape[0]} frames need >= {cost(lo)} tokens, budget {total_tokens}",
            reason=SkipReason.TOO_LONG,
        )
    while lo < hi:  # invariant: cost(lo) fits
        mid = (lo + hi + 1) // 2
        if cost(mid) <= total_tokens:
            lo = mid
        else:
            hi = mid - 1
    return lo, max(1, int(fast_ratio * lo))


@dataclass
class SlowFastPlan:
    """Slow/fast labels and per-frame budgets of one video."""

    is_slow: np.ndarray
    """[T] bool."""
    similarity: np.ndarray
    """[T] similarity to the reference frame (NaN for frame 0)."""
    reference_index: np.ndarray
    """[T] index of the frame compared with (-1 for frame 0)."""
    slow_max_patches: int
    fast_max_patches: int
    grids: list[tuple[int, int]]
    """Per-frame (h, w) in patches."""

    @property
    def labels(self) -> list[str]:
        return ["slow" if s else "fast" for s in self.is_slow]

    @property
    def max_patches(self) -> list[int]:
        """Per-frame patch budget."""
        return [self.slow_max_patches if s else self.fast_max_patches for s in self.is_slow]

    @property
    def num_tokens(self) -> list[int]:
        """Per-frame LLM tokens h*w/4."""
        return [h * w // (MERGE_SIZE * MERGE_SIZE) for h, w in self.grids]


def plan_slowfast(
    frames: np.ndarray,
    total_tokens: int,
    threshold: float = SIMILARITY_THRESHOLD,
    fast_ratio: float = FAST_TOKEN_RATIO,
    reference: str = "last_slow",
    max_slow_patches: int = VIDEO_CHUNK_MAX_PATCHES,
    patch_tolerance: float = PATCH_TOLERANCE,
) -> SlowFastPlan:
    """Labels and budgets for sampled frames ``[T, H, W, 3]`` under ``total_tokens``."""
    is_slow, similarity, ref = classify_frames(frames, threshold, reference, patch_tolerance)
    height, width = frames.shape[1:3]
    slow_p, fast_p = allocate_budget(
        (height, width), is_slow, total_tokens, fast_ratio, max_slow_patches
    )
    grids = [grid_for_size(height, width, slow_p if s else fast_p) for s in is_slow]
    return SlowFastPlan(is_slow, similarity, ref, slow_p, fast_p, grids)


def process_slowfast(
    frames: np.ndarray, timestamps: Sequence[float], plan: SlowFastPlan
) -> list[VideoChunk]:
    """One t = 1 item per frame, sized by its slow/fast budget, with its timestamp."""
    out: list[VideoChunk] = []
    for i, budget in enumerate(plan.max_patches):
        (chunk,) = chunk_frames(frames[i : i + 1], [timestamps[i]], max_patches=budget)
        out.append(chunk)
    return out


def slowfast_segments(items: Sequence[VideoChunk], is_slow: Sequence[bool]) -> list[Segment]:
    """Template segments: frames in order, each run of fast frames inside fast_start/fast_end."""
    segments: list[Segment] = []
    in_fast = False
    for item, slow in zip(items, is_slow, strict=True):
        if not slow and not in_fast:
            segments.append(SpecialToken("fast_start"))
            in_fast = True
        elif slow and in_fast:
            segments.append(SpecialToken("fast_end"))
            in_fast = False
        segments.append(item)
    if in_fast:
        segments.append(SpecialToken("fast_end"))
    return segments
