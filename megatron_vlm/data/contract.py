"""The packed-batch contract between data and model (SPEC §11), text part.

One micro-batch is one packed sequence of ``S`` tokens holding several documents. Each document
occupies a span padded to a multiple of ``pad_to_multiple``; the tail after the last document is
padding too. Vision fields join in the vision-tower issue.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


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
