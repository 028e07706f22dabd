"""InternVL3.5 (Shanghai AI Lab): InternViT-300M or InternViT-6B, pixel shuffle 0.5 and the
``mlp1`` projector, a Qwen3 dense, Qwen3-MoE or GPT-OSS LLM with plain 1D RoPE, dynamic 448-px
tiling (``../shared/FAMILIES.md`` §3; transformers 5.25 ``InternVLForConditionalGeneration`` is
the reference).

Parts: ``config.py`` (tower and projector configs), ``vision.py`` (InternViT on megatron blocks),
``projector.py`` (``mlp1``), ``processing.py`` / ``media.py`` (the data side: tiling, template,
video frames, ChatML), ``costs.py``, ``hf_table.py`` / ``hf_config.py`` (HF conversion, with
``hf_vision_names.py`` / ``hf_llm_names.py`` / ``hf_vision_config.py``). The LLM is
``model.llm`` with ``attention: gqa`` and ``position_embedding: rope`` (Qwen3: ``qk_layernorm``;
Qwen3-MoE: softmax router, ``moe_layer_pattern``; GPT-OSS: sinks, sliding window, clamped SwiGLU,
biases, YaRN).

Media items reach the model as the data side packs them (``data/contract.py``): an image is one
item ``(k, 32, 32)`` -- its ``k`` tiles, thumbnail last -- with ``k*1024`` raster patches
``[*, 3, 14, 14]`` tile-major; a video is one item ``(1, 32, 32)`` per sampled frame. That is
the tower's own input layout (``vision.InternViT``: one attention segment per tile, CLS token
per segment, the 2x2 merge of each tile's grid = pixel shuffle v2), so no reordering sits
between the packed batch and the tower (GLM needs ``patch_layout.py``; InternVL does not). Each
tile or frame becomes ``h*w/4`` = 256 LLM tokens (``<IMG_CONTEXT>`` placeholders).

Recipes (``recipes.py``): InternVL3.5-8B and InternVL3.5-30B-A3B pretraining at 32K, laid out
for H100. The tiny CPU recipe is not built yet, so the family declares none.

Out of scope: InternVL3.5-Flash's Visual Resolution Router (ViCO), which decides tokens per tile
inside the model and so breaks the data side's placeholder counts (issue 21).
"""

from __future__ import annotations

import torch

from megatron_vlm.config.model import ModelConfig
from megatron_vlm.config.parallel import ParallelConfig
from megatron_vlm.families.base import ModelFamily
from megatron_vlm.families.internvl import costs
from megatron_vlm.families.internvl.config import PROJECTOR_CONFIG, VISION_CONFIG
from megatron_vlm.families.internvl.media import internvl_media_rules
from megatron_vlm.families.internvl.projector import build_internvl_projector, llm_tokens_per_item
from megatron_vlm.families.internvl.vision import build_internvit


def build_vision_tower(model: ModelConfig, parallel: ParallelConfig, *, pg_collection,
                       choice=None) -> torch.nn.Module:
    """InternViT on the packed batch's layout (``vision.build_internvit``: split or tp mode,
    layers from ``choice`` else from ``model.kernels``)."""
    return build_internvit(model.vision, parallel, model.params_dtype,
                           pg_collection=pg_collection, kernels=model.kernels, choice=choice)


def build_projector(model: ModelConfig, parallel: ParallelConfig, *,
                    pg_collection) -> torch.nn.Module:
    """``mlp1`` (LayerNorm -> Linear -> GELU -> Linear), TP over ``pg_collection``; checked
    against the tower and the LLM width first."""
    model.projector.check_matches(model.vision, model.llm.hidden_size)
    return build_internvl_projector(model.projector, parallel, model.params_dtype,
                                    tp_group=pg_collection.tp)


FAMILY = ModelFamily(
    name="internvl",
    summary="InternVL3.5: InternViT-300M/6B + pixel shuffle/mlp1 + Qwen3, Qwen3-MoE or GPT-OSS "
            "with 1D RoPE, dynamic 448-px tiles",
    vision_config=VISION_CONFIG,
    projector_config=PROJECTOR_CONFIG,
    build_vision_tower=build_vision_tower,
    build_projector=build_projector,
    llm_tokens_per_item=llm_tokens_per_item,
    costs=costs,
    position_ids="rope",
    media_rules=internvl_media_rules,
    hf_architectures=("InternVLForConditionalGeneration",),
    recipes=("internvl3_5_8b", "internvl3_5_30b_a3b"),
    notes={"sources": "FAMILIES.md §3: transformers 5.25 models/internvl, models/got_ocr2, "
                      "models/qwen3, models/qwen3_moe, models/gpt_oss",
           "out_of_scope": "InternVL3.5-Flash's Visual Resolution Router (ViCO)",
           "recipes": "recipes.py: InternVL3.5-8B and 30B-A3B at 32K on H100; no tiny CPU "
                      "recipe yet"},
)
