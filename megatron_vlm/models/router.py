"""MoE router that keeps padding tokens away from experts.

megatron-core 0.16.1's ``TopKRouter.routing`` (``transformer/moe/router.py:544``) uses
``padding_mask`` only to keep padding out of the expert-bias token counts and the aux losses;
the ``routing_map`` it returns still sends padding tokens to their top-k experts, where they
cost expert FLOPs, all-to-all bandwidth and (with capacity) displace real tokens. This subclass
clears the routing of padding tokens, so with a dropless dispatcher they reach no expert (their
MoE output is the shared expert's alone, and it is masked out of the loss anyway).

It also fixes the expert-bias token count with a padding mask: ``router.py:542`` computes
``routing_map & (~padding_mask)`` with shapes ``[T, E]`` and ``[T]``, which raises (or, when
``T == E``, silently masks the wrong axis).

Mask convention: as in megatron's code (``moe_utils.py:794``, ``router.py:541``), ``True`` marks a
*padding* token (its docstrings say the opposite; the code is what runs).
"""

from __future__ import annotations

import torch
from megatron.core.transformer.moe.router import TopKRouter


class PaddingFreeTopKRouter(TopKRouter):
    """``TopKRouter`` whose routing map and probabilities are zero for padding tokens."""

    def _apply_expert_bias(
        self, routing_map: torch.Tensor, padding_mask: torch.Tensor | None = None
    ) -> None:
        if padding_mask is not None:
            routing_map = routing_map & ~padding_mask.reshape(-1, 1).bool()
        super()._apply_expert_bias(routing_map, padding_mask=None)

    def routing(
        self, logits: torch.Tensor, padding_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        probs, routing_map = super().routing(logits, padding_mask=padding_mask)
        if padding_mask is not None:
            keep = ~padding_mask.reshape(-1, 1).bool()
            routing_map = routing_map & keep
            probs = probs * keep.to(probs.dtype)
        return probs, routing_map
