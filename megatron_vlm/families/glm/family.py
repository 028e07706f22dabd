"""GLM-4.5V / GLM-4.1V (Zhipu): the Glm4v vision tower (Conv3d over 2 frames, bicubic table, 2D
RoPE, SwiGLU blocks), its projector (2x2 downsample conv + merger), GLM-4.5-Air MoE or GLM-4
dense LLM with half-dimension M-RoPE (``../shared/FAMILIES.md`` §2; transformers 5.25
``Glm4vMoeForConditionalGeneration`` / ``Glm4vForConditionalGeneration`` are the reference).

Parts: ``config.py`` (tower and projector configs), ``vision.py`` (tower on megatron blocks),
``merger.py`` (projector), ``processing.py`` / ``media.py`` / ``positions.py`` (the data side:
GLM's image/video rules, template, M-RoPE position rule), ``patch_layout.py`` (the packed
batch's raster frames -> the tower's block-major rows), ``costs.py``, ``hf_table.py`` /
``hf_config.py`` (HF conversion). The LLM is ``model.llm`` with ``attention: gqa``,
``position_embedding: mrope``, ``rotary_fraction: 0.5`` (and ``mrope_style: interleaved`` plus
``sandwich_norms`` for GLM-4.1V).

Media items reach the model as the data side packs them (``data/contract.py``): every image or
video temporal patch is one item ``(2, h, w)`` in FRAMES with ``2*h*w`` raster patches; the
tower (:class:`GlmPackedTower`) turns them into transformers' layout (one ``(1, h, w)`` segment
of ``h*w`` block-major rows per item) and each item becomes ``h*w/4`` LLM tokens.
"""

from __future__ import annotations

import torch
from torch import Tensor

from megatron_vlm.config.model import ModelConfig
from megatron_vlm.config.parallel import ParallelConfig
from megatron_vlm.families.base import ModelFamily
from megatron_vlm.families.glm import costs
from megatron_vlm.families.glm.config import PROJECTOR_CONFIG, VISION_CONFIG, GlmVisionConfig
from megatron_vlm.families.glm.media import glm_media_rules
from megatron_vlm.families.glm.merger import build_glm_merger
from megatron_vlm.families.glm.patch_layout import tower_inputs
from megatron_vlm.families.glm.vision import GlmViT, glm_vision_transformer_config
from megatron_vlm.models.vision.moonvit import vit_kernel_choice
from megatron_vlm.models.vision.packed_vit import tower_groups


class GlmPackedTower(GlmViT):
    """The Glm4v tower as the VLM calls it: ``(pixel_values [N, 3, 14, 14] raster frames,
    grid_thw [M, 3] (2, h, w) in frames)`` of a packed batch -> ``[sum h*w/4, 4, D]``
    (``patch_layout.tower_inputs``, then :class:`~megatron_vlm.families.glm.vision.GlmViT`).
    Same parameters and names as ``GlmViT``."""

    def forward(self, pixel_values: Tensor, grid_thw: Tensor) -> Tensor:
        rows, grid = tower_inputs(pixel_values, grid_thw.detach().cpu().long())
        return super().forward(rows, grid)


def build_vision_tower(model: ModelConfig, parallel: ParallelConfig, *, pg_collection,
                       choice=None) -> torch.nn.Module:
    """The Glm4v tower on the packed batch's layout (``vision.build_glm_vision``'s groups,
    megatron config and layer choice)."""
    vision = model.vision
    if choice is None:
        choice = vit_kernel_choice(vision, model.params_dtype, model.kernels)
    groups = tower_groups(vision.parallel_mode, parallel, pg_collection)
    config = glm_vision_transformer_config(vision, groups.parallel, model.params_dtype, choice)
    return GlmPackedTower(config, vision, choice=choice, **groups.tower_kwargs())


def build_projector(model: ModelConfig, parallel: ParallelConfig, *,
                    pg_collection) -> torch.nn.Module:
    """Downsample conv + merger (Linear -> LayerNorm -> GELU -> SwiGLU), TP over
    ``pg_collection``; checked against the tower and the LLM width first."""
    model.projector.check_matches(model.vision, model.llm.hidden_size)
    return build_glm_merger(model.projector, parallel, model.params_dtype,
                            tp_group=pg_collection.tp)


def llm_tokens_per_item(vision: GlmVisionConfig, grid_thw: Tensor) -> Tensor:
    """``(t / 2) * h * w / 4`` per item ``[M]`` on FRAME grids (the packed batch's ``(2, h, w)``:
    the Conv3d folds each temporal patch of 2 frames into one grid of ``h*w/4`` tokens)."""
    t = vision.temporal_patch_size
    if bool((grid_thw[:, 0] % t).any()):
        raise ValueError(f"grid_thw {grid_thw.tolist()}: GLM items have a multiple of "
                         f"temporal_patch_size={t} frames (an image is duplicated to 2)")
    if bool((grid_thw[:, 1] % vision.merge_kernel_height).any()
            or (grid_thw[:, 2] % vision.merge_kernel_width).any()):
        raise ValueError(f"grid_thw {grid_thw.tolist()} has a side not divisible by the merge "
                         f"kernel {vision.merge_kernel_height}x{vision.merge_kernel_width}; "
                         "resize images to multiples of patch_size x merge kernel (28 px)")
    return (grid_thw[:, 0] // t) * grid_thw[:, 1] * grid_thw[:, 2] // vision.merge_size


FAMILY = ModelFamily(
    name="glm",
    summary="GLM-4.5V / GLM-4.1V: Glm4v tower + downsample/merger + GLM-4.5-Air MoE or GLM-4 "
            "dense with half-dimension M-RoPE",
    vision_config=VISION_CONFIG,
    projector_config=PROJECTOR_CONFIG,
    build_vision_tower=build_vision_tower,
    build_projector=build_projector,
    llm_tokens_per_item=llm_tokens_per_item,
    costs=costs,
    position_ids="mrope",
    media_rules=glm_media_rules,
    hf_architectures=("Glm4vMoeForConditionalGeneration", "Glm4vForConditionalGeneration"),
    recipes=("glm45v", "glm45v_long_32k", "glm41v_9b", "tiny_glm_cpu"),
    notes={"sources": "FAMILIES.md §2: transformers 5.25 models/glm4v, models/glm4v_moe; "
                      "MTP names from Megatron-Bridge glm45_bridge.py"},
)
