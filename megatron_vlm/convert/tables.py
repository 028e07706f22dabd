"""One mapping table per model family (SPEC §4), plus the key layouts each family accepts.

HF names are the release checkpoints' (what inference engines load); ours are megatron's local
spec names, with the Transformer Engine spec name in ``te`` where TE fuses a norm into the next
linear (MLA: ``q_layernorm`` -> ``linear_q_up_proj.layer_norm_weight``, ``kv_layernorm`` ->
``linear_kv_up_proj.layer_norm_weight``; dense layers: ``pre_mlp_layernorm`` ->
``mlp.linear_fc1.layer_norm_weight``, megatron-core 0.16.1 ``gpt_layer_specs.py:233-265,496``;
MoE layers keep a separate ``pre_mlp_layernorm``; the ViT's standard TE layer fuses both norms).
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from megatron_vlm.convert.int4 import dequantize_int4
from megatron_vlm.convert.rules import Alias, Rule, Transform, prefixed
from megatron_vlm.convert.transforms import (
    FLAT_POS_TABLE,
    FUSE_GATE_UP,
    PAD_VOCAB,
    ROPE_KV_A_ROWS,
    ROPE_Q_ROWS,
    VIT_Q_K_V,
    VIT_WQKV,
    split_fused_down,
    split_fused_gate_up,
    vision_qkv_from_module,
)

# --- the DeepSeek-V3 / Kimi K2 LLM (DeepseekV3ForCausalLM names) --------------------------------


def llm_rules(q_lora: bool, tied: bool) -> list[Rule]:
    """MLA + DeepSeek-V3 MoE; ``q_lora`` False = Moonlight/Kimi-VL's full ``q_proj``."""
    hl, ol = "model.layers.{L}.", "decoder.layers.{L}."
    ha, oa = hl + "self_attn.", ol + "self_attention."
    rules = [
        Rule("model.embed_tokens.weight", "embedding.word_embeddings.weight",
             transform=PAD_VOCAB),
        Rule("model.norm.weight", "decoder.final_layernorm.weight"),
        Rule(hl + "input_layernorm.weight", ol + "input_layernorm.weight"),
        Rule(hl + "post_attention_layernorm.weight", ol + "pre_mlp_layernorm.weight",
             te=ol + "mlp.linear_fc1.layer_norm_weight", when="dense"),
        Rule(hl + "post_attention_layernorm.weight", ol + "pre_mlp_layernorm.weight",
             when="moe"),
        Rule(ha + "kv_a_proj_with_mqa.weight", oa + "linear_kv_down_proj.weight",
             transform=ROPE_KV_A_ROWS),
        Rule(ha + "kv_a_layernorm.weight", oa + "kv_layernorm.weight",
             te=oa + "linear_kv_up_proj.layer_norm_weight"),
        Rule(ha + "kv_b_proj.weight", oa + "linear_kv_up_proj.weight"),
        Rule(ha + "o_proj.weight", oa + "linear_proj.weight"),
        # dense FFN
        Rule((hl + "mlp.gate_proj.weight", hl + "mlp.up_proj.weight"),
             ol + "mlp.linear_fc1.weight", transform=FUSE_GATE_UP, when="dense"),
        Rule(hl + "mlp.down_proj.weight", ol + "mlp.linear_fc2.weight", when="dense"),
        # MoE: router (+ aux-loss-free bias, fp32 in the release), routed (INT4 in the K2.5 release)
        # and shared experts (bf16)
        Rule(hl + "mlp.gate.weight", ol + "mlp.router.weight", when="moe"),
        Rule(hl + "mlp.gate.e_score_correction_bias", ol + "mlp.router.expert_bias",
             when="moe", keep_dtype=True),
        Rule((hl + "mlp.experts.{E}.gate_proj.weight", hl + "mlp.experts.{E}.up_proj.weight"),
             ol + "mlp.experts.local_experts.{E}.linear_fc1.weight", transform=FUSE_GATE_UP,
             when="moe", int4=True),
        Rule(hl + "mlp.experts.{E}.down_proj.weight",
             ol + "mlp.experts.local_experts.{E}.linear_fc2.weight", when="moe", int4=True),
        Rule((hl + "mlp.shared_experts.gate_proj.weight", hl + "mlp.shared_experts.up_proj.weight"),
             ol + "mlp.shared_experts.linear_fc1.weight", transform=FUSE_GATE_UP, when="moe"),
        Rule(hl + "mlp.shared_experts.down_proj.weight",
             ol + "mlp.shared_experts.linear_fc2.weight", when="moe"),
    ]
    if q_lora:
        rules += [
            Rule(ha + "q_a_proj.weight", oa + "linear_q_down_proj.weight"),
            Rule(ha + "q_a_layernorm.weight", oa + "q_layernorm.weight",
                 te=oa + "linear_q_up_proj.layer_norm_weight"),
            Rule(ha + "q_b_proj.weight", oa + "linear_q_up_proj.weight", transform=ROPE_Q_ROWS),
        ]
    else:
        rules.append(Rule(ha + "q_proj.weight", oa + "linear_q_proj.weight",
                          transform=ROPE_Q_ROWS))
    if not tied:
        rules.append(Rule("lm_head.weight", "output_layer.weight", transform=PAD_VOCAB))
    return rules


