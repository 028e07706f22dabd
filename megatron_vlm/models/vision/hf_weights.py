"""Hugging Face Kimi K2.5 vision tower / projector weights -> our modules.

The mapping lives in ``megatron_vlm.convert`` (one table per family, shared with the checkpoint
converter); this module keeps the names the vision tests and workers import:
``vision_state_from_hf`` / ``projector_state_from_hf`` (any transformers 5.23 layout, see
``convert/state_dicts.py``), ``load_state`` (full state dict -> a TP shard), and the per-head
helpers. Ours keeps the checkpoint's interleaved 2D-RoPE layout (what ``rope2d`` rotates), fused
per head as megatron's ``linear_qkv`` wants it: rows ``[q_h; k_h; v_h]`` for h = 0..H-1.
"""

from megatron_vlm.convert.state_dicts import (
    load_state,
    projector_state_from_hf,
    vision_state_from_hf,
)
from megatron_vlm.convert.transforms import (
    fuse_qkv,
    rope_rows_half_to_interleaved,
    rope_rows_interleaved_to_half,
    split_qkv,
)

__all__ = [
    "fuse_qkv",
    "load_state",
    "projector_state_from_hf",
    "rope_rows_half_to_interleaved",
    "rope_rows_interleaved_to_half",
    "split_qkv",
    "vision_state_from_hf",
]
