"""Vision towers on megatron-core blocks: MoonViT / MoonViT-3D (Kimi-VL, Kimi K2.5)."""

from megatron_vlm.models.vision.merger import tpool_patch_merger
from megatron_vlm.models.vision.moonvit import (
    MoonViT,
    build_moonvit,
    build_vision_transformer_config,
    moonvit_layer_spec,
)
from megatron_vlm.models.vision.pos_embed import VisionPositionEmbedding, temporal_sincos_table
from megatron_vlm.models.vision.rope2d import Rope2DSelfAttention, apply_rope_2d, rope_2d_angles

__all__ = [
    "MoonViT", "Rope2DSelfAttention", "VisionPositionEmbedding", "apply_rope_2d",
    "build_moonvit", "build_vision_transformer_config", "moonvit_layer_spec", "rope_2d_angles",
    "temporal_sincos_table", "tpool_patch_merger",
]