# --- MoonViT (release layout, HF prefix ``vision_tower.``) --------------------------------------


def moonvit_rules() -> list[Rule]:
    hb, ob = "encoder.blocks.{L}.", "encoder.layers.{L}."
    return [
        Rule("patch_embed.proj.{p}", "patch_embed.{p}"),
        Rule("patch_embed.pos_emb.weight", "pos_embed.weight"),
        Rule(hb + "norm0.{p}", ob + "input_layernorm.{p}",
             te=ob + "self_attention.linear_qkv.layer_norm_{p}"),
        Rule(hb + "wqkv.{p}", ob + "self_attention.linear_qkv.{p}", transform=VIT_WQKV),
        Rule(hb + "wo.{p}", ob + "self_attention.linear_proj.{p}"),
        Rule(hb + "norm1.{p}", ob + "pre_mlp_layernorm.{p}",
             te=ob + "mlp.linear_fc1.layer_norm_{p}"),
        Rule(hb + "mlp.fc0.{p}", ob + "mlp.linear_fc1.{p}"),
        Rule(hb + "mlp.fc1.{p}", ob + "mlp.linear_fc2.{p}"),
        Rule("encoder.final_layernorm.{p}", "encoder.final_layernorm.{p}"),
    ]


def projector_rules(names: tuple[str, str, str]) -> list[Rule]:
    """``names`` = HF (pre-norm, first linear, second linear)."""
    norm, fc1, fc2 = names
    return [
        Rule(norm + ".{p}", "pre_norm.{p}"),
        Rule(fc1 + ".{p}", "mlp.linear_fc1.{p}"),
        Rule(fc2 + ".{p}", "mlp.linear_fc2.{p}"),
    ]


K25_PROJECTOR = ("mm_projector.pre_norm", "mm_projector.proj.0", "mm_projector.proj.2")
KIMI_VL_PROJECTOR = ("multi_modal_projector.pre_norm", "multi_modal_projector.linear_1",
                     "multi_modal_projector.linear_2")


# --- SigLIP (SiglipVisionModel, transformers 5.23 names) -> MoonViT ------------------------------


def siglip_rules(pos_table: Transform = FLAT_POS_TABLE) -> list[Rule]:
    """SigLIP's vision tower names -> our ViT's; ``pos_table``: how the flat ``[side^2, d]`` table
    maps onto ours (MoonViT's ``[h, w, d]``: ``FLAT_POS_TABLE``; Keye keeps it flat)."""
    hl, ol = "encoder.layers.{L}.", "encoder.layers.{L}."
    return [
        Rule("embeddings.patch_embedding.{p}", "patch_embed.{p}"),
        Rule("embeddings.position_embedding.weight", "pos_embed.weight", transform=pos_table),
        Rule(hl + "layer_norm1.{p}", ol + "input_layernorm.{p}",
             te=ol + "self_attention.linear_qkv.layer_norm_{p}"),
        Rule(tuple(hl + f"self_attn.{n}_proj.{{p}}" for n in "qkv"),
             ol + "self_attention.linear_qkv.{p}", transform=VIT_Q_K_V),
        Rule(hl + "self_attn.out_proj.{p}", ol + "self_attention.linear_proj.{p}"),
        Rule(hl + "layer_norm2.{p}", ol + "pre_mlp_layernorm.{p}",
             te=ol + "mlp.linear_fc1.layer_norm_{p}"),
        Rule(hl + "mlp.fc1.{p}", ol + "mlp.linear_fc1.{p}"),
        Rule(hl + "mlp.fc2.{p}", ol + "mlp.linear_fc2.{p}"),
        Rule("post_layernorm.{p}", "encoder.final_layernorm.{p}"),
    ]


