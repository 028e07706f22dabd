"""InternVL3.5 ``config.json`` <-> our ``ModelConfig`` (``model.family: internvl``).

The layout is transformers 5.25's ``InternVLConfig`` (the ``OpenGVLab/InternVL3_5-*-HF``
checkpoints): ``text_config`` (a Qwen3, Qwen3-MoE or GPT-OSS text model, by its ``model_type``),
``vision_config`` plus the top-level projector fields (``hf_vision_config.py``), the
placeholder ``image_token_id`` and ``tie_word_embeddings`` at the top level.

Text models, as transformers' modules run them:

* ``qwen3`` (InternVL3.5-1B ... 14B; 8B = Qwen3-8B): GQA with per-head q/k RMSNorm, no biases,
  SwiGLU, RoPE;
* ``qwen3_moe`` (30B-A3B, 241B-A28B): Qwen3's attention; MoE layers by ``mlp_only_layers`` /
  ``decoder_sparse_step`` (``model.llm.moe_layer_pattern``), a softmax router without bias
  (``norm_topk_prob`` -> ``moe_router_pre_softmax`` false), no shared expert. The expert count is
  read from ``num_experts`` (the release's name) or ``num_local_experts`` (transformers 5.25's
  attribute) and written as ``num_experts``;
* ``gpt_oss`` (20B-A4B): q/k/v/o biases, per-head sinks, sliding-window layers alternating with
  full ones (``layer_types``: layer 0 sliding; ``window_attn_skip_freq: 2``), every layer MoE
  with a biased router (top-k of the logits, then softmax) and biased experts, the clamped
  SwiGLU with the +1 (``swiglu_limit``; ``swiglu_alpha`` 1.702 is fixed), YaRN (HF's default
  attention factor ``0.1 ln s + 1`` = our ``mscale 1, mscale_all_dim 0``).

Plain 1D RoPE in all three (``position_embedding: rope``). Read from ``rope_parameters`` (5.x)
or ``rope_scaling`` + ``rope_theta`` (older files); export writes ``rope_parameters``.

Token ids: the top-level ``image_token_id`` (``<IMG_CONTEXT>``, images and video frames alike) is
``model.token_ids.image``; ``<img>`` / ``</img>`` have no ``InternVLConfig`` field (the processor
looks them up by name), so import leaves ``media_begin`` / ``media_end`` unset and export writes
only ``image_token_id``. bos / eos / pad live in ``text_config``.

Embedding tying is the TOP-LEVEL ``tie_word_embeddings`` (``InternVLConfig`` default true): the
text model is built without a head, so its own field is not read by transformers.
"""

from __future__ import annotations

from typing import Any

from megatron_vlm.config.model import LLMConfig, ModelConfig, TokenIdsConfig, YarnConfig
from megatron_vlm.convert.rules import ConversionError
from megatron_vlm.families.internvl.hf_llm_names import qwen3_moe_layer_pattern
from megatron_vlm.families.internvl.hf_vision_config import vision_from_hf, vision_to_hf

ARCHITECTURE = "InternVLForConditionalGeneration"
MODEL_TYPE = "internvl"
VISION_MODEL_TYPE = "internvl_vision"
TEXT_MODEL_TYPES = ("qwen3", "qwen3_moe", "gpt_oss")
"""``text_config.model_type`` values this mapping reads."""
GPT_OSS_SWIGLU_ALPHA = 1.702
"""``GptOssExperts.alpha``: our clamped SwiGLU's fixed ``quick_gelu`` slope."""

_DOCUMENT_KEYS = {"bos": "bos_token_id", "eos": "eos_token_id", "pad": "pad_token_id"}


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ConversionError(message)


def _first(value: Any) -> int | None:
    if isinstance(value, list):  # several eos ids: ours is one
        value = value[0] if value else None
    return None if value is None else int(value)


def _rope(text: dict[str, Any], kind: str) -> tuple[float, YarnConfig]:
    """(theta, YaRN) from ``rope_parameters`` / ``rope_scaling`` (+ ``rope_theta``)."""
    rp = dict(text.get("rope_parameters") or text.get("rope_scaling") or {})
    rope_type = rp.get("rope_type") or rp.get("type") or "default"
    theta = float(rp.get("rope_theta") or text.get("rope_theta") or 10000.0)
    if rope_type == "default":
        return theta, YarnConfig()
    _require(rope_type == "yarn" and kind == "gpt_oss",
             f"text_config rope type {rope_type!r} ({kind}): supported are default RoPE and, "
             "for gpt_oss, yarn")
    extra = sorted(k for k in ("attention_factor", "mscale", "mscale_all_dim") if rp.get(k))
    _require(not extra, f"text_config.rope_parameters {extra}: only YaRN's default attention "
             "factor (0.1 ln factor + 1) is supported")
    return theta, YarnConfig(
        factor=float(rp["factor"]),
        original_max_position_embeddings=int(rp["original_max_position_embeddings"]),
        beta_fast=float(rp.get("beta_fast", 32.0)), beta_slow=float(rp.get("beta_slow", 1.0)),
        mscale=1.0, mscale_all_dim=0.0, truncate=bool(rp.get("truncate", True)))


