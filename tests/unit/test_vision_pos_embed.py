"""MoonViT position embeddings: sin-cos temporal table with the zero row, frame rows, and the
learned table resampled by bicubic interpolation (checked against a hand-written Keys kernel)."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_vlm.models.vision.pos_embed import (
    VisionPositionEmbedding,
    frame_rows,
    temporal_sincos_table,
)


def test_temporal_table_rows():
    dim, frames = 6, 4
    table = temporal_sincos_table(frames, dim)
    assert table.shape == (frames + 1, dim)
    assert torch.equal(table[0], torch.zeros(dim))
    for f in range(frames):
        inv = [10000 ** (-2 * i / dim) for i in range(dim // 2)]
        row = [math.sin(f * x) for x in inv] + [math.cos(f * x) for x in inv]
        torch.testing.assert_close(table[f + 1], torch.tensor(row), rtol=1e-6, atol=1e-6)


def test_frame_rows_zero_for_single_frames():
    grid = torch.tensor([[1, 2, 2], [3, 1, 2], [1, 1, 2]])
    assert frame_rows(grid).tolist() == [0, 0, 0, 0, 1, 1, 2, 2, 3, 3, 0, 0]


def keys_bicubic_1d(values: torch.Tensor, out_size: int) -> torch.Tensor:
    """Resample ``values [n, ...]`` along dim 0: half-pixel centres, a = -0.75, edge clamp."""
    n, a = values.shape[0], -0.75

    def kernel(d: float) -> float:
        d = abs(d)
        if d <= 1:
            return ((a + 2) * d - (a + 3)) * d * d + 1
        if d < 2:
            return ((a * d - 5 * a) * d + 8 * a) * d - 4 * a
        return 0.0

    rows = []
    for j in range(out_size):
        src = (j + 0.5) * n / out_size - 0.5
        base = math.floor(src)
        acc = torch.zeros_like(values[0])
        for tap in range(base - 1, base + 3):
            acc = acc + kernel(src - tap) * values[min(max(tap, 0), n - 1)]
        rows.append(acc)
    return torch.stack(rows)


def test_spatial_table_bicubic_resampling_and_native_identity():
    torch.manual_seed(0)
    emb = VisionPositionEmbedding(4, 5, 4, 3, dtype=torch.float32)
    table = emb.weight.detach().double()
    expected = keys_bicubic_1d(keys_bicubic_1d(table, 7).transpose(0, 1), 2).transpose(0, 1)
    torch.testing.assert_close(emb.spatial(7, 2).detach().double(), expected.reshape(14, 3),
                               rtol=1e-5, atol=1e-5)
    assert torch.equal(emb.spatial(4, 5), emb.weight.flatten(0, 1))


def test_forward_adds_spatial_then_temporal_per_frame():
    torch.manual_seed(1)
    emb = VisionPositionEmbedding(4, 4, 4, 6, dtype=torch.float32)
    grid = torch.tensor([[1, 2, 4], [3, 2, 4]])
    x = torch.randn(32, 6)
    with torch.no_grad():
        out = emb(x, grid) - x
    spatial = emb.spatial(2, 4).detach()
    temporal = temporal_sincos_table(4, 6)
    torch.testing.assert_close(out[:8], spatial)  # image: zero temporal row
    for f in range(3):
        torch.testing.assert_close(out[8 + 8 * f : 16 + 8 * f], spatial + temporal[f + 1])


def test_too_many_frames_is_an_error():
    emb = VisionPositionEmbedding(4, 4, 4, 6, dtype=torch.float32)
    with pytest.raises(ValueError, match="chunks of <= 4 frames"):
        emb(torch.zeros(5 * 4, 6), torch.tensor([[5, 2, 2]]))
