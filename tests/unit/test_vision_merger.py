"""The temporal-pool 2x2 merger against SPEC §2's per-item formula, and its sub-token order."""

from __future__ import annotations

import pytest
import torch

from megatron_vlm.models.vision.merger import tpool_patch_merger


def spec_merger(x: torch.Tensor, grid: list[tuple[int, int, int]]) -> torch.Tensor:
    """Per item: ``x.view(t, h/2, 2, w/2, 2, d).transpose(2, 3).mean(0)`` -> ``(h/2*w/2, 4, d)``."""
    out, start = [], 0
    for t, h, w in grid:
        seq = x[start : start + t * h * w].view(t, h // 2, 2, w // 2, 2, -1)
        out.append(seq.transpose(2, 3).mean(0).reshape(h // 2 * w // 2, 4, -1))
        start += t * h * w
    return torch.cat(out)


def test_mixed_images_and_chunks_match_spec_formula():
    grid = [(1, 4, 6), (4, 2, 4), (2, 6, 2), (1, 2, 2), (3, 4, 4)]
    x = torch.randn(sum(t * h * w for t, h, w in grid), 5)
    torch.testing.assert_close(
        tpool_patch_merger(x, torch.tensor(grid)), spec_merger(x, grid), rtol=0, atol=1e-6
    )


def test_sub_tokens_are_2x2_blocks_row_major():
    """Grid 2x4 (raster indices 0..7): token 0 = patches (0, 1, 4, 5), token 1 = (2, 3, 6, 7) --
    without the transpose it would be (0, 1, 2, 3)."""
    x = torch.arange(8.0)[:, None]
    merged = tpool_patch_merger(x, torch.tensor([[1, 2, 4]]))
    assert merged[..., 0].tolist() == [[0, 1, 4, 5], [2, 3, 6, 7]]


def test_frames_are_averaged():
    x = torch.arange(3 * 4.0)[:, None]  # 3 frames of a 2x2 grid
    merged = tpool_patch_merger(x, torch.tensor([[3, 2, 2]]))
    assert merged[0, :, 0].tolist() == [4.0, 5.0, 6.0, 7.0]


def test_grid_not_divisible_by_merge_kernel_is_an_error():
    with pytest.raises(ValueError, match="not divisible by the merge kernel"):
        tpool_patch_merger(torch.zeros(6, 2), torch.tensor([[1, 2, 3]]))
