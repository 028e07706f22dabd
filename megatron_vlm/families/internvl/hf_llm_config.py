"""InternVL3.5's text models: a transformers ``text_config`` <-> our ``LLMConfig`` (for the
family's HF config mapping; ``hf_llm_names.py`` holds the tensor names).

Three ``model_type`` s, as transformers 5.25 builds them:

* ``qwen3`` (``Qwen3Config``): GQA with per-head q/k RMSNorm, no biases, SwiGLU.
* ``qwen3_moe`` (``Qwen3MoeConfig``): the same attention; softmax router (``norm_topk_prob``:
  top-k then softmax, else softmax then top-k unnormalised -> ``moe_router_pre_softmax``), no
  shared expert, no expert bias; ``decoder_sparse_step`` / ``mlp_only_layers`` ->
  ``moe_layer_pattern``.
* ``gpt_oss`` (``GptOssConfig``): biases everywhere (``attention_bias`` must be true: the
  experts and router always have theirs), learned sinks, ``layer_types`` alternating sliding /
  full from layer 0 (-> ``window_attn_skip_freq: 2``) or all sliding, the clamped SwiGLU
  (``swiglu_alpha`` fixed at megatron's quick-GELU 1.702, ``swiglu_limit``), top-k of the
  router logits then softmax, YaRN (``rope_parameters``; no ``mscale`` keys = HF's default
  attention factor ``0.1 ln s + 1`` = our ``mscale: 1, mscale_all_dim: 0``).

RoPE is read from ``rope_parameters`` (5.x) or ``rope_scaling`` + ``rope_theta`` (older files).
"""

from __future__ import annotations

import math
from typing import Any

from megatron_vlm.config.model import LLMConfig, YarnConfig
from megatron_vlm.convert.rules import ConversionError
from megatron_vlm.families.internvl.hf_llm_names import qwen3_moe_layer_pattern

MODEL_TYPES = ("qwen3", "qwen3_moe", "gpt_oss")
QUICK_GELU_ALPHA = 1.702
"""megatron's ``quick_gelu`` gain: GPT-OSS's ``swiglu_alpha`` must equal it."""


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ConversionError(message)


def _rope(text: dict[str, Any]) -> tuple[float, dict[str, Any]]:
    rp = dict(text.get("rope_parameters") or text.get("rope_scaling") or {})
    theta = float(rp.get("rope_theta") or text.get("rope_theta") or 10000.0)
    return theta, rp


def _yarn(rp: dict[str, Any]) -> YarnConfig:
    """GPT-OSS's YaRN ``rope_parameters`` as our ``YarnConfig``."""
    _require(rp.get("attention_factor") is None,
             "text_config.rope_parameters.attention_factor is set: our YaRN derives the factor "
             "from mscale / mscale_all_dim; leave it out")
    mscale, mscale_all = rp.get("mscale"), rp.get("mscale_all_dim")
    if not (mscale and mscale_all):  # transformers: 0.1 ln s + 1 unless both are given
        mscale, mscale_all = 1.0, 0.0
    return YarnConfig(
        factor=float(rp["factor"]),
        original_max_position_embeddings=int(rp["original_max_position_embeddings"]),
        beta_fast=float(rp.get("beta_fast") or 32.0), beta_slow=float(rp.get("beta_slow") or 1.0),
        mscale=float(mscale), mscale_all_dim=float(mscale_all),
        truncate=bool(rp.get("truncate", True)))


