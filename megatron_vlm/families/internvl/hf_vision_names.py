"""InternVL3.5 vision tower and projector: HF names <-> ours (``convert/rules.py``).

HF names are transformers 5.25's ``InternVLModel`` modules (the ``-HF`` checkpoints' layout):
the tower under ``model.vision_tower.`` (:data:`HF_VISION_PREFIX`), ``mlp1`` under
``model.multi_modal_projector.`` (:data:`HF_PROJECTOR_PREFIX`). The original remote-code
checkpoints (``OpenGVLab/InternVL3_5-*`` without ``-HF``: ``vision_model.``, fused ``attn.qkv``
``[q; k; v]``, ``ls1``/``ls2``, ``mlp1.{0,1,3}``) are :func:`internvl_remote_visual_rules`, the
renames transformers' ``convert_internvl_weights_to_hf.py`` applies (read in the transformers
repository; the script is not in the wheel).

* separate ``q_proj``/``k_proj``/``v_proj`` -> megatron's per-head ``linear_qkv``
  (``VIT_Q_K_V``, needs ``ConvertContext.vision_num_heads``; no RoPE, so no row permutation);
  their biases only for 300M (6B has none, and ours then has no ``linear_qkv.bias``);
* ``lambda_1`` / ``lambda_2`` -> the layer scales of the layer's bdas;
* 6B's whole-width ``q_norm`` / ``k_norm`` ``[hidden]`` -> the attention's ``q_norm`` / ``k_norm``
  (same head-major order);
* CLS token and table keep HF's shapes.

``te=`` names: megatron's Transformer Engine layer fuses the block norms into the next linear
(LayerNorm: weight and bias; RMSNorm: weight only, the ``{p}`` binds what exists).
"""

from __future__ import annotations

from megatron_vlm.convert.rules import Rule, prefixed
from megatron_vlm.convert.transforms import VIT_Q_K_V, VIT_WQKV

HF_VISION_PREFIX = "model.vision_tower."
"""Where ``InternVLForConditionalGeneration`` keeps its vision tower."""
HF_PROJECTOR_PREFIX = "model.multi_modal_projector."
"""Where it keeps ``mlp1``."""
REMOTE_VISION_PREFIX = "vision_model."
"""Where the remote-code ``InternVLChatModel`` keeps its tower (``mlp1.`` at the top level)."""


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
        Rule(attn + "q_norm.weight", ol + "self_attention.q_norm.weight"),
        Rule(attn + "k_norm.weight", ol + "self_attention.k_norm.weight"),
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


def internvit_remote_rules() -> list[Rule]:
    """The tower in the remote-code layout (``InternVisionModel``) <-> ours."""
    hl, ol = "encoder.layers.{L}.", "encoder.layers.{L}."
    return [
        Rule("embeddings.patch_embedding.{p}", "patch_embed.{p}"),
        Rule("embeddings.class_embedding", "pos_embed.cls_token"),
        Rule("embeddings.position_embedding", "pos_embed.position_embeddings"),
        Rule(hl + "norm1.{p}", ol + "input_layernorm.{p}",
             te=ol + "self_attention.linear_qkv.layer_norm_{p}"),
        Rule(hl + "attn.qkv.{p}", ol + "self_attention.linear_qkv.{p}", transform=VIT_WQKV),
        Rule(hl + "attn.q_norm.weight", ol + "self_attention.q_norm.weight"),
        Rule(hl + "attn.k_norm.weight", ol + "self_attention.k_norm.weight"),
        Rule(hl + "attn.proj.{p}", ol + "self_attention.linear_proj.{p}"),
        Rule(hl + "ls1", ol + "self_attn_bda.weight"),
        Rule(hl + "norm2.{p}", ol + "pre_mlp_layernorm.{p}",
             te=ol + "mlp.linear_fc1.layer_norm_{p}"),
        Rule(hl + "mlp.fc1.{p}", ol + "mlp.linear_fc1.{p}"),
        Rule(hl + "mlp.fc2.{p}", ol + "mlp.linear_fc2.{p}"),
        Rule(hl + "ls2", ol + "mlp_bda.weight"),
    ]


def internvl_remote_visual_rules(tower_prefix: str = "vision_tower.",
                                 projector_prefix: str = "projector.") -> list[Rule]:
    """Tower (``vision_model.``) and ``mlp1`` (``mlp1.0`` LayerNorm, ``mlp1.1`` / ``mlp1.3``
    linears) of a remote-code checkpoint <-> ours under the given prefixes."""
    projector = [Rule("mlp1.0.{p}", "pre_norm.{p}"), Rule("mlp1.1.{p}", "mlp.linear_fc1.{p}"),
                 Rule("mlp1.3.{p}", "mlp.linear_fc2.{p}")]
    return (prefixed(internvit_remote_rules(), REMOTE_VISION_PREFIX, tower_prefix)
            + prefixed(projector, "", projector_prefix))
