"""The packed-batch contract between data and model (SPEC §11), text part.

One micro-batch is one packed sequence of ``S`` tokens holding several documents. Each document
occupies a span padded to a multiple of ``pad_to_multiple``; the tail after the last document is
padding too. Vision fields join in the vision-tower issue.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class VisionInputs:
    """The media of one micro-batch (SPEC §11): every image and video chunk, patchified.

    Items are images (t = 1) or video chunks of up to 4 frames (the last chunk of a video may be
    shorter). Item ``m`` owns ``t*h*w`` consecutive patches of ``pixel_values`` (raster order:
    frame, row, col) and, after the 2x2 merge with temporal mean pooling, ``h*w/4`` consecutive
    placeholder tokens of the text sequence starting at ``placeholder_starts[m]``. Items are
    independent, each with its own grid: the SlowFast sampler's slow and fast chunks of one video
    (different grids) are simply separate items.
    """

    pixel_values: torch.Tensor
    """[N_patches, 3, 14, 14] float32, normalised (x/255 - 0.5)/0.5."""
    grid_thw: torch.Tensor
    """[M, 3] int64: (t, h, w) of each item in patches; h and w even."""
    placeholder_starts: torch.Tensor
    """[M] int64: index in the packed token sequence of each item's first placeholder token."""
    is_video: torch.Tensor
    """[M] bool: the item is a video chunk (for metrics and budgets)."""
    media_index: torch.Tensor | None = None
    """[M] int64: which image or video each item belongs to, numbered 0, 1, ... in item order;
    the chunks of one video share a number (consecutive items, in time order). None when the
    producer does not record it (the model does not need it; frame-order probes do)."""
    is_fast: torch.Tensor | None = None
    """[M] bool: the item is a SlowFast *fast* chunk (a reduced grid, see data/slowfast.py;
    metrics only -- each item's grid already tells the vision tower all it needs). None: no
    item is."""

    @property
    def cu_seqlens(self) -> torch.Tensor:
        """[M + 1] int32 ViT cumulative patch counts (t*h*w per item)."""
        lengths = self.grid_thw.prod(dim=1)
        return torch.nn.functional.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)

    @property
    def num_llm_tokens(self) -> torch.Tensor:
        """[M] placeholder tokens per item: h*w/4 (temporal mean pooling keeps one frame)."""
        return self.grid_thw[:, 1] * self.grid_thw[:, 2] // 4


@dataclass
class PackedBatch:
    """One packed micro-batch. All tensors on CPU; the trainer moves them."""

    tokens: torch.Tensor
    """[1, S] int64 input ids (padding positions hold ``pad_id``)."""
    labels: torch.Tensor
    """[1, S] int64 next-token targets within each document (anything at masked positions)."""
    loss_mask: torch.Tensor
    """[1, S] float32: 1 on real tokens with a next token in the same document, else 0
    (0 on padding, masked prompt spans, media placeholders and each document's last token)."""
    position_ids: torch.Tensor
    """[1, S] int64, restarting at 0 for every document."""
    cu_seqlens: torch.Tensor
    """[n + 1] int32 cumulative *real* document lengths."""
    cu_seqlens_padded: torch.Tensor
    """[n + 1] int32 cumulative padded document spans (the layout of ``tokens``);
    ``cu_seqlens_padded[-1] <= S``, the rest is tail padding."""
    max_seqlen: int
    """Longest padded document span (for attention kernels)."""
    vision: VisionInputs | None = None
    """Media of this micro-batch; None for text-only batches."""
    mrope_position_ids: torch.Tensor | None = None
    """[3, S] int64 (t, h, w) M-RoPE ids, built per document by the family's position rule
    (``data/mrope_positions.py``): real tokens by the rule, a document's padding continuing from
    1 + its largest id, the tail from 0 (equal on the three axes; a text-only pack's rows equal
    ``position_ids[0]``). None for 1D-RoPE families (Kimi), which read ``position_ids``. Split
    under context parallelism along its last (token) dim, with the tokens."""

    @property
    def seq_length(self) -> int:
        return int(self.tokens.shape[1])

    @property
    def padding_mask(self) -> torch.Tensor:
        """[1, S] bool, True on padding tokens (megatron's MoE convention)."""
        s = self.seq_length
        valid = torch.zeros(s, dtype=torch.bool)
        cu, cur = self.cu_seqlens_padded.tolist(), self.cu_seqlens.tolist()
        for i in range(len(cu) - 1):
            start, real = cu[i], cur[i + 1] - cur[i]
            valid[start : start + real] = True
        return (~valid).unsqueeze(0)

    @property
    def num_loss_tokens(self) -> int:
        return int(self.loss_mask.sum().item())
