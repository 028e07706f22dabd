"""Keye-VL 1.5 SlowFast video encoding, as ``keye-vl-utils`` 1.5.2 implements it.

Read from the package's ``extract_slow_fast_frames``, ``get_frame_sim`` and ``fetch_video``
(the code wins over the report, which says 95% similarity and a 75K budget):

1. **Similarity frames.** The sampled frames are resized (``interpolate`` bilinear, antialias, on
   uint8) to ``smart_resize(h, w, min 48 tokens, max 256 tokens)``.
2. **HSV.** Each frame to OpenCV's 8-bit HSV (H in 0..179, S and V in 0..255; ``rgb_to_hsv``,
   cv2's table-based integer conversion, equal to ``cv2.cvtColor(.., COLOR_RGB2HSV)`` bit for bit).
3. **Patch similarity.** 28x28-px patches, each a float32 vector of (channel, row, col) values;
   cosine ``(p1 / (|p1| + 1e-8)) . (p2 / (|p2| + 1e-8))``; a patch is similar when the cosine
   is above 0.7. Patches whose norms are below 0.01 in BOTH frames (black in both) are left out;
   the frame similarity is the mean over the rest (NaN when none is left: the frame is fast).
4. **Typing.** Frame 0 is slow; frame ``i`` is slow iff its similarity to the LAST SLOW frame is
   below 0.9 (``min_frame_similarity``); otherwise fast (type 1).
5. **Budget.** Binary search over slow tokens per frame ``t`` in ``[48, 768]`` on
   ``num_slow * t + num_fast * max(int(0.3 * t), 48)`` against 65,536 tokens. The search ends at
   the first ``t`` whose estimate is OVER the budget (``left = mid + 1`` when it fits), so where the
   budget binds the estimate at the returned ``t`` exceeds it (the off-by-one kept here); it
   returns 768 when even 767 fits.
6. **Sizes.** Slow frames: ``smart_resize(h, w, min_pixels=48*784, max_pixels=t*784)``. Fast
   frames: ``smart_resize`` with ``max_pixels = max(int(0.3 * slow_tokens) * 784, 48 * 784)``,
   where ``slow_tokens`` is the slow frame's ACTUAL token count after sizing (not ``t``).

The Kimi option (``megatron_vlm/data/slowfast.py``) follows the report's wording with Kimi's
chunks and markers; this module is Keye's own rule.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from megatron_vlm.families.keye.processing import (
    FACTOR,
    PIXELS_PER_TOKEN,
    VIDEO_MAX_TOKENS,
    VIDEO_MIN_TOKENS,
    VIDEO_TOTAL_TOKENS,
    smart_resize,
)

SIMILARITY_MAX_TOKENS = 256
"""Token ceiling of the frames the similarity is computed on."""
SIMILARITY_PATCH = 28
"""Side in px of the patches compared."""
PATCH_COSINE_THRESHOLD = 0.7
"""A patch is similar when its cosine similarity is above this."""
ZERO_NORM = 0.01
"""Patches with a norm below this in both frames are left out of the mean."""
MIN_FRAME_SIMILARITY = 0.9
"""A frame less similar than this to the last slow frame is slow."""
FAST_TOKEN_RATIO = 0.3
"""A fast frame's share of a slow frame's tokens."""

_HSV_SHIFT = 12
_I = np.arange(1, 256, dtype=np.float64)
# OpenCV's RGB2HSV_b tables: saturate_cast<int> rounds half to even (cvRound), entry 0 is 0.
_SDIV = np.concatenate([[0], np.rint((255 << _HSV_SHIFT) / _I)]).astype(np.int32)
_HDIV = np.concatenate([[0], np.rint((180 << _HSV_SHIFT) / (6.0 * _I))]).astype(np.int32)


def rgb_to_hsv(rgb: np.ndarray) -> np.ndarray:
    """``cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)`` for uint8, bit for bit (OpenCV's fixed-point
    8-bit path: 12-bit tables for 255/v and 30/diff, rounding shifts).

    Args:
        rgb: [..., 3] uint8.

    Returns:
        [..., 3] uint8 (H in 0..179, S, V in 0..255).
    """
    if rgb.dtype != np.uint8 or rgb.shape[-1] != 3:
        raise ValueError(f"expected [..., 3] uint8 RGB, got {rgb.dtype} {rgb.shape}")
    r, g, b = (rgb[..., i].astype(np.int32) for i in range(3))
    v = np.maximum(np.maximum(r, g), b)
    diff = v - np.minimum(np.minimum(r, g), b)
    half = 1 << (_HSV_SHIFT - 1)
    s = (diff * _SDIV[v] + half) >> _HSV_SHIFT
    h = np.where(v == r, g - b, np.where(v == g, b - r + 2 * diff, r - g + 4 * diff))
    h = (h * _HDIV[diff] + half) >> _HSV_SHIFT
    h = np.where(h < 0, h + 180, h)
    return np.stack([h, s, v], axis=-1).astype(np.uint8)


def similarity_frames(frames: np.ndarray) -> torch.Tensor:
    """Step 1: [T, H, W, 3] uint8 -> [T, 3, h, w] uint8 at <= 256 tokens (bilinear, antialias)."""
    height, width = frames.shape[1:3]
    size = smart_resize(height, width, min_pixels=VIDEO_MIN_TOKENS * PIXELS_PER_TOKEN,
                        max_pixels=SIMILARITY_MAX_TOKENS * PIXELS_PER_TOKEN)
    x = torch.from_numpy(np.ascontiguousarray(frames)).permute(0, 3, 1, 2)
    return torch.nn.functional.interpolate(x, list(size), mode="bilinear", antialias=True)


def _hsv_patches(frame_chw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """One [3, h, w] uint8 frame -> unit patch vectors [h/28, w/28, 3*28*28] and norms [.., 1]
    (``rearrange(c (h p1) (w p2) -> h w (c p1 p2))``, float32, as the package computes them)."""
    hsv = rgb_to_hsv(frame_chw.permute(1, 2, 0).numpy())
    x = torch.from_numpy(hsv).permute(2, 0, 1).float()
    c, height, width = x.shape
    p = SIMILARITY_PATCH
    patches = (x.reshape(c, height // p, p, width // p, p).permute(1, 3, 0, 2, 4)
               .reshape(height // p, width // p, c * p * p))
    norms = torch.norm(patches, p=2, dim=-1, keepdim=True) + 1e-8
    return patches / norms, norms


def frame_similarity(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor],
                     ) -> float:
    """Step 3 on two ``_hsv_patches`` results: the share of similar patches (NaN if none)."""
    (unit_a, norm_a), (unit_b, norm_b) = a, b
    cos = (unit_a * unit_b).sum(dim=-1)
    counted = ~((norm_a[..., 0] < ZERO_NORM) & (norm_b[..., 0] < ZERO_NORM))
    return (cos[counted] > PATCH_COSINE_THRESHOLD).float().mean().item()


def slow_fast_types(frames: np.ndarray, threshold: float = MIN_FRAME_SIMILARITY) -> np.ndarray:
    """Steps 1-4: [T] int32 frame types (0 slow, 1 fast) of [T, H, W, 3] uint8 frames."""
    small = similarity_frames(frames)
    types = np.ones(len(small), dtype=np.int32)
    types[0] = 0
    last_slow = _hsv_patches(small[0])
    for i in range(1, len(small)):
        current = _hsv_patches(small[i])
        if frame_similarity(last_slow, current) < threshold:
            types[i] = 0
            last_slow = current
    return types


def slow_token_budget(
    num_slow: int,
    num_fast: int,
    *,
    min_tokens: int = VIDEO_MIN_TOKENS,
    max_tokens: int = VIDEO_MAX_TOKENS,
    total_tokens: int = VIDEO_TOTAL_TOKENS,
    frame_floor: int = VIDEO_MIN_TOKENS,
) -> int:
    """Step 5: the package's binary search for slow tokens per frame, quirk included.

    Returns the smallest ``t`` in ``[min_tokens, max_tokens)`` whose estimate
    ``num_slow * t + num_fast * max(int(0.3 * t), min_tokens)`` is above ``total_tokens``, else
    ``max_tokens`` (``min_tokens`` is raised to ``frame_floor`` first: the package's constant
    48; only a tiny test run lowers it, ``KeyeMediaRules.video_frame_floor``).
    """
    min_tokens = max(min_tokens, frame_floor)

    def estimate(tokens: int) -> int:
        return num_slow * tokens + num_fast * max(int(FAST_TOKEN_RATIO * tokens), min_tokens)

    left, right = min_tokens, max_tokens
    while left < right:
        mid = (left + right) // 2
        if estimate(mid) > total_tokens:
            right = mid
        else:
            left = mid + 1
    return left


@dataclass(frozen=True)
class SlowFastSizes:
    """Step 6: the sizes of one video's slow and fast frames."""

    slow_tokens_searched: int
    """``slow_token_budget``'s result (a bound; the slow frame may get fewer tokens)."""
    slow_size: tuple[int, int]
    """(height, width) px of a slow frame."""
    fast_size: tuple[int, int]
    """(height, width) px of a fast frame."""


