"""MoonViT absolute position embeddings: a learned 2D table and a fixed sin-cos temporal table.

Spatial (SPEC §2): a learned ``[H, W, D]`` table (64 x 64 x 1152), bicubically resampled to each
item's patch grid ``(h, w)`` -- ``F.interpolate(mode="bicubic", align_corners=False)``, Keys kernel
a = -0.75 with edge clamping, exactly what transformers 5.23 reproduces with its
``get_vision_interpolation_indices_and_weights`` gather (at the table's own size it is the
identity). Temporal: ``row f = [sin(f * inv_freq), cos(f * inv_freq)]``, ``inv_freq_i =
10000^(-2i/D)``, f < T, with a zero row prepended: an item with t = 1 (images, a 1-frame last
chunk) uses the zero row, frame f of an item with t > 1 uses row f + 1.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def temporal_sincos_table(num_frames: int, dim: int, device: torch.device | None = None) -> Tensor:
    """``[num_frames + 1, dim]`` fp32 table; row 0 is zeros."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0, dim, 2, device=device).float() / dim))
    freqs = torch.outer(torch.arange(num_frames, device=device, dtype=torch.float), inv_freq)
    table = torch.cat([freqs.sin(), freqs.cos()], dim=1)
    return torch.cat([table.new_zeros(1, dim), table])


def frame_rows(grid_thw: Tensor) -> Tensor:
    """Per-patch row of the temporal table ``[N]`` (CPU): 0 for t = 1, else frame + 1."""
    parts = [
        (torch.arange(t) + int(t > 1)).repeat_interleave(h * w) for t, h, w in grid_thw.tolist()
    ]
    return torch.cat(parts)


class VisionPositionEmbedding(torch.nn.Module):
    """Adds the spatial (learned, resampled) and temporal (sin-cos) embeddings to patch tokens."""

    def __init__(
        self, height: int, width: int, num_frames: int, dim: int, dtype: torch.dtype
    ) -> None:
        super().__init__()
        self.num_frames = num_frames
        self.dim = dim
        # Initialised like transformers' Kimi_K25 (trunc normal, std 1); imports overwrite it.
        self.weight = torch.nn.Parameter(torch.empty(height, width, dim, dtype=dtype))
        torch.nn.init.trunc_normal_(self.weight)

    def spatial(self, height: int, width: int) -> Tensor:
        """The table resampled to an ``(height, width)`` patch grid, ``[height * width, D]``."""
        if (height, width) == tuple(self.weight.shape[:2]):
            return self.weight.flatten(0, 1)
        grid = self.weight.permute(2, 0, 1).unsqueeze(0)  # [1, D, H, W]
        # bicubic upsampling has no bf16 CPU kernel; the table is small, resample in fp32.
        resized = F.interpolate(
            grid.float(), size=(height, width), mode="bicubic", align_corners=False
        )
        return resized[0].flatten(1).t().to(self.weight.dtype)

    def forward(self, x: Tensor, grid_thw: Tensor) -> Tensor:
        """``x [N, D]`` patch tokens in raster order (item, frame, row, col) -> ``x + pos``."""
        grid = grid_thw.cpu()
        if int(grid[:, 0].max()) > self.num_frames:
            raise ValueError(
                f"a video chunk has t={int(grid[:, 0].max())} frames but the temporal table has "
                f"{self.num_frames} rows; split videos into chunks of <= {self.num_frames} frames"
            )
        # Resample once per distinct grid size, then gather every patch's row.
        sizes = sorted({(h, w) for _, h, w in grid.tolist()})
        tables, offsets, start = [], {}, 0
        for h, w in sizes:
            tables.append(self.spatial(h, w))
            offsets[(h, w)] = start
            start += h * w
        index = torch.cat([
            (offsets[(h, w)] + torch.arange(h * w)).repeat(t) for t, h, w in grid.tolist()
        ]).to(x.device)
        pos = torch.cat(tables).index_select(0, index)
        temporal = temporal_sincos_table(self.num_frames, self.dim, device=x.device)
        pos = pos + temporal.index_select(0, frame_rows(grid).to(x.device))
        return x + pos.to(x.dtype)
