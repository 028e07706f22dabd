"""InternVL3.5 HF name-mapping table (``convert_hf.py``, ``convert/rules.py``).

HF names are transformers 5.25's ``InternVLForConditionalGeneration`` (the
``OpenGVLab/InternVL3_5-*-HF`` checkpoints): ``model.language_model.*`` the text model
(Qwen3, Qwen3-MoE or GPT-OSS, headless), ``model.vision_tower.*`` InternViT,
``model.multi_modal_projector.*`` ``mlp1``, top-level ``lm_head`` (absent when
``tie_word_embeddings``). Parts:

* LLM: ``families/internvl/hf_llm_names.py`` (Qwen3 / Qwen3-MoE per-expert release names /
  GPT-OSS per-expert slices), under ``model.language_model.`` -> ``language_model.``;
* tower and projector: ``families/internvl/hf_vision_names.py``.

Fused expert layouts accepted on import (``alias_passes``, in order): GPT-OSS's per-layer
``experts.gate_up_proj [E, H, 2I]`` + ``gate_up_proj_bias`` and ``down_proj`` + ``down_proj_bias``
(the release's and transformers' layout) are recognised by their bias, which Qwen3-MoE's experts
lack, and cut into per-expert slices first (:data:`GPT_OSS_FUSED_EXPERTS`); then
transformers' fused Qwen3-MoE experts (``gate_up_proj [E, 2I, H]``, ``down_proj``, no bias;
what its ``save_pretrained`` writes) are split as for every MoE family
(``convert.tables.EXPERT_LAYOUTS``). Export writes the per-expert names: the Qwen3-MoE release
layout; for GPT-OSS those are the slices, which transformers does not load (re-fusing on export
is not done).

The table depends on the text model (dense, MoE pattern, GPT-OSS), so the family declares
``model_rules`` (``convert.importer.table_for``).
"""

from __future__ import annotations

from megatron_vlm.convert.rules import Alias, Rule, prefixed
from megatron_vlm.convert.tables import EXPERT_LAYOUTS, Family
from megatron_vlm.families.internvl import hf_config
from megatron_vlm.families.internvl.hf_llm_names import (
    gpt_oss_llm_rules,
    internvl_head_rules,
    qwen3_llm_rules,
    qwen3_moe_llm_rules,
)
from megatron_vlm.families.internvl.hf_vision_names import internvl_visual_rules

LLM_PREFIX = "model.language_model."
"""Where ``InternVLForConditionalGeneration`` keeps its text model."""


def _expert_pair(ts, ctx, e: int):
    return [ts[0][e], ts[1][e]]


GPT_OSS_FUSED_EXPERTS = [
    Alias((f"{{pre}}mlp.experts.{name}_bias", f"{{pre}}mlp.experts.{name}"),
          (f"{{pre}}mlp.experts.{{E}}.{name}_bias", f"{{pre}}mlp.experts.{{E}}.{name}"),
          fn=_expert_pair, expand="E")
    for name in ("gate_up_proj", "down_proj")
]
"""GPT-OSS's fused per-layer experts (weight + bias, matched on the bias) -> the per-expert
slices of ``hf_llm_names.gpt_oss_llm_rules``."""


def llm_rules(llm) -> list[Rule]:
    """The text model's rules (LLM-relative names) for our ``model.llm``."""
    kind = hf_config.text_kind(llm)
    if kind == "gpt_oss":
        return gpt_oss_llm_rules()
    if kind == "qwen3_moe":
        pattern = llm.moe_layer_pattern or [0] * llm.num_dense_layers + [1] * (
            llm.num_layers - llm.num_dense_layers)
        return qwen3_moe_llm_rules(pattern)
    return qwen3_llm_rules()


def internvl_rules(model) -> list[Rule]:
    """The whole table of ``model`` (an InternVL ``ModelConfig``; the LLM alone when it has no
    vision)."""
    rules = prefixed(llm_rules(model.llm), LLM_PREFIX, "language_model.")
    if model.llm.untie_embeddings:
        rules += prefixed(internvl_head_rules(), "", "language_model.")
    if model.is_vlm:
        rules += internvl_visual_rules()
    return rules


def _no_model_rules(q_lora: bool, tied: bool) -> list[Rule]:
    raise ValueError("the InternVL table depends on the model config: use "
                     "convert.importer.table_for (Family.model_rules)")


HF_FAMILY = Family(
    "internvl", (hf_config.ARCHITECTURE,),
    alias_passes=(tuple(GPT_OSS_FUSED_EXPERTS), tuple(EXPERT_LAYOUTS)),
    model_family="internvl", build_rules=_no_model_rules,
    config_from_hf=hf_config.model_from_hf, config_to_hf=hf_config.model_to_hf,
    model_rules=internvl_rules,
)
"""The InternVL3.5 conversion table, found by ``convert.tables.family_of`` for
``InternVLForConditionalGeneration`` and by ``conversion_family('internvl')`` /
``model.family: internvl`` on export."""
