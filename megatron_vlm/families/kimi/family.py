"""Kimi K2.5 / Kimi-VL: MoonViT (-3D) with 2D RoPE, the temporal-pooling 2x2 merger and Kimi's
projector, on the MLA / DeepSeek-V3 MoE LLM with 1D RoPE (SPEC §2).

The parts live where they were first written (``models/vision/moonvit.py`` and
``models/vlm.py``'s ``kimi_*`` builders, ``convert/tables.py``, ``recipes/kimi.py``); this
module names them.
"""

from __future__ import annotations

from megatron_vlm.data.media_rules import kimi_media_rules
from megatron_vlm.families.base import ModelFamily
from megatron_vlm.families.kimi import costs
from megatron_vlm.families.kimi.config import PROJECTOR_CONFIG, VISION_CONFIG
from megatron_vlm.models.vlm import kimi_llm_tokens_per_item, kimi_projector, kimi_vision_tower

FAMILY = ModelFamily(
    name="kimi",
    summary="Kimi K2.5 / Kimi-VL: MoonViT(-3D) + Kimi projector + MLA/MoE LLM",
    vision_config=VISION_CONFIG,
    projector_config=PROJECTOR_CONFIG,
    build_vision_tower=kimi_vision_tower,
    build_projector=kimi_projector,
    llm_tokens_per_item=kimi_llm_tokens_per_item,
    costs=costs,
    position_ids="rope",
    media_rules=kimi_media_rules,
    hf_architectures=("Kimi_K25ForConditionalGeneration", "KimiK25ForConditionalGeneration",
                      "KimiVLForConditionalGeneration", "DeepseekV3ForCausalLM"),
    recipes=("kimi_k25", "kimi_k25_512", "kimi_k25_32k", "kimi_k25_128k", "kimi_vl_a3b",
             "tiny_cpu", "tiny_text_cpu", "tiny_vlm_cpu"),
)
