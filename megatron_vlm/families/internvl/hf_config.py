"""InternVL3.5 ``config.json`` <-> our ``ModelConfig`` (``model.family: internvl``).

The layout is transformers 5.25's ``InternVLConfig`` (the ``OpenGVLab/InternVL3_5-*-HF``
checkpoints): ``text_config`` (a Qwen3, Qwen3-MoE or GPT-OSS text model, by its ``model_type``),
``vision_config`` plus the top-level projector fields (``hf_vision_config.py``), the
placeholder ``image_token_id`` and ``tie_word_embeddings`` at the top level.

The text model (``qwen3``: InternVL3.5-1B ... 14B, 8B = Qwen3-8B; ``qwen3_moe``: 30B-A3B,
241B-A28B; ``gpt_oss``: 20B-A4B) maps through ``hf_llm_config.py`` (I2's ``text_config`` <->
``LLMConfig``); this module adds what the whole model decides: the text model type an export
writes (:func:`text_kind`, refusing LLMs none of the three expresses), Qwen3's
``attention_bias`` refused (it also biases ``o_proj``, which ``add_qkv_bias`` does not), and the
text config's own ``tie_word_embeddings`` neither read nor written (see below).

Token ids: the top-level ``image_token_id`` (``<IMG_CONTEXT>``, images and video frames alike) is
``model.token_ids.image``; ``<img>`` / ``</img>`` have no ``InternVLConfig`` field (the processor
looks them up by name), so import leaves ``media_begin`` / ``media_end`` unset and export writes
only ``image_token_id``. bos / eos / pad live in ``text_config``.

Embedding tying is the TOP-LEVEL ``tie_word_embeddings`` (``InternVLConfig`` default true): the
text model is built without a head, so its own field is not read by transformers.
"""

from __future__ import annotations

from typing import Any

from megatron_vlm.config.model import LLMConfig, ModelConfig, TokenIdsConfig
from megatron_vlm.convert.rules import ConversionError
from megatron_vlm.families.internvl import hf_llm_config
from megatron_vlm.families.internvl.hf_vision_config import vision_from_hf, vision_to_hf

ARCHITECTURE = "InternVLForConditionalGeneration"
MODEL_TYPE = "internvl"
VISION_MODEL_TYPE = "internvl_vision"

_DOCUMENT_KEYS = {"bos": "bos_token_id", "eos": "eos_token_id", "pad": "pad_token_id"}


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ConversionError(message)


def _first(value: Any) -> int | None:
    if isinstance(value, list):  # several eos ids: ours is one
        value = value[0] if value else None
    return None if value is None else int(value)


def llm_from_hf(text: dict[str, Any], tied: bool) -> LLMConfig:
    """Our GQA LLM from ``text_config`` (``tied``: the top-level ``tie_word_embeddings``; the
    text config's own is not read, as transformers builds the text model headless)."""
    _require(not (text.get("model_type") in ("qwen3", "qwen3_moe")
                  and text.get("attention_bias", False)),
             "text_config.attention_bias=true is not supported for Qwen3 (it would bias o_proj "
             "too, which model.llm.add_qkv_bias does not)")
    return hf_llm_config.llm_from_hf(
        {k: v for k, v in text.items() if k != "tie_word_embeddings"}, tied=tied)


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
                 and llm.window_attn_skip_freq in (None, 2),
                 "a GPT-OSS export needs model.llm.qk_layernorm=false, add_qkv_bias=true, "
                 "add_bias_linear=true, mlp_activation=clamped_swiglu, num_experts set, "
                 "moe_router_pre_softmax=false, num_dense_layers=0, window_attn_skip_freq "
                 "null or 2")
        return "gpt_oss"
    _require(llm.qk_layernorm and not llm.add_qkv_bias and not llm.add_bias_linear
             and llm.mlp_activation == "swiglu" and llm.sliding_window is None
             and llm.yarn.factor == 1.0,
             "a Qwen3 / Qwen3-MoE export needs model.llm.qk_layernorm=true, add_qkv_bias=false, "
             "add_bias_linear=false, mlp_activation=swiglu, sliding_window=null, yarn.factor=1")
    return "qwen3" if llm.num_experts is None else "qwen3_moe"


def llm_to_hf(llm: LLMConfig) -> dict[str, Any]:
    """The ``text_config`` of our LLM (:func:`text_kind` picks the model type; no
    ``tie_word_embeddings``: the top level's decides)."""
    text = hf_llm_config.llm_to_hf(llm, text_kind(llm))
    text.pop("tie_word_embeddings", None)
    return text


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

