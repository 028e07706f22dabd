"""HF <-> megatron names of InternVL3.5's LLMs (``convert/rules.py`` rules, for the family's HF
table).

Names are relative to the LLM on both sides: HF ``Qwen3Model`` / ``Qwen3MoeModel`` /
``GptOssModel`` (``model.`` in ``*ForCausalLM``, ``model.language_model.`` in
``InternVLForConditionalGeneration``) and our megatron ``GPTModel`` (``language_model.`` in the
VLM); :func:`internvl_head_rules` is the top-level ``lm_head``. Apply ``convert.rules.prefixed``
for the whole model.

* Qwen3 (InternVL3.5-1B ... 14B, 8B = Qwen3-8B): Keye's Qwen3 rules (``families/keye``).
* Qwen3-MoE (30B-A3B, 241B-A28B): Qwen3's attention (q/k/v fused per query group into
  ``linear_qkv``, per-head ``q_norm``/``k_norm``, no biases); MoE layers have a softmax router
  ``mlp.gate.weight`` (no bias, no expert bias) and routed experts only (no shared expert);
  layers in HF ``mlp_only_layers`` or off ``decoder_sparse_step`` are dense SwiGLU MLPs
  (``mlp.gate_proj``/``up_proj``/``down_proj``). transformers 5.25 holds the experts fused in
  memory (``experts.gate_up_proj [E, 2I, H]``); these rules use the per-expert release names
  (``experts.{E}.gate_proj.weight`` ...), as the GLM rules do.
* GPT-OSS (20B-A4B): GQA with q/k/v/o biases and per-head ``sinks`` (ours: the core
  attention's ``softmax_offset``, megatron's name for TE and local), no q/k norms; every layer
  MoE with a biased router ``mlp.router`` and biased experts whose ``gate_up_proj`` is
  transposed (``x @ W``, ``[H, 2I]``) with gate and up interleaved (columns ``0::2`` gate,
  ``1::2`` up): ours is megatron's ``[gate; up]`` rows. transformers (and the bf16 release)
  hold them fused per layer (``experts.gate_up_proj [E, H, 2I]``, ``gate_up_proj_bias [E,
  2I]``, ``down_proj [E, I, H]``, ``down_proj_bias [E, H]``); the rules name one expert's slice
  ``experts.{E}.<name>`` and :data:`GPT_OSS_EXPERT_LAYOUTS` splits the fused tensors on import.

Transformer Engine names (``te=``) follow megatron's TE GQA spec: the input norm fused into
``linear_qkv``, a dense layer's pre-MLP norm into its ``linear_fc1``.
"""

from __future__ import annotations

import torch
from torch import Tensor

from megatron_vlm.convert.rules import Alias, ConvertContext, Rule, Transform
from megatron_vlm.convert.transforms import FUSE_GATE_UP, GQA_Q_K_V, PAD_VOCAB
from megatron_vlm.families.keye.hf_table import qwen3_rules


def qwen3_moe_layer_pattern(num_layers: int, decoder_sparse_step: int = 1,
                            mlp_only_layers: list[int] | None = None) -> list[int]:
    """``model.llm.moe_layer_pattern`` of a Qwen3-MoE config: layer ``i`` is MoE (1) iff it is
    not in ``mlp_only_layers`` and ``(i + 1) % decoder_sparse_step == 0``
    (``Qwen3MoeDecoderLayer``), else dense (0)."""
    if decoder_sparse_step < 1:
        raise ValueError(f"decoder_sparse_step={decoder_sparse_step} must be >= 1")
    skip = set(mlp_only_layers or ())
    return [int(i not in skip and (i + 1) % decoder_sparse_step == 0) for i in range(num_layers)]


def _qwen3_attention_rules(hl: str, ol: str) -> list[Rule]:
    ha, oa = hl + "self_attn.", ol + "self_attention."
    return [
        Rule(hl + "input_layernorm.weight", ol + "input_layernorm.weight",
             te=oa + "linear_qkv.layer_norm_weight"),
        Rule(tuple(ha + f"{n}_proj.weight" for n in "qkv"), oa + "linear_qkv.weight",
             transform=GQA_Q_K_V),
        Rule(ha + "o_proj.weight", oa + "linear_proj.weight"),
        Rule(ha + "q_norm.weight", oa + "q_layernorm.weight"),
        Rule(ha + "k_norm.weight", oa + "k_layernorm.weight"),
    ]


def _dense_mlp_rules(hl: str, ol: str) -> list[Rule]:
    return [
        Rule(hl + "post_attention_layernorm.weight", ol + "pre_mlp_layernorm.weight",
             te=ol + "mlp.linear_fc1.layer_norm_weight"),
        Rule((hl + "mlp.gate_proj.weight", hl + "mlp.up_proj.weight"),
             ol + "mlp.linear_fc1.weight", transform=FUSE_GATE_UP),
        Rule(hl + "mlp.down_proj.weight", ol + "mlp.linear_fc2.weight"),
    ]


def _qwen3_moe_mlp_rules(hl: str, ol: str) -> list[Rule]:
    hm, om = hl + "mlp.", ol + "mlp."
    return [
        Rule(hl + "post_attention_layernorm.weight", ol + "pre_mlp_layernorm.weight"),
        Rule(hm + "gate.weight", om + "router.weight"),
        Rule((hm + "experts.{E}.gate_proj.weight", hm + "experts.{E}.up_proj.weight"),
             om + "experts.local_experts.{E}.linear_fc1.weight", transform=FUSE_GATE_UP),
        Rule(hm + "experts.{E}.down_proj.weight",
             om + "experts.local_experts.{E}.linear_fc2.weight"),
    ]