def _qwen3_moe_fields(text: dict[str, Any], layers: int) -> dict[str, Any]:
    pattern = qwen3_moe_layer_pattern(layers, int(text.get("decoder_sparse_step", 1)),
                                      list(text.get("mlp_only_layers") or []))
    experts = text.get("num_experts", text.get("num_local_experts"))
    return dict(
        num_experts=int(experts), moe_router_topk=int(text.get("num_experts_per_tok", 8)),
        num_shared_experts=0, moe_ffn_hidden_size=int(text["moe_intermediate_size"]),
        moe_router_score_function="softmax",
        moe_router_pre_softmax=not bool(text.get("norm_topk_prob", False)),
        moe_router_topk_scaling_factor=1.0, moe_router_enable_expert_bias=False,
        moe_layer_pattern=None if all(pattern) else pattern,
        num_dense_layers=pattern.count(0))


def _gpt_oss_fields(text: dict[str, Any], layers: int) -> dict[str, Any]:
    _require(bool(text.get("attention_bias", True)), "text_config.attention_bias=false: GPT-OSS "
             "experts and router always have biases; only attention_bias=true is supported")
    _require(float(text.get("swiglu_alpha", GPT_OSS_SWIGLU_ALPHA)) == GPT_OSS_SWIGLU_ALPHA,
             f"text_config.swiglu_alpha={text.get('swiglu_alpha')}: only "
             f"{GPT_OSS_SWIGLU_ALPHA} is supported")
    alternating = ["sliding_attention" if (i + 1) % 2 else "full_attention"
                   for i in range(layers)]
    types = list(text.get("layer_types") or alternating)
    window = text.get("sliding_window")
    if all(t == "full_attention" for t in types) or window is None:
        sliding = dict(sliding_window=None, window_attn_skip_freq=None)
    else:
        _require(types == alternating, f"text_config.layer_types={types}: only GPT-OSS's "
                 "alternation (layer 0 sliding, then full, ...) or all full is supported")
        sliding = dict(sliding_window=int(window), window_attn_skip_freq=2)
    experts = text.get("num_local_experts", text.get("num_experts"))
    return dict(
        add_bias_linear=True, attention_sinks=True, mlp_activation="clamped_swiglu",
        swiglu_limit=float(text.get("swiglu_limit", 7.0)), num_experts=int(experts),
        moe_router_topk=int(text.get("num_experts_per_tok", 4)), num_shared_experts=0,
        moe_ffn_hidden_size=int(text["intermediate_size"]), moe_router_score_function="softmax",
        moe_router_pre_softmax=False, moe_router_topk_scaling_factor=1.0,
        moe_router_enable_expert_bias=False, num_dense_layers=0, **sliding)


