"""Keye-VL 1.5 (Kwai): SigLIP-so400m NaViT tower with 2D RoPE, the 1.5 merger (2x2 merge per
frame, LayerNorm after the merge, no temporal pooling), Qwen3-8B with M-RoPE
(``../shared/FAMILIES.md`` §1; the released code wins over the paper).

Parts: ``config.py`` (tower and merger configs), ``vision.py`` (tower on megatron blocks),
``merger.py``, ``siglip_init.py`` (initialise from a SigLIP checkpoint), ``processing.py`` and
``slowfast.py`` (image/video rules of ``keye-vl-utils`` 1.5.2), ``costs.py``. The LLM is
``model.llm`` with ``attention: gqa`` and ``position_embedding: mrope``.
"""

from __future__ import annotations

import torch

from megatron_vlm.config.model import ModelConfig
from megatron_vlm.config.parallel import ParallelConfig
from megatron_vlm.families.base import ModelFamily
from megatron_vlm.families.keye import costs
from megatron_vlm.families.keye.config import PROJECTOR_CONFIG, VISION_CONFIG
from megatron_vlm.families.keye.media import keye_media_rules
from megatron_vlm.families.keye.merger import build_keye_merger, llm_tokens_per_item
from megatron_vlm.families.keye.vision import build_keye_vision


def build_vision_tower(model: ModelConfig, parallel: ParallelConfig, *, pg_collection,
                       choice=None) -> torch.nn.Module:
    """The SigLIP NaViT tower (its own layer spec; ``choice`` carries the attention kernel)."""
    return build_keye_vision(model.vision, parallel, model.params_dtype,
                             pg_collection=pg_collection, choice=choice)


def build_projector(model: ModelConfig, parallel: ParallelConfig, *,
                    pg_collection) -> torch.nn.Module:
    """The 1.5 merger: LayerNorm(4d) -> Linear -> GELU -> Linear, TP over ``pg_collection``."""
    return build_keye_merger(model.projector, parallel, model.params_dtype,
                             tp_group=pg_collection.tp)


FAMILY = ModelFamily(
    name="keye",
    summary="Keye-VL 1.5: SigLIP-so400m NaViT + 1.5 merger + Qwen3 with M-RoPE",
    vision_config=VISION_CONFIG,
    projector_config=PROJECTOR_CONFIG,
    build_vision_tower=build_vision_tower,
    build_projector=build_projector,
    llm_tokens_per_item=llm_tokens_per_item,
    costs=costs,
    position_ids="mrope",
    media_rules=keye_media_rules,
    hf_architectures=("KeyeVL1_5ForConditionalGeneration",),
    recipes=("keye_vl_1_5_8b", "keye_vl_1_5_8b_anneal_32k", "keye_vl_1_5_8b_anneal_128k",
             "tiny_keye_cpu"),
    notes={"sources": "FAMILIES.md §1: keye-vl-utils 1.5.2, vLLM keye_vl1_5.py, HF port"},
)
