"""Keye-VL 1.5's HF name-mapping table (``convert_hf.py import/export``, ``convert/rules.py``).

The released layout (``Kwai-Keye/Keye-VL-1_5-8B``), as the public loaders name it -- vLLM
``vllm/model_executor/models/keye.py`` (``BaseKeyeModule.hf_to_vllm_mapper``: ``model.`` and
``lm_head.`` are the Qwen3 LLM; ``visual`` = ``KeyeSiglipVisionModel`` with its
``vision_model.{embeddings,encoder,post_layernorm}``; ``mlp_AR`` the projector) and
``keye_vl1_5.py`` (``KeyeVL1_5Projector``: ``pre_norm``, ``linear_1``, ``linear_2``), and the HF
port's ``_checkpoint_conversion_mapping`` (``^visual``, ``^mlp_AR``, ``^model``) -- with the
committed key list ``tests/fixtures/keye_vl_1_5_keys.txt`` (its header names the commits):

* LLM (Qwen3, ``model.`` -> ours ``language_model.``): q/k/v fused per query group into
  megatron's ``linear_qkv`` (``transforms.GQA_Q_K_V``), gate/up into ``linear_fc1``, per-head
  ``q_norm``/``k_norm``, vocabulary padded to megatron's multiple;
* tower (SigLIP names, ``visual.vision_model.`` -> ``vision_tower.``): q/k/v fused per head
  (``VIT_Q_K_V``, as ``siglip_init.py`` does), the ``[27*27, d]`` table as is;
* merger (``mlp_AR.`` -> ``projector.``).

``embeddings.packing_position_embedding`` (``[32768, d]``) is in the release and in vLLM's
module, but Keye always interpolates the 27x27 table instead (``interpolate_pos_encoding=True``),
so our tower has no such parameter: import keeps it (with any SigLIP ``head.*``) in
``hf_carry.safetensors`` beside the checkpoint and export writes it back unchanged (bit-identical
round trip); a checkpoint without that file (a model trained here) exports zeros, because
vLLM's loader requires every parameter of its module.
"""

from __future__ import annotations

import re

from megatron_vlm.convert.rules import IDENTITY, Rule, prefixed
from megatron_vlm.convert.tables import Family, siglip_rules
from megatron_vlm.convert.transforms import FUSE_GATE_UP, GQA_Q_K_V, PAD_VOCAB
from megatron_vlm.families.keye import hf_config

LLM_PREFIX = "model."
VISION_PREFIX = "visual.vision_model."
MERGER_PREFIX = "mlp_AR."
PACKING_POSITION_KEY = VISION_PREFIX + "embeddings.packing_position_embedding.weight"
PACKING_POSITIONS = 32768
"""Rows of ``packing_position_embedding`` (vLLM ``KeyeVisionEmbeddings``: ``nn.Embedding(32768,
hidden)``)."""


def qwen3_rules() -> list[Rule]:
    """Qwen3 (``Qwen3ForCausalLM`` names, no ``model.`` prefix) <-> megatron's GQA GPTModel."""
    hl, ol = "layers.{L}.", "decoder.layers.{L}."
    ha, oa = hl + "self_attn.", ol + "self_attention."
    return [
        Rule("embed_tokens.weight", "embedding.word_embeddings.weight", transform=PAD_VOCAB),
        Rule("norm.weight", "decoder.final_layernorm.weight"),
        Rule(hl + "input_layernorm.weight", ol + "input_layernorm.weight",
             te=oa + "linear_qkv.layer_norm_weight"),
        Rule(tuple(ha + f"{n}_proj.weight" for n in "qkv"), oa + "linear_qkv.weight",
             transform=GQA_Q_K_V),
        Rule(ha + "o_proj.weight", oa + "linear_proj.weight"),
        Rule(ha + "q_norm.weight", oa + "q_layernorm.weight"),
        Rule(ha + "k_norm.weight", oa + "k_layernorm.weight"),
        Rule(hl + "post_attention_layernorm.weight", ol + "pre_mlp_layernorm.weight",
             te=ol + "mlp.linear_fc1.layer_norm_weight"),
        Rule((hl + "mlp.gate_proj.weight", hl + "mlp.up_proj.weight"),
             ol + "mlp.linear_fc1.weight", transform=FUSE_GATE_UP),
        Rule(hl + "mlp.down_proj.weight", ol + "mlp.linear_fc2.weight"),
    ]


def keye_vision_rules() -> list[Rule]:
    """The tower (under ``visual.vision_model.`` / ``vision_tower.``): SigLIP's names, the
    position table kept flat (``[27*27, d]``, as the released checkpoint stores it)."""
    return siglip_rules(pos_table=IDENTITY)


def keye_merger_rules() -> list[Rule]:
    """``mlp_AR`` (LayerNorm over the merged row, two linears) <-> our ``KeyeMerger``."""
    return [
        Rule("pre_norm.{p}", "pre_norm.{p}"),
        Rule("linear_1.{p}", "mlp.linear_fc1.{p}"),
        Rule("linear_2.{p}", "mlp.linear_fc2.{p}"),
    ]


def keye_rules(q_lora: bool, tied: bool) -> list[Rule]:
    """The whole table (``q_lora`` does not apply: Qwen3 has no MLA)."""
    del q_lora
    rules = prefixed(qwen3_rules(), LLM_PREFIX, "language_model.")
    if not tied:
        rules.append(Rule("lm_head.weight", "language_model.output_layer.weight",
                          transform=PAD_VOCAB))
    return (rules + prefixed(keye_vision_rules(), VISION_PREFIX, "vision_tower.")
            + prefixed(keye_merger_rules(), MERGER_PREFIX, "projector."))


def carried_defaults(model) -> dict[str, tuple[int, ...]]:
    """Carried keys an export writes (as zeros) when it has no carried copy."""
    return {PACKING_POSITION_KEY: (PACKING_POSITIONS, model.vision.hidden_size)}


HF_FAMILY = Family(
    "keye_vl_1_5", (hf_config.ARCHITECTURE,), alias_passes=(),
    carried=(rf"^{re.escape(PACKING_POSITION_KEY)}$", rf"^{re.escape(VISION_PREFIX)}head\."),
    model_family="keye", build_rules=keye_rules, config_from_hf=hf_config.model_from_hf,
    config_to_hf=hf_config.model_to_hf, carried_defaults=carried_defaults,
)
"""The Keye-VL 1.5 conversion table, found by ``convert.tables.family_of`` for its
architecture and by ``conversion_family('keye_vl_1_5')`` / ``model.family: keye`` on export."""
