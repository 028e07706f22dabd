"""InternVL3.5 HF name-mapping table (``convert_hf.py``, ``convert/rules.py``).

HF names are the release layout of the ``OpenGVLab/InternVL3_5-*-HF`` checkpoints, which is also
what transformers 5.25's ``save_pretrained`` writes for ``InternVLForConditionalGeneration``
(it reverses its ``llava`` checkpoint conversion mapping): ``language_model.model.*`` the text
model (Qwen3, Qwen3-MoE or GPT-OSS), ``language_model.lm_head.weight`` (absent when
``tie_word_embeddings``), ``vision_tower.*`` InternViT, ``multi_modal_projector.*`` ``mlp1``.
Export writes these names. Parts:

* LLM: ``families/internvl/hf_llm_names.py`` (Qwen3 / Qwen3-MoE per-expert release names /
  GPT-OSS per-expert slices), under ``language_model.model.`` -> ``language_model.``;
* tower and projector: ``families/internvl/hf_vision_names.py``.

Other layouts accepted on import (``alias_passes``, in order):

1. transformers' in-memory names (``model.language_model.*``, ``lm_head``,
   ``model.vision_tower.*``, ``model.multi_modal_projector.*``: a ``state_dict()`` saved as is)
   renamed to the release's (:data:`IN_MEMORY_NAMES`);
2. GPT-OSS's fused per-layer experts ``experts.gate_up_proj [E, H, 2I]`` + ``gate_up_proj_bias``
   and ``down_proj`` + ``down_proj_bias`` (its release's and transformers' layout), recognised by
   their bias, which Qwen3-MoE's experts lack, cut into per-expert slices
   (:data:`GPT_OSS_FUSED_EXPERTS`);
3. transformers' fused Qwen3-MoE experts (``gate_up_proj [E, 2I, H]``, ``down_proj``, no bias)
   split as for every MoE family (``convert.tables.EXPERT_LAYOUTS``).

Export writes per-expert names: the Qwen3-MoE release layout; for GPT-OSS those are the slices,
which transformers does not load (re-fusing on export is not done).

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

LLM_PREFIX = "language_model.model."
"""Where the release keeps the text model (in memory: ``model.language_model.``)."""
HEAD_PREFIX = "language_model."
"""The release's ``language_model.lm_head.weight`` (in memory: ``lm_head.weight``)."""
VISION_PREFIX = "vision_tower."
PROJECTOR_PREFIX = "multi_modal_projector."

IN_MEMORY_NAMES = [
    Alias("model.language_model.{rest}", LLM_PREFIX + "{rest}"),
    Alias("lm_head.{rest}", HEAD_PREFIX + "lm_head.{rest}"),
    Alias("model.vision_tower.{rest}", VISION_PREFIX + "{rest}"),
    Alias("model.multi_modal_projector.{rest}", PROJECTOR_PREFIX + "{rest}"),
]
"""transformers' in-memory names -> the release's (transformers 5.25 ``conversion_mapping``'s
``llava`` renames, reversed)."""


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
        rules += prefixed(internvl_head_rules(), HEAD_PREFIX, "language_model.")
    if model.is_vlm:
        rules += internvl_visual_rules(VISION_PREFIX, PROJECTOR_PREFIX)
    return rules


def _no_model_rules(q_lora: bool, tied: bool) -> list[Rule]:
    raise ValueError("the InternVL table depends on the model config: use "
                     "convert.importer.table_for (Family.model_rules)")


HF_FAMILY = Family(
    "internvl", (hf_config.ARCHITECTURE,),
    alias_passes=(tuple(IN_MEMORY_NAMES), tuple(GPT_OSS_FUSED_EXPERTS), tuple(EXPERT_LAYOUTS)),
    model_family="internvl", build_rules=_no_model_rules,
    config_from_hf=hf_config.model_from_hf, config_to_hf=hf_config.model_to_hf,
    model_rules=internvl_rules,
)
"""The InternVL3.5 conversion table, found by ``convert.tables.family_of`` for
``InternVLForConditionalGeneration`` and by ``conversion_family('internvl')`` /
``model.family: internvl`` on export."""