def llm_from_hf(text: dict[str, Any], tied: bool) -> LLMConfig:
    """Our GQA LLM from ``text_config`` (``tied``: the top-level ``tie_word_embeddings``)."""
    kind = text.get("model_type")
    _require(kind in TEXT_MODEL_TYPES, f"text_config.model_type={kind!r}: InternVL3.5's text "
             f"models are {list(TEXT_MODEL_TYPES)}")
    if kind != "gpt_oss":
        _require(text.get("hidden_act", "silu") == "silu",
                 f"text_config.hidden_act={text.get('hidden_act')!r}: Qwen3 MLPs are SwiGLU")
        _require(not text.get("attention_bias", False), "text_config.attention_bias=true is not "
                 "supported for Qwen3 (no q/k/v/o biases)")
        _require(not text.get("use_sliding_window", False), "text_config.use_sliding_window="
                 "true is not supported for Qwen3 (InternVL3.5 attends to the whole document)")
    heads, hidden = int(text["num_attention_heads"]), int(text["hidden_size"])
    layers = int(text["num_hidden_layers"])
    theta, yarn = _rope(text, kind)
    fields: dict[str, Any] = dict(num_experts=None, num_dense_layers=layers)
    if kind == "qwen3_moe":
        fields = _qwen3_moe_fields(text, layers)
    elif kind == "gpt_oss":
        fields = _gpt_oss_fields(text, layers)
    return LLMConfig(
        attention="gqa", vocab_size=int(text["vocab_size"]), hidden_size=hidden,
        num_layers=layers, num_attention_heads=heads,
        num_query_groups=int(text.get("num_key_value_heads") or heads),
        kv_channels=int(text.get("head_dim") or hidden // heads),
        qk_layernorm=kind != "gpt_oss", add_qkv_bias=kind == "gpt_oss",
        ffn_hidden_size=int(text["intermediate_size"]), rope_theta=theta, yarn=yarn,
        position_embedding="rope", norm_epsilon=float(text.get("rms_norm_eps", 1e-6)),
        init_method_std=float(text.get("initializer_range", 0.02)), untie_embeddings=not tied,
        attention_dropout=float(text.get("attention_dropout", 0.0)),
        max_position_embeddings=int(text.get("max_position_embeddings", 32768)), **fields)


def text_kind(llm: LLMConfig) -> str:
    """``text_config.model_type`` of our LLM (GPT-OSS iff attention sinks, Qwen3-MoE iff
    experts); a ConversionError naming the keys when none of the three expresses it."""
    common = (llm.attention == "gqa" and llm.position_embedding == "rope"
              and llm.rotary_fraction == 1.0 and not llm.sandwich_norms
              and llm.mtp_num_layers == 0)
    _require(common, "an InternVL export needs model.llm.attention=gqa, position_embedding="
             "rope, rotary_fraction=1.0, sandwich_norms=false, mtp_num_layers=0")
    moe_ok = llm.num_experts is None or (
        llm.moe_router_score_function == "softmax" and llm.num_shared_experts == 0
        and llm.moe_router_topk_scaling_factor == 1.0 and not llm.moe_router_enable_expert_bias
        and llm.moe_router_num_groups is None)
    _require(moe_ok, "an InternVL MoE export needs model.llm.moe_router_score_function=softmax, "
             "num_shared_experts=0, moe_router_topk_scaling_factor=1.0, "
             "moe_router_enable_expert_bias=false, moe_router_num_groups=null")
    if llm.attention_sinks:
        _require(not llm.qk_layernorm and llm.add_qkv_bias and llm.add_bias_linear
                 and llm.mlp_activation == "clamped_swiglu" and llm.num_experts is not None
                 and not llm.moe_router_pre_softmax and llm.num_dense_layers == 0
                 and (llm.sliding_window is None or llm.window_attn_skip_freq == 2)
                 and (llm.yarn.factor == 1.0 or (llm.yarn.mscale == 1.0
                                                 and llm.yarn.mscale_all_dim == 0.0)),
                 "a GPT-OSS export needs model.llm.qk_layernorm=false, add_qkv_bias=true, "
                 "add_bias_linear=true, mlp_activation=clamped_swiglu, num_experts set, "
                 "moe_router_pre_softmax=false, num_dense_layers=0, window_attn_skip_freq=2 "
                 "with sliding_window, yarn.mscale=1 and mscale_all_dim=0")
        return "gpt_oss"
    _require(llm.qk_layernorm and not llm.add_qkv_bias and not llm.add_bias_linear
             and llm.mlp_activation == "swiglu" and llm.sliding_window is None
             and llm.yarn.factor == 1.0,
             "a Qwen3 / Qwen3-MoE export needs model.llm.qk_layernorm=true, add_qkv_bias=false, "
             "add_bias_linear=false, mlp_activation=swiglu, sliding_window=null, yarn.factor=1")
    return "qwen3" if llm.num_experts is None else "qwen3_moe"


def _rope_to_hf(llm: LLMConfig) -> dict[str, Any]:
    if llm.yarn.factor == 1.0:
        return {"rope_type": "default", "rope_theta": llm.rope_theta}
    y = llm.yarn
    return {"rope_type": "yarn", "rope_theta": llm.rope_theta, "factor": y.factor,
            "beta_fast": y.beta_fast, "beta_slow": y.beta_slow, "truncate": y.truncate,
            "original_max_position_embeddings": y.original_max_position_embeddings}


def llm_to_hf(llm: LLMConfig) -> dict[str, Any]:
    """The ``text_config`` of our LLM (:func:`text_kind` picks the model type)."""
    kind = text_kind(llm)
    out: dict[str, Any] = {
        "model_type": kind, "vocab_size": llm.vocab_size, "hidden_size": llm.hidden_size,
        "num_hidden_layers": llm.num_layers, "num_attention_heads": llm.num_attention_heads,
        "num_key_value_heads": llm.query_groups, "head_dim": llm.head_dim,
        "hidden_act": "silu", "max_position_embeddings": llm.max_position_embeddings,
        "initializer_range": llm.init_method_std, "rms_norm_eps": llm.norm_epsilon,
        "rope_parameters": _rope_to_hf(llm), "attention_dropout": llm.attention_dropout,
        "attention_bias": kind == "gpt_oss",
    }
    if kind == "gpt_oss":
        window = llm.sliding_window is not None
        out.update({
            "intermediate_size": llm.moe_ffn_hidden_size, "num_local_experts": llm.num_experts,
            "num_experts_per_tok": llm.moe_router_topk, "swiglu_limit": llm.swiglu_limit,
            "sliding_window": llm.sliding_window if window else None,
            "layer_types": ["sliding_attention" if window and (i + 1) % 2 else "full_attention"
                            for i in range(llm.num_layers)],
        })
        return out
    out.update({"intermediate_size": llm.ffn_hidden_size, "use_sliding_window": False})
    if kind == "qwen3_moe":
        pattern = llm.moe_layer_pattern or [0] * llm.num_dense_layers + [1] * (
            llm.num_layers - llm.num_dense_layers)
        out.update({
            "moe_intermediate_size": llm.moe_ffn_hidden_size, "num_experts": llm.num_experts,
            "num_experts_per_tok": llm.moe_router_topk,
            "norm_topk_prob": not llm.moe_router_pre_softmax, "decoder_sparse_step": 1,
            "mlp_only_layers": [i for i, moe in enumerate(pattern) if not moe],
        })
    return out


def token_ids_from_hf(cfg: dict[str, Any], text: dict[str, Any]) -> TokenIdsConfig:
    """bos/eos/pad from ``text_config`` (or the top level), the placeholder from the top."""
    ids = {n: _first(text.get(k, cfg.get(k))) for n, k in _DOCUMENT_KEYS.items()}
    return TokenIdsConfig(image=_first(cfg.get("image_token_id")), **ids)


def model_from_hf(cfg: dict[str, Any], params_dtype: str = "fp32") -> tuple[ModelConfig, bool]:
    """Our whole VLM from an ``InternVLForConditionalGeneration`` ``config.json``; the flag is
    ``rope_interleave`` (GQA: unused, True)."""
    archs = cfg.get("architectures") or [ARCHITECTURE]
    _require(archs[0] == ARCHITECTURE, f"architectures={archs}: this table converts "
             f"{ARCHITECTURE}")
    _require(not cfg.get("quantization_config"), "quantized checkpoints (quantization_config) "
             "are not supported: convert the bf16 release")
    text = dict(cfg["text_config"])
    llm = llm_from_hf(text, tied=bool(cfg.get("tie_word_embeddings", True)))
    vision, projector = vision_from_hf(cfg, llm.hidden_size)
    model = ModelConfig(family="internvl", llm=llm, vision=vision, projector=projector,
                        params_dtype=params_dtype, token_ids=token_ids_from_hf(cfg, text))
    return model, True


def model_to_hf(model: ModelConfig, dtype: str, token_ids: TokenIdsConfig) -> dict[str, Any]:
    """The ``config.json`` transformers builds ``InternVLForConditionalGeneration`` from, with
    the token ids we know (none invented)."""
    _require(model.family == "internvl" and model.is_vlm,
             f"the internvl export needs an InternVL VLM checkpoint (model.family="
             f"{model.family!r}, vision {'set' if model.is_vlm else 'null'})")
    text = llm_to_hf(model.llm)
    text.update({k: getattr(token_ids, n) for n, k in _DOCUMENT_KEYS.items()
                 if getattr(token_ids, n) is not None})
    visual = vision_to_hf(model.vision, model.projector)
    visual["vision_config"] = {"model_type": VISION_MODEL_TYPE, **visual["vision_config"]}
    out = {"architectures": [ARCHITECTURE], "model_type": MODEL_TYPE, "text_config": text,
           **visual}
    if token_ids.image is not None:
        out["image_token_id"] = token_ids.image
    out["tie_word_embeddings"] = not model.llm.untie_embeddings
    out["dtype"] = {"bf16": "bfloat16", "fp32": "float32"}[dtype]
    return out