# --- other key layouts transformers loads -> the release layout (import only) -------------------

_IN_MEMORY_VISION = [
    (f"model.vision_tower.layers.{{L}}.{a}.{{p}}", f"vision_tower.encoder.blocks.{{L}}.{b}.{{p}}")
    for a, b in (("norm1", "norm0"), ("norm2", "norm1"), ("attn.proj", "wo"),
                 ("mlp.fc1", "mlp.fc0"), ("mlp.fc2", "mlp.fc1"))
]

# Pass 1: names. ``save_pretrained`` (5.23) writes ``language_model.model.blocks.N``,
# ``vision_tower.encoder.patch_embed.proj`` and ``model.mm_projector.pre_norm``; the in-memory
# module uses ``model.language_model.*``, ``lm_head``, ``model.vision_tower.layers.N.*`` with
# separate rotate-half q/k/v, and ``model.mm_projector.{in,out}_proj``.
K25_RENAMES = [
    Alias("language_model.model.blocks.{rest}", "language_model.model.layers.{rest}"),
    Alias("model.language_model.{rest}", "language_model.model.{rest}"),
    Alias("lm_head.weight", "language_model.lm_head.weight"),
    Alias("vision_tower.encoder.patch_embed.{rest}", "vision_tower.patch_embed.{rest}"),
    Alias("model.mm_projector.pre_norm.{p}", "mm_projector.pre_norm.{p}"),
    Alias("model.mm_projector.in_proj.{p}", "mm_projector.proj.0.{p}"),
    Alias("model.mm_projector.out_proj.{p}", "mm_projector.proj.2.{p}"),
    Alias("model.vision_tower.patch_embed.proj.{p}", "vision_tower.patch_embed.proj.{p}"),
    Alias("model.vision_tower.patch_embed.pos_emb.position_embeddings",
          "vision_tower.patch_embed.pos_emb.weight"),
    Alias("model.vision_tower.final_layernorm.{p}", "vision_tower.encoder.final_layernorm.{p}"),
    *(Alias(a, b) for a, b in _IN_MEMORY_VISION),
    Alias(tuple(f"model.vision_tower.layers.{{L}}.attn.{n}_proj.{{p}}" for n in "qkv"),
          "vision_tower.encoder.blocks.{L}.wqkv.{p}", fn=vision_qkv_from_module),
]

# Pass 2: tensors. transformers' fused in-memory experts, and K2.5's INT4 routed experts.
EXPERT_LAYOUTS = [
    Alias("{pre}mlp.experts.gate_up_proj",
          ("{pre}mlp.experts.{E}.gate_proj.weight", "{pre}mlp.experts.{E}.up_proj.weight"),
          fn=split_fused_gate_up, expand="E"),
    Alias("{pre}mlp.experts.down_proj", "{pre}mlp.experts.{E}.down_proj.weight",
          fn=split_fused_down, expand="E"),
    Alias(("{pre}.weight_packed", "{pre}.weight_scale", "{pre}.weight_shape"), "{pre}.weight",
          fn=dequantize_int4),
]

SIGLIP_RENAMES = [Alias("vision_model.{rest}", "{rest}")]


@dataclass(frozen=True)
class Family:
    """A model family: what its ``config.json`` says, its tables and accepted key layouts.

    The Kimi / DeepSeek / SigLIP tables live in this module; another model family declares its
    own in ``megatron_vlm/families/<name>/hf_table.py`` as ``HF_FAMILY`` (found through the
    family registry by :func:`family_of` / :func:`conversion_family`), with its rules and its
    ``config.json`` mapping as the callables below.
    """

    name: str
    architectures: tuple[str, ...]
    alias_passes: tuple[tuple[Alias, ...], ...]
    skipped: tuple[str, ...] = ()
    """Regexes of HF keys we know and deliberately drop (counted and logged)."""
    carried: tuple[str, ...] = ()
    """Regexes of HF keys the release ships but the model does not use: import keeps them
    beside the checkpoint (``hf_carry.safetensors``), export writes them back unchanged."""
    model_family: str = "kimi"
    """``model.family`` of the models this table converts (the export default for them)."""
    build_rules: Callable[[bool, bool], list[Rule]] | None = None
    """``(q_lora, tied) -> rules`` of a family declared outside this module."""
    config_from_hf: Callable[[dict[str, Any], str], Any] | None = None
    """``(config.json, params_dtype) -> (ModelConfig, rope_interleave)`` (None: Kimi's)."""
    config_to_hf: Callable[..., dict[str, Any]] | None = None
    """``(model, dtype, token_ids) -> config.json`` (None: Kimi's ``hf_config.model_to_hf``)."""
    carried_defaults: Callable[[Any], dict[str, tuple[int, ...]]] | None = None
    """``model -> {HF key: shape}``: carried keys an export must write even when the
    checkpoint has no carried copy (a model trained here): written as zeros."""
    model_rules: Callable[[Any], list[Rule]] | None = None
    """``model -> rules``, for a table that depends on more of ``ModelConfig`` than ``q_lora``
    and ``tied`` (GLM: MoE or dense layers, sandwich norms, MTP layers after the last layer);
    :func:`~megatron_vlm.convert.importer.table_for` prefers it to :meth:`rules`."""

    def rules(self, q_lora: bool, tied: bool) -> list[Rule]:
        if self.build_rules is not None:
            return self.build_rules(q_lora, tied)
        if self.name == "deepseek_v3":
            return llm_rules(q_lora, tied)
        if self.name == "siglip":
            return siglip_rules()
        projector = K25_PROJECTOR if self.name == "kimi_k25" else KIMI_VL_PROJECTOR
        return (prefixed(llm_rules(q_lora, tied), "language_model.", "language_model.")
                + prefixed(moonvit_rules(), "vision_tower.", "vision_tower.")
                + prefixed(projector_rules(projector), "", "projector."))