def slow_fast_sizes(
    height: int,
    width: int,
    *,
    num_slow: int,
    num_fast: int,
    min_tokens: int = VIDEO_MIN_TOKENS,
    max_tokens: int = VIDEO_MAX_TOKENS,
    total_tokens: int = VIDEO_TOTAL_TOKENS,
    frame_floor: int = VIDEO_MIN_TOKENS,
) -> SlowFastSizes:
    """Steps 5-6 for frames of ``height`` x ``width`` px (``frame_floor``: the package's 48
    tokens; see ``slow_token_budget``)."""
    min_tokens = max(min_tokens, frame_floor)
    searched = slow_token_budget(num_slow, num_fast, min_tokens=min_tokens,
                                 max_tokens=max_tokens, total_tokens=total_tokens,
                                 frame_floor=frame_floor)
    min_pixels = min_tokens * PIXELS_PER_TOKEN
    slow = smart_resize(height, width, min_pixels=min_pixels,
                        max_pixels=searched * PIXELS_PER_TOKEN)
    slow_tokens = slow[0] * slow[1] / FACTOR / FACTOR
    # The floor is the package's constant 48 tokens, not the (possibly raised) min_tokens.
    fast_max_pixels = max(int(slow_tokens * FAST_TOKEN_RATIO) * PIXELS_PER_TOKEN,
                          frame_floor * PIXELS_PER_TOKEN)
    fast = smart_resize(height, width, min_pixels=min_pixels, max_pixels=fast_max_pixels)
    return SlowFastSizes(slow_tokens_searched=searched, slow_size=slow, fast_size=fast)
