"""GLM-4.5V / GLM-4.1V HF name-mapping table (``convert_hf.py``, ``convert/rules.py``).

HF names are transformers 5.25's modules (``Glm4vMoeForConditionalGeneration`` /
``Glm4vForConditionalGeneration``: ``model.language_model.*`` the text model, ``model.visual.*``
the vision model with its ``downsample`` and ``merger``, top-level ``lm_head``), which is also
the layout Megatron-Bridge's GLM-4.5V bridge maps
(``NVIDIA-NeMo/Megatron-Bridge@067f987df03b8355b03192d88d70f1709fedf51a``,
``src/megatron/bridge/models/glm_vl/glm_45v_bridge.py``: ``model.language_model.layers.*``,
``model.visual.**``, ``lm_head.weight``; routed experts per expert
``mlp.experts.{E}.{gate,up,down}_proj.weight`` as released, or fused ``experts.gate_up_proj``
/ ``down_proj`` as transformers holds them in memory: ``convert.tables.EXPERT_LAYOUTS`` splits
those on import). Parts:

* LLM: ``families/glm/hf_llm_names.py`` (GQA q/k/v with biases fused per query group, dense
  ``gate_proj``/``up_proj`` for GLM-4.5V's first layers or GLM-4.1V's fused ``gate_up_proj``,
  sigmoid router with its fp32 ``e_score_correction_bias``, shared expert, GLM-4.1V's sandwich
  norms), under ``model.language_model.`` / ``language_model.``;
* MTP (GLM-4.5-Air's next-token layer, HF ``num_nextn_predict_layers``): HF layer
  ``num_hidden_layers + i`` with Megatron-Bridge's GLM-4.5 names
  (``src/megatron/bridge/models/glm/glm45_bridge.py`` at the same commit, ``mapping_registry``:
  ``enorm``, ``hnorm``, ``eh_proj``, ``shared_head.norm`` -> ``mtp.layers.i.{enorm, hnorm,
  eh_proj, final_layernorm}``, its decoder layer -> ``mtp.layers.i.transformer_layer``), here
  under ``model.language_model.`` as the rest of the GLM-4.5V text model;
* tower and projector: ``families/glm/hf_vision_names.py`` (``model.visual.`` -> ``vision_tower.``
  and, for ``downsample`` and ``merger``, ``projector.``).

The table depends on the model (MoE or dense, sandwich norms, MTP layer indices), so the family
declares ``model_rules`` (``convert.importer.table_for``).
"""

from __future__ import annotations

from megatron_vlm.convert.rules import Rule, prefixed
from megatron_vlm.convert.tables import EXPERT_LAYOUTS, Family
from megatron_vlm.families.glm import hf_config
from megatron_vlm.families.glm.hf_llm_names import glm_head_rules, glm_llm_rules
from megatron_vlm.families.glm.hf_vision_names import HF_VISUAL_PREFIX, glm_visual_rules

LLM_PREFIX = "model.language_model."
"""Where ``Glm4v(Moe)ForConditionalGeneration`` keeps its text model."""


def glm_rules(model) -> list[Rule]:
    """The whole table of ``model`` (a GLM ``ModelConfig``; the LLM alone when it has no
    vision)."""
    llm = model.llm
    moe = llm.num_experts is not None
    rules = prefixed(glm_llm_rules(moe=moe, sandwich=llm.sandwich_norms,
                                   fused_gate_up=not moe, num_layers=llm.num_layers,
                                   mtp_num_layers=llm.mtp_num_layers),
                     LLM_PREFIX, "language_model.")
    if llm.untie_embeddings:
        rules += prefixed(glm_head_rules(), "", "language_model.")
    if model.is_vlm:
        rules += glm_visual_rules(HF_VISUAL_PREFIX)
    return rules


def _no_model_rules(q_lora: bool, tied: bool) -> list[Rule]:
    raise ValueError("the GLM table depends on the model config: use convert.importer.table_for "
                     "(Family.model_rules)")


UNREAD_MTP_LAYER = rf"^{LLM_PREFIX.replace('.', r'[.]')}layers[.]46[.]"
"""GLM-4.5-Air's MTP layer (HF layer 46) in a checkpoint whose ``config.json`` names no
``num_nextn_predict_layers``: transformers skips it (``Glm4vMoePreTrainedModel.
_keys_to_ignore_on_load_unexpected``), import carries it unchanged to export. With the field set,
the layer is imported (its keys are then used, never carried)."""

HF_FAMILY = Family(
    "glm4v", hf_config.ARCHITECTURES, alias_passes=(tuple(EXPERT_LAYOUTS),),
    carried=(UNREAD_MTP_LAYER,), model_family="glm", build_rules=_no_model_rules,
    config_from_hf=hf_config.model_from_hf, config_to_hf=hf_config.model_to_hf,
    model_rules=glm_rules,
)
"""The GLM-4.5V / GLM-4.1V conversion table, found by ``convert.tables.family_of`` for either
architecture and by ``conversion_family('glm4v')`` / ``model.family: glm`` on export (the
architecture written follows the model: MoE -> ``Glm4vMoeForConditionalGeneration``)."""
