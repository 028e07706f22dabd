"""Synthetic document-length mixes for packing tests and benchmarks."""

from __future__ import annotations

import numpy as np


def llava_like_mix(num: int, seq_length: int, rng: np.random.Generator) -> list[tuple[int, int]]:
    """``num`` documents as (real LLM tokens, ViT patches): 45% captions (native-resolution
    image, 64-1024 tokens, + ~35 text), 30% conversations (image + ~200 text), 10% videos (2-16
    chunks of a 16x12 grid), 15% text (~330 tokens, lognormal); tokens clipped to [1, S]."""
    docs = []
    for _ in range(num):
        r = rng.random()
        h, w = 2 * rng.integers(8, 33, size=2)
        if r < 0.45:
            docs.append((int(h * w // 4 + 6 + rng.lognormal(3.5, 0.5)), int(h * w)))
        elif r < 0.75:
            docs.append((int(h * w // 4 + 6 + rng.lognormal(5.3, 0.7)), int(h * w)))
        elif r < 0.85:
            chunks = int(rng.integers(2, 17))
            docs.append((int(chunks * 58 + rng.lognormal(4, 0.5)), chunks * 4 * 16 * 12))
        else:
            docs.append((int(rng.lognormal(5.8, 0.9)), 0))
    return [(max(1, min(t, seq_length)), p) for t, p in docs]
