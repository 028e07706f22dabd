"""MoonViT 2D RoPE: angles as SPEC §2 writes them, rotation as complex multiplication, and the
per-head q/k row layouts (interleaved checkpoint vs transformers' rotate-half)."""

from __future__ import annotations

import math

import torch

from megatron_vlm.models.vision.hf_weights import (
    fuse_qkv,
    rope_rows_half_to_interleaved,
    rope_rows_interleaved_to_half,
    split_qkv,
)
from megatron_vlm.models.vision.rope2d import apply_rope_2d, rope_2d_angles


def test_angles_follow_spec_formula():
    """Pair 2i rotates by column * 10000^(-4i/d), pair 2i+1 by row * ...; repeated per frame."""
    head_dim, grid = 12, [(2, 3, 5), (1, 2, 2)]
    angles = rope_2d_angles(torch.tensor(grid), head_dim, 10000.0)
    expected = []
    for t, h, w in grid:
        for _ in range(t):
            for row in range(h):
                for col in range(w):
                    token = []
                    for i in range(head_dim // 4):
                        freq = 10000.0 ** (-4 * i / head_dim)
                        token += [col * freq, row * freq]
                    expected.append(token)
    torch.testing.assert_close(angles, torch.tensor(expected), rtol=1e-6, atol=1e-6)


def test_rotation_is_complex_multiplication_per_pair():
    x = torch.randn(7, 3, 8, dtype=torch.float64)
    angles = torch.rand(7, 4, dtype=torch.float64) * 10
    expected = torch.view_as_real(
        torch.view_as_complex(x.unflatten(-1, (4, 2)).contiguous())
        * torch.polar(torch.ones_like(angles), angles)[:, None, :]
    ).flatten(-2)
    torch.testing.assert_close(apply_rope_2d(x, angles), expected)


def test_scores_depend_only_on_relative_2d_position():
    """<R(p) q, R(p') k> is unchanged when both patches move by the same (row, col) offset."""
    head_dim = 8
    grid = torch.tensor([[1, 6, 6]])
    angles = rope_2d_angles(grid, head_dim, 10000.0).view(6, 6, -1)
    q, k = torch.randn(1, head_dim), torch.randn(1, head_dim)

    def score(p, p2):
        return (apply_rope_2d(q, angles[p][None]) * apply_rope_2d(k, angles[p2][None])).sum()

    torch.testing.assert_close(score((1, 2), (3, 0)), score((2, 5), (4, 3)))
    assert not torch.allclose(score((1, 2), (3, 0)), score((1, 2), (0, 3)))  # axes not symmetric


def test_interleaved_and_rotate_half_rows():
    """One head, d = 4: interleaved rows (a0, b0, a1, b1) are (a0, a1, b0, b1) in rotate-half."""
    rows = torch.tensor([[10.0], [11.0], [20.0], [21.0]])  # a0 b0 a1 b1
    half = rope_rows_interleaved_to_half(rows, num_heads=1)
    assert half.flatten().tolist() == [10.0, 20.0, 11.0, 21.0]
    w = torch.randn(3 * 8, 5)
    torch.testing.assert_close(
        rope_rows_half_to_interleaved(rope_rows_interleaved_to_half(w, 3), 3), w, rtol=0, atol=0
    )


def test_fused_qkv_is_per_head_q_k_v():
    heads, d = 2, 3
    q, k, v = (torch.arange(heads * d).float()[:, None] + off for off in (0, 100, 200))
    fused = fuse_qkv(q, k, v, heads).flatten().tolist()
    assert fused == [0, 1, 2, 100, 101, 102, 200, 201, 202, 3, 4, 5, 103, 104, 105, 203, 204, 205]
    for a, b in zip(split_qkv(fuse_qkv(q, k, v, heads), heads), (q, k, v)):
        assert torch.equal(a, b)
    assert math.isclose(float(q.sum()), 15.0)
