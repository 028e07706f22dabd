"""GLM-4.1V / GLM-4.5V vision tower and projector: HF names <-> ours (``convert/rules.py``).

HF names are transformers 5.25's ``Glm4vVisionModel`` / ``Glm4vMoeVisionModel`` modules (one
architecture), relative to the vision model (``model.visual.`` in
``Glm4v(Moe)ForConditionalGeneration``; :data:`HF_VISUAL_PREFIX`). Two targets on our side:

* the tower (:class:`~megatron_vlm.families.glm.vision.GlmViT`, ``vision_tower.`` in the VLM):
  fused ``attn.qkv`` (``[q; k; v]``) -> megatron's per-head ``linear_qkv`` (``VIT_WQKV``, needs
  ``ConvertContext.vision_num_heads``), ``gate_proj``/``up_proj`` -> ``linear_fc1``
  (``FUSE_GATE_UP``), the flat ``[24*24, d]`` table kept flat;
* the projector (:class:`~megatron_vlm.families.glm.merger.GlmMerger`, ``projector.``): HF's
  ``downsample`` (in its vision model) and ``merger``.

``te=`` names: megatron's Transformer Engine layer fuses the block norms into the next linear.
"""

from __future__ import annotations

from megatron_vlm.convert.rules import Rule, prefixed
from megatron_vlm.convert.transforms import FUSE_GATE_UP, VIT_WQKV

HF_VISUAL_PREFIX = "model.visual."
"""Where ``Glm4v(Moe)ForConditionalGeneration`` keeps its vision model (``model.visual``)."""


def glm_vision_rules() -> list[Rule]:
    """The tower: HF names under the vision model <-> ours under the tower."""
    hl, ol = "blocks.{L}.", "encoder.layers.{L}."
    return [
        Rule("patch_embed.proj.{p}", "patch_embed.proj.{p}"),
        Rule("post_conv_layernorm.weight", "patch_embed.norm.weight"),
        Rule("embeddings.position_embedding.weight", "pos_embed.weight"),
        Rule(hl + "norm1.weight", ol + "input_layernorm.weight",
             te=ol + "self_attention.linear_qkv.layer_norm_weight"),
        Rule(hl + "attn.qkv.{p}", ol + "self_attention.linear_qkv.{p}", transform=VIT_WQKV),
        Rule(hl + "attn.proj.weight", ol + "self_attention.linear_proj.weight"),
        Rule(hl + "norm2.weight", ol + "pre_mlp_layernorm.weight",
             te=ol + "mlp.linear_fc1.layer_norm_weight"),
        Rule((hl + "mlp.gate_proj.weight", hl + "mlp.up_proj.weight"),
             ol + "mlp.linear_fc1.weight", transform=FUSE_GATE_UP),
        Rule(hl + "mlp.down_proj.weight", ol + "mlp.linear_fc2.weight"),
        Rule("post_layernorm.weight", "encoder.final_layernorm.weight"),
    ]


def glm_merger_rules() -> list[Rule]:
    """The projector: HF ``downsample`` and ``merger.*`` (under the vision model) <-> ours."""
    return [
        Rule("downsample.{p}", "downsample.{p}"),
        Rule("merger.proj.weight", "proj.weight"),
        Rule("merger.post_projection_norm.{p}", "post_projection_norm.{p}"),
        Rule(("merger.gate_proj.weight", "merger.up_proj.weight"), "mlp.linear_fc1.weight",
             transform=FUSE_GATE_UP),
        Rule("merger.down_proj.weight", "mlp.linear_fc2.weight"),
    ]


def glm_visual_rules(hf_prefix: str = HF_VISUAL_PREFIX, tower_prefix: str = "vision_tower.",
                     projector_prefix: str = "projector.") -> list[Rule]:
    """Tower and projector rules under the given prefixes (the VLM's by default)."""
    return (prefixed(glm_vision_rules(), hf_prefix, tower_prefix)
            + prefixed(glm_merger_rules(), hf_prefix, projector_prefix))