FAMILIES = {
    f.name: f
    for f in (
        Family("kimi_k25", ("Kimi_K25ForConditionalGeneration", "KimiK25ForConditionalGeneration"),
               (tuple(K25_RENAMES), tuple(EXPERT_LAYOUTS))),
        Family("kimi_vl", ("KimiVLForConditionalGeneration",), (tuple(EXPERT_LAYOUTS),)),
        Family("deepseek_v3", ("DeepseekV3ForCausalLM",),
               (tuple(EXPERT_LAYOUTS),)),
        # SigLIP's attention-pooling head (SiglipModel: text tower too) has no counterpart.
        Family("siglip", ("SiglipVisionModel", "SiglipModel"), (tuple(SIGLIP_RENAMES),),
               skipped=(r"^head\.", r"^text_model\.", r"^logit_(scale|bias)$")),
    )
}


def family_tables() -> dict[str, Family]:
    """Every conversion table: this module's and each registered model family's ``HF_FAMILY``
    (its package's ``hf_table`` module, when it has one; ``config/families.py``)."""
    from megatron_vlm.config.families import FAMILY_MODULES, family_module

    tables = dict(FAMILIES)
    for name in sorted(FAMILY_MODULES):
        module = family_module(name) + ".hf_table"
        try:
            found = importlib.util.find_spec(module) is not None
        except ModuleNotFoundError:
            found = False
        if not found:
            continue
        family = getattr(importlib.import_module(module), "HF_FAMILY", None)
        if not isinstance(family, Family):
            raise ValueError(f"{module} declares no HF_FAMILY (a convert.tables.Family)")
        if family.name in tables and tables[family.name] is not family:
            raise ValueError(f"{module}.HF_FAMILY is named {family.name!r}, which is taken")
        tables[family.name] = family
    return tables


def conversion_family(name: str) -> Family:
    """The conversion table ``name`` (``--family`` of an export)."""
    tables = family_tables()
    if name not in tables:
        from megatron_vlm.convert.rules import ConversionError

        raise ConversionError(f"export family {name!r} is not known; choose one of "
                              f"{sorted(n for n in tables if n != 'siglip')}")
    return tables[name]


def export_family_for(model_family: str, is_vlm: bool) -> str:
    """The default export table of a ``model.family``: Kimi's VLM -> ``kimi_k25``, its LLM
    alone -> ``deepseek_v3``; another family's own table."""
    if model_family == "kimi":
        return "kimi_k25" if is_vlm else "deepseek_v3"
    names = [f.name for f in family_tables().values() if f.model_family == model_family]
    if not names:
        from megatron_vlm.convert.rules import ConversionError

        raise ConversionError(f"model.family={model_family!r} has no HF table (an hf_table "
                              "module declaring HF_FAMILY in its package)")
    return names[0]


def family_of(architecture: str) -> Family:
    tables = family_tables()
    for family in tables.values():
        if architecture in family.architectures:
            return family
    known = sorted(a for f in tables.values() for a in f.architectures)
    from megatron_vlm.convert.rules import ConversionError

    raise ConversionError(f"unknown architecture {architecture!r}; supported: {known}")
