"""HF <-> megatron names of the GLM LLMs (``convert/rules.py`` rules, for the family's HF table).

Names are relative to the LLM on both sides: HF ``Glm4vMoeTextModel`` / ``Glm4vTextModel``
(under ``model.language_model.`` in ``Glm4v*ForConditionalGeneration``) and our megatron
``GPTModel`` (under ``language_model.`` in the VLM); :func:`glm_head_rules` is the top-level
``lm_head``. Apply ``convert.rules.prefixed`` for the whole model.

* GLM-4.5V / GLM-4.5-Air (``Glm4vMoe``): GQA with q/k/v biases fused per query group into
  ``linear_qkv`` (``GQA_Q_K_V``, weight and bias), no q/k norms, dense SwiGLU on the first
  ``first_k_dense_replace`` layers (``gate_proj``/``up_proj``), then sigmoid-routed experts
  (``gate.weight``, fp32 ``gate.e_score_correction_bias`` -> megatron's ``router.expert_bias``)
  and one shared expert. Transformers holds the experts fused in memory (``experts.gate_up_proj
  [E, 2I, H]``); these rules use the per-expert release names (``convert.tables.EXPERT_LAYOUTS``
  splits the fused form).
* GLM-4.1V (``Glm4v``): the same attention, a fused ``mlp.gate_up_proj`` (``[gate; up]``, already
  megatron's ``linear_fc1`` layout), and the sandwich norms ``post_self_attn_layernorm`` /
  ``post_mlp_layernorm`` (ours: ``models/sandwich.py``, same names).
* MTP (GLM-4.5-Air's one next-token layer, HF ``num_nextn_predict_layers``): the names of
  Megatron-Bridge's GLM-4.5 mapping (``src/megatron/bridge/models/glm/glm45_bridge.py``,
  ``mapping_registry``: MTP layer ``i`` is HF layer ``num_hidden_layers + i``, with ``enorm``,
  ``hnorm``, ``eh_proj``, ``shared_head.norm`` -> megatron's ``mtp.layers.i.{enorm, hnorm,
  eh_proj, final_layernorm}`` and its decoder layer -> ``mtp.layers.i.transformer_layer``).
  transformers' GLM models do not build it (they ignore ``layers.46.*`` on load).

Transformer Engine names (``te=``) follow megatron's TE GQA spec: the input norm fused into
``linear_qkv``, the pre-MLP norm into a dense layer's ``linear_fc1``.
"""

from __future__ import annotations

from megatron_vlm.convert.rules import IDENTITY, Rule
from megatron_vlm.convert.transforms import FUSE_GATE_UP, GQA_Q_K_V, PAD_VOCAB


def _attention_rules(hl: str, ol: str, when: str | None) -> list[Rule]:
    ha, oa = hl + "self_attn.", ol + "self_attention."
    return [
        Rule(hl + "input_layernorm.weight", ol + "input_layernorm.weight",
             te=oa + "linear_qkv.layer_norm_weight", when=when),
        Rule(tuple(ha + f"{n}_proj.weight" for n in "qkv"), oa + "linear_qkv.weight",
             transform=GQA_Q_K_V, when=when),
        Rule(tuple(ha + f"{n}_proj.bias" for n in "qkv"), oa + "linear_qkv.bias",
             transform=GQA_Q_K_V, when=when),
        Rule(ha + "o_proj.weight", oa + "linear_proj.weight", when=when),
    ]


def _dense_mlp_rules(hl: str, ol: str, when: str | None, fused_gate_up: bool) -> list[Rule]:
    gate_up = ((hl + "mlp.gate_up_proj.weight",) if fused_gate_up
               else (hl + "mlp.gate_proj.weight", hl + "mlp.up_proj.weight"))
    return [
        Rule(hl + "post_attention_layernorm.weight", ol + "pre_mlp_layernorm.weight",
             te=ol + "mlp.linear_fc1.layer_norm_weight", when=when),
        Rule(gate_up, ol + "mlp.linear_fc1.weight",
             transform=IDENTITY if fused_gate_up else FUSE_GATE_UP, when=when),
        Rule(hl + "mlp.down_proj.weight", ol + "mlp.linear_fc2.weight", when=when),
    ]