def qwen3_llm_rules() -> list[Rule]:
    """Dense Qwen3 (InternVL3.5-8B's Qwen3-8B): embedding, layers, final norm."""
    return qwen3_rules()


def qwen3_moe_llm_rules(moe_layer_pattern: list[int]) -> list[Rule]:
    """Qwen3-MoE: embedding, layers (MoE or dense by ``moe_layer_pattern``, see
    :func:`qwen3_moe_layer_pattern`), final norm. All-MoE models (Qwen3-30B-A3B) get one
    wildcard rule set; a mixed pattern gets each layer's own rules (``Rule.when`` knows only
    first-k-dense layouts)."""
    rules = [
        Rule("embed_tokens.weight", "embedding.word_embeddings.weight", transform=PAD_VOCAB),
        Rule("norm.weight", "decoder.final_layernorm.weight"),
    ]
    if all(moe_layer_pattern):
        hl, ol = "layers.{L}.", "decoder.layers.{L}."
        return rules + _qwen3_attention_rules(hl, ol) + _qwen3_moe_mlp_rules(hl, ol)
    for i, moe in enumerate(moe_layer_pattern):
        hl, ol = f"layers.{i}.", f"decoder.layers.{i}."
        rules += _qwen3_attention_rules(hl, ol)
        rules += _qwen3_moe_mlp_rules(hl, ol) if moe else _dense_mlp_rules(hl, ol)
    return rules


def internvl_head_rules() -> list[Rule]:
    """The untied output head: HF top-level ``lm_head`` <-> ``output_layer`` (vocab padded)."""
    return [Rule("lm_head.weight", "output_layer.weight", transform=PAD_VOCAB)]


# --- GPT-OSS ----------------------------------------------------------------------------------


def _interleaved_to_halves(w: Tensor) -> Tensor:
    """Rows ``[g0, u0, g1, u1, ...]`` -> ``[g0, g1, ...; u0, u1, ...]`` (dim 0)."""
    return torch.cat([w[0::2], w[1::2]], dim=0)


def _halves_to_interleaved(w: Tensor) -> Tensor:
    gate, up = w.chunk(2, dim=0)
    return torch.stack([gate, up], dim=1).reshape(w.shape)


GPT_OSS_GATE_UP = Transform(
    "gpt_oss_gate_up",
    lambda ts, ctx: _interleaved_to_halves(ts[0].t()).contiguous(),
    lambda t, ctx: [_halves_to_interleaved(t).t().contiguous()],
)
"""One expert's ``gate_up_proj [H, 2I]`` (``x @ W``, gate/up interleaved) <-> our
``linear_fc1.weight [2I, H]`` (``[gate; up]``)."""

GPT_OSS_GATE_UP_BIAS = Transform(
    "gpt_oss_gate_up_bias",
    lambda ts, ctx: _interleaved_to_halves(ts[0]).contiguous(),
    lambda t, ctx: [_halves_to_interleaved(t).contiguous()],
)
"""One expert's ``gate_up_proj_bias [2I]`` (interleaved) <-> ``linear_fc1.bias`` ``[gate; up]``."""

TRANSPOSE = Transform("transpose", lambda ts, ctx: ts[0].t().contiguous(),
                      lambda t, ctx: [t.t().contiguous()])
"""One expert's ``down_proj [I, H]`` (``x @ W``) <-> ``linear_fc2.weight [H, I]``."""


def _expert_slice(ts: list[Tensor], ctx: ConvertContext, e: int) -> list[Tensor]:
    return [ts[0][e]]


GPT_OSS_EXPERT_LAYOUTS = [
    Alias(f"{{pre}}mlp.experts.{name}", f"{{pre}}mlp.experts.{{E}}.{name}", fn=_expert_slice,
          expand="E")
    for name in ("gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias")
]
"""transformers' / the bf16 release's fused per-layer experts -> the per-expert names of
:func:`gpt_oss_llm_rules` (import)."""


def gpt_oss_llm_rules() -> list[Rule]:
    """GPT-OSS: embedding, layers (all MoE), final norm; LLM-relative names."""
    hl, ol = "layers.{L}.", "decoder.layers.{L}."
    ha, oa = hl + "self_attn.", ol + "self_attention."
    hm, om = hl + "mlp.", ol + "mlp."
    he, oe = hm + "experts.{E}.", om + "experts.local_experts.{E}."
    return [
        Rule("embed_tokens.weight", "embedding.word_embeddings.weight", transform=PAD_VOCAB),
        Rule("norm.weight", "decoder.final_layernorm.weight"),
        Rule(hl + "input_layernorm.weight", ol + "input_layernorm.weight",
             te=oa + "linear_qkv.layer_norm_weight"),
        Rule(tuple(ha + f"{n}_proj.weight" for n in "qkv"), oa + "linear_qkv.weight",
             transform=GQA_Q_K_V),
        Rule(tuple(ha + f"{n}_proj.bias" for n in "qkv"), oa + "linear_qkv.bias",
             transform=GQA_Q_K_V),
        Rule(ha + "o_proj.{p}", oa + "linear_proj.{p}"),
        Rule(ha + "sinks", oa + "core_attention.softmax_offset"),
        Rule(hl + "post_attention_layernorm.weight", ol + "pre_mlp_layernorm.weight"),
        Rule(hm + "router.{p}", om + "router.{p}"),
        Rule(he + "gate_up_proj", oe + "linear_fc1.weight", transform=GPT_OSS_GATE_UP),
        Rule(he + "gate_up_proj_bias", oe + "linear_fc1.bias", transform=GPT_OSS_GATE_UP_BIAS),
        Rule(he + "down_proj", oe + "linear_fc2.weight", transform=TRANSPOSE),
        Rule(he + "down_proj_bias", oe + "linear_fc2.bias"),
    ]