def _common(text: dict[str, Any], tied: bool) -> dict[str, Any]:
    heads, hidden = int(text["num_attention_heads"]), int(text["hidden_size"])
    return dict(
        attention="gqa", vocab_size=int(text["vocab_size"]), hidden_size=hidden,
        num_layers=int(text["num_hidden_layers"]), num_attention_heads=heads,
        num_query_groups=int(text.get("num_key_value_heads") or heads),
        kv_channels=int(text.get("head_dim") or hidden // heads),
        norm_epsilon=float(text.get("rms_norm_eps", 1e-6)),
        untie_embeddings=not (tied or text.get("tie_word_embeddings", False)),
        max_position_embeddings=int(text.get("max_position_embeddings", 32768)))


def _qwen3(text: dict[str, Any], moe: bool) -> dict[str, Any]:
    _require(text.get("hidden_act", "silu") == "silu",
             f"text_config.hidden_act={text.get('hidden_act')!r}: Qwen3's MLPs are SwiGLU")
    _require(not text.get("use_sliding_window", False),
             "text_config.use_sliding_window=true is not supported for Qwen3 (no released "
             "Qwen3 uses it)")
    theta, rp = _rope(text)
    _require((rp.get("rope_type") or rp.get("type") or "default") == "default",
             "text_config.rope_parameters: Qwen3 in InternVL3.5 uses plain RoPE")
    fields = dict(qk_layernorm=True, add_qkv_bias=bool(text.get("attention_bias", False)),
                  ffn_hidden_size=int(text["intermediate_size"]), rope_theta=theta)
    layers = int(text["num_hidden_layers"])
    if not moe:
        return dict(fields, num_experts=None, num_dense_layers=layers)
    pattern = qwen3_moe_layer_pattern(layers, int(text.get("decoder_sparse_step", 1)),
                                      list(text.get("mlp_only_layers") or []))
    return dict(
        # released files say num_experts; transformers 5.25's to_dict writes num_local_experts
        fields, num_experts=int(text.get("num_experts") or text["num_local_experts"]),
        moe_router_topk=int(text["num_experts_per_tok"]), num_shared_experts=0,
        moe_ffn_hidden_size=int(text["moe_intermediate_size"]),
        moe_router_score_function="softmax",
        moe_router_pre_softmax=not bool(text.get("norm_topk_prob", False)),
        moe_router_topk_scaling_factor=1.0, moe_router_enable_expert_bias=False,
        moe_layer_pattern=None if all(pattern) else pattern, num_dense_layers=pattern.count(0))


def _window_skip_freq(text: dict[str, Any]) -> int | None:
    layers = int(text["num_hidden_layers"])
    kinds = list(text.get("layer_types") or [
        "sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(layers)])
    if all(k == "sliding_attention" for k in kinds):
        return None
    alternating = ["sliding_attention" if (i + 1) % 2 else "full_attention"
                   for i in range(layers)]
    _require(kinds == alternating, f"text_config.layer_types={kinds}: supported are sliding / "
             "full alternating from layer 0 (GPT-OSS) or every layer sliding")
    return 2


def _gpt_oss(text: dict[str, Any]) -> dict[str, Any]:
    _require(bool(text.get("attention_bias", True)), "text_config.attention_bias=false: "
             "GPT-OSS's router and experts always have biases, ours are one switch "
             "(add_bias_linear); attention without biases is not supported")
    alpha = float(text.get("swiglu_alpha", QUICK_GELU_ALPHA))
    _require(math.isclose(alpha, QUICK_GELU_ALPHA), f"text_config.swiglu_alpha={alpha}: "
             f"megatron's quick_gelu has {QUICK_GELU_ALPHA}")
    window = text.get("sliding_window")
    theta, rp = _rope(text)
    kind = rp.get("rope_type") or rp.get("type") or "default"
    _require(kind in ("default", "yarn"), f"text_config rope type {kind!r}: GPT-OSS uses yarn")
    return dict(
        qk_layernorm=False, add_qkv_bias=True, add_bias_linear=True, attention_sinks=True,
        sliding_window=int(window) if window else None,
        window_attn_skip_freq=_window_skip_freq(text) if window else None,
        mlp_activation="clamped_swiglu", swiglu_limit=float(text.get("swiglu_limit", 7.0)),
        ffn_hidden_size=int(text["intermediate_size"]), num_dense_layers=0,
        num_experts=int(text["num_local_experts"]),
        moe_router_topk=int(text["num_experts_per_tok"]), num_shared_experts=0,
        moe_ffn_hidden_size=int(text["intermediate_size"]), moe_router_score_function="softmax",
        moe_router_pre_softmax=False, moe_router_topk_scaling_factor=1.0,
        moe_router_enable_expert_bias=False, rope_theta=theta,
        yarn=_yarn(rp) if kind == "yarn" else YarnConfig())


def llm_from_hf(text: dict[str, Any], tied: bool = False) -> LLMConfig:
    """Our LLM from an InternVL3.5 ``text_config`` (``model_type`` qwen3, qwen3_moe or gpt_oss;
    ``tied``: the top-level ``tie_word_embeddings``)."""
    kind = text.get("model_type")
    _require(kind in MODEL_TYPES, f"text_config.model_type={kind!r}: InternVL3.5's text models "
             f"are {list(MODEL_TYPES)}")
    fields = _gpt_oss(text) if kind == "gpt_oss" else _qwen3(text, moe=kind == "qwen3_moe")
    return LLMConfig(**_common(text, tied), **fields)


def llm_to_hf(llm: LLMConfig, model_type: str) -> dict[str, Any]:
    """The ``text_config`` of ``model_type`` for ``llm`` (the inverse of :func:`llm_from_hf`)."""
    _require(model_type in MODEL_TYPES, f"model_type={model_type!r}: one of {MODEL_TYPES}")
    out: dict[str, Any] = dict(
        model_type=model_type, vocab_size=llm.vocab_size, hidden_size=llm.hidden_size,
        num_hidden_layers=llm.num_layers, num_attention_heads=llm.num_attention_heads,
        num_key_value_heads=llm.query_groups, head_dim=llm.head_dim,
        rms_norm_eps=llm.norm_epsilon, tie_word_embeddings=not llm.untie_embeddings,
        max_position_embeddings=llm.max_position_embeddings)
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": llm.rope_theta}
    if model_type == "gpt_oss":
        if llm.yarn.enabled:
            y = llm.yarn
            rope = {"rope_type": "yarn", "rope_theta": llm.rope_theta, "factor": y.factor,
                    "beta_fast": y.beta_fast, "beta_slow": y.beta_slow, "truncate": y.truncate,
                    "original_max_position_embeddings": y.original_max_position_embeddings}
            if (y.mscale, y.mscale_all_dim) != (1.0, 0.0):
                rope.update(mscale=y.mscale, mscale_all_dim=y.mscale_all_dim)
        out.update(
            intermediate_size=llm.moe_ffn_hidden_size, num_local_experts=llm.num_experts,
            num_experts_per_tok=llm.moe_router_topk, attention_bias=True,
            sliding_window=llm.sliding_window, swiglu_limit=llm.swiglu_limit,
            layer_types=["sliding_attention" if llm.layer_slides(i) else "full_attention"
                         for i in range(llm.num_layers)])
    else:
        out.update(intermediate_size=llm.ffn_hidden_size, attention_bias=llm.add_qkv_bias,
                   hidden_act="silu")
        if model_type == "qwen3_moe":
            dense = [i for i, moe in enumerate(llm.moe_layer_freq) if not moe]
            out.update(num_experts=llm.num_experts, num_experts_per_tok=llm.moe_router_topk,
                       moe_intermediate_size=llm.moe_ffn_hidden_size,
                       norm_topk_prob=not llm.moe_router_pre_softmax, decoder_sparse_step=1,
                       mlp_only_layers=dense)
    out["rope_parameters"] = rope
    return out
