"""InternVL3.5 vision tower and projector: HF names <-> ours (``convert/rules.py``).

HF names are transformers 5.25's ``InternVLModel`` modules (the ``-HF`` checkpoints' layout):
the tower under ``model.vision_tower.`` (:data:`HF_VISION_PREFIX`), ``mlp1`` under
``model.multi_modal_projector.`` (:data:`HF_PROJECTOR_PREFIX`). The original remote-code
checkpoints (``vision_model.``, ``mlp1.{0,1,3}``, fused ``attn.qkv``) are not mapped here.

* separate ``q_proj``/``k_proj``/``v_proj`` -> megatron's per-head ``linear_qkv``
  (``VIT_Q_K_V``, needs ``ConvertContext.vision_num_heads``; no RoPE, so no row permutation);
  their biases only for 300M (6B has none, and ours then has no ``linear_qkv.bias``);
* ``lambda_1`` / ``lambda_2`` -> the layer scales of the layer's bdas;
* 6B's whole-width ``q_norm`` / ``k_norm`` ``[hidden]`` -> ``q_layernorm`` / ``k_layernorm``
  (same head-major order);
* CLS token and table keep HF's shapes.

``te=`` names: megatron's Transformer Engine layer fuses the block norms into the next linear
(LayerNorm: weight and bias; RMSNorm: weight only, the ``{p}`` binds what exists).
"""

from __future__ import annotations

from megatron_vlm.convert.rules import Rule, prefixed
from megatron_vlm.convert.transforms import VIT_Q_K_V

HF_VISION_PREFIX = "model.vision_tower."
"""Where ``InternVLForConditionalGeneration`` keeps its vision tower."""
HF_PROJECTOR_PREFIX = "model.multi_modal_projector."
"""Where it keeps ``mlp1``."""


def internvit_rules() -> list[Rule]:
    """The tower: HF names under the vision model <-> ours under the tower."""
    hl, ol = "encoder.layer.{L}.", "encoder.layers.{L}."
    attn = hl + "attention."
    qkv = tuple(attn + f"{x}_proj" for x in "qkv")
    return [
        Rule("embeddings.patch_embeddings.projection.{p}", "patch_embed.{p}"),
        Rule("embeddings.cls_token", "pos_embed.cls_token"),
        Rule("embeddings.position_embeddings", "pos_embed.position_embeddings"),
        Rule(hl + "layernorm_before.{p}", ol + "input_layernorm.{p}",
             te=ol + "self_attention.linear_qkv.layer_norm_{p}"),
        Rule(tuple(n + ".weight" for n in qkv), ol + "self_attention.linear_qkv.weight",
             transform=VIT_Q_K_V),
        Rule(tuple(n + ".bias" for n in qkv), ol + "self_attention.linear_qkv.bias",
             transform=VIT_Q_K_V),
        Rule(attn + "q_norm.weight", ol + "self_attention.q_layernorm.weight"),
        Rule(attn + "k_norm.weight", ol + "self_attention.k_layernorm.weight"),
        Rule(attn + "projection_layer.{p}", ol + "self_attention.linear_proj.{p}"),
        Rule(hl + "lambda_1", ol + "self_attn_bda.weight"),
        Rule(hl + "layernorm_after.{p}", ol + "pre_mlp_layernorm.{p}",
             te=ol + "mlp.linear_fc1.layer_norm_{p}"),
        Rule(hl + "mlp.fc1.{p}", ol + "mlp.linear_fc1.{p}"),
        Rule(hl + "mlp.fc2.{p}", ol + "mlp.linear_fc2.{p}"),
        Rule(hl + "lambda_2", ol + "mlp_bda.weight"),
    ]


def internvl_projector_rules() -> list[Rule]:
    """``mlp1``: HF ``multi_modal_projector.*`` <-> ours."""
    return [
        Rule("layer_norm.{p}", "pre_norm.{p}"),
        Rule("linear_1.{p}", "mlp.linear_fc1.{p}"),
        Rule("linear_2.{p}", "mlp.linear_fc2.{p}"),
    ]


def internvl_visual_rules(hf_vision_prefix: str = HF_VISION_PREFIX,
                          hf_projector_prefix: str = HF_PROJECTOR_PREFIX,
                          tower_prefix: str = "vision_tower.",
                          projector_prefix: str = "projector.") -> list[Rule]:
    """Tower and projector rules under the given prefixes (the VLM's by default)."""
    return (prefixed(internvit_rules(), hf_vision_prefix, tower_prefix)
            + prefixed(internvl_projector_rules(), hf_projector_prefix, projector_prefix))
