"""The Kimi family's FLOPs and memory model: MoonViT + Kimi projector (``planning/costs.py``,
``planning/tensors.py``, ``planning/activations.py``, ``training/flops.py`` hold the formulas;
this module names them for the family interface). Light: config and planning imports only."""

from __future__ import annotations

from megatron_vlm.planning.activations import vision_bytes
from megatron_vlm.planning.costs import vision_flops
from megatron_vlm.planning.tensors import vision_tensors


def step_flops(vision, llm_hidden_size: int, grid_thw) -> float:
    """Training FLOPs of MoonViT + projector on the media items ``grid_thw`` (MFU)."""
    from megatron_vlm.training.flops import vit_flops

    return vit_flops(vision, llm_hidden_size, grid_thw)


__all__ = ["step_flops", "vision_bytes", "vision_flops", "vision_tensors"]