def _moe_rules(hl: str, ol: str, when: str | None) -> list[Rule]:
    hm, om = hl + "mlp.", ol + "mlp."
    return [
        Rule(hl + "post_attention_layernorm.weight", ol + "pre_mlp_layernorm.weight", when=when),
        Rule(hm + "gate.weight", om + "router.weight", when=when),
        Rule(hm + "gate.e_score_correction_bias", om + "router.expert_bias", when=when,
             keep_dtype=True),
        Rule((hm + "experts.{E}.gate_proj.weight", hm + "experts.{E}.up_proj.weight"),
             om + "experts.local_experts.{E}.linear_fc1.weight", transform=FUSE_GATE_UP,
             when=when),
        Rule(hm + "experts.{E}.down_proj.weight",
             om + "experts.local_experts.{E}.linear_fc2.weight", when=when),
        Rule((hm + "shared_experts.gate_proj.weight", hm + "shared_experts.up_proj.weight"),
             om + "shared_experts.linear_fc1.weight", transform=FUSE_GATE_UP, when=when),
        Rule(hm + "shared_experts.down_proj.weight", om + "shared_experts.linear_fc2.weight",
             when=when),
    ]


def _sandwich_rules(hl: str, ol: str, when: str | None) -> list[Rule]:
    return [Rule(hl + f"{n}.weight", ol + f"{n}.weight", when=when)
            for n in ("post_self_attn_layernorm", "post_mlp_layernorm")]


def _layer_rules(hl: str, ol: str, *, kind: str | None, moe: bool, sandwich: bool,
                 fused_gate_up: bool) -> list[Rule]:
    """One decoder layer. ``kind`` None: ``{L}`` layers, dense or MoE by index (``when``);
    ``"dense"``/``"moe"``: a fixed layer of that kind (the MTP layer)."""
    rules = _attention_rules(hl, ol, None)
    if sandwich:
        rules += _sandwich_rules(hl, ol, None)
    if kind is None:
        rules += _dense_mlp_rules(hl, ol, "dense" if moe else None, fused_gate_up)
        if moe:
            rules += _moe_rules(hl, ol, "moe")
    elif kind == "moe":
        rules += _moe_rules(hl, ol, None)
    else:
        rules += _dense_mlp_rules(hl, ol, None, fused_gate_up)
    return rules


def glm_llm_rules(*, moe: bool, sandwich: bool = False, fused_gate_up: bool = False,
                  num_layers: int = 0, mtp_num_layers: int = 0) -> list[Rule]:
    """The GLM LLM body (embedding, layers, final norm, MTP layers), LLM-relative names.

    Args:
        moe: GLM-4.5V / Air (dense first layers, then MoE; ``ConvertContext.num_dense_layers``
            tells them apart) or a dense GLM (GLM-4.1V).
        sandwich: GLM-4.1V's post-attention / post-MLP norms.
        fused_gate_up: the dense MLP is one ``gate_up_proj`` (GLM-4.1V) rather than
            ``gate_proj`` + ``up_proj`` (GLM-4.5V's dense layers).
        num_layers: decoder layers (HF ``num_hidden_layers``): MTP layer ``i`` is HF layer
            ``num_layers + i``.
        mtp_num_layers: MTP layers (HF ``num_nextn_predict_layers``).
    """
    rules = [
        Rule("embed_tokens.weight", "embedding.word_embeddings.weight", transform=PAD_VOCAB),
        Rule("norm.weight", "decoder.final_layernorm.weight"),
    ]
    rules += _layer_rules("layers.{L}.", "decoder.layers.{L}.", kind=None, moe=moe,
                          sandwich=sandwich, fused_gate_up=fused_gate_up)
    for i in range(mtp_num_layers):
        hl, ol = f"layers.{num_layers + i}.", f"mtp.layers.{i}."
        rules += [
            Rule(hl + "enorm.weight", ol + "enorm.weight"),
            Rule(hl + "hnorm.weight", ol + "hnorm.weight"),
            Rule(hl + "eh_proj.weight", ol + "eh_proj.weight"),
            Rule(hl + "shared_head.norm.weight", ol + "final_layernorm.weight"),
        ]
        # megatron's MTP layer is a copy of the last decoder layer's spec
        rules += _layer_rules(hl, ol + "transformer_layer.", kind="moe" if moe else "dense",
                              moe=moe, sandwich=sandwich, fused_gate_up=fused_gate_up)
    return rules


def glm_head_rules() -> list[Rule]:
    """The untied output head: HF top-level ``lm_head`` <-> ``output_layer`` (vocab padded)."""
    return [Rule("lm_head.weight", "output_layer.weight", transform=PAD_VOCAB)]
