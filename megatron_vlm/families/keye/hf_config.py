"""Keye-VL 1.5 ``config.json`` <-> our ``ModelConfig`` (``model.family: keye``).

What the released ``config.json`` of ``Kwai-Keye/Keye-VL-1_5-8B`` holds was read from the code
that loads it, not from the file (not in reach): vLLM's ``keye.py`` / ``keye_vl1_5.py``
(``vllm-project/vllm``, see ``families/keye/hf_table.py``) reads ``image_token_id``,
``video_token_id`` and ``vision_config.spatial_merge_size`` at the top level and builds the LLM as
``Qwen3ForCausalLM`` from the same config; the HF port
(``huggingface/transformers@07a9f73daf83cdffdefd61b02bbca0731e8406ce``,
``models/keye_vl_1_5/configuration_keye_vl_1_5.py``) accepts the Qwen3 text fields at the top
level ("for BC use all kwargs to init TextConfig") or in ``text_config``, ``model_type``
``KeyeVL1_5``, M-RoPE as ``rope_scaling: {"type": "mrope", "mrope_section": [...]}``, and its
test writes the flat layout. So import reads either layout; export writes the flat one.
Unverified against the release file (FAMILIES.md "U"): the exact ``model_type`` string, the
vision sub-config's ``model_type``, ``mrope_section`` values and which optional keys it lists.

Fixed in the released code, not in the config: the merger LayerNorm eps 1e-5 and the tower's
2D RoPE theta 1e4 (vLLM ``KeyeVL1_5Projector`` / ``SigLIPRotaryEmbedding``); import sets them.
"""

from __future__ import annotations

from typing import Any

from megatron_vlm.config.model import LLMConfig, ModelConfig, TokenIdsConfig
from megatron_vlm.convert.rules import ConversionError
from megatron_vlm.families.keye.config import KeyeMergerConfig, SiglipVisionConfig

ARCHITECTURE = "KeyeVL1_5ForConditionalGeneration"
"""vLLM's registry name (``_MULTIMODAL_MODELS``) and the HF port's class."""
MODEL_TYPE = "KeyeVL1_5"
"""``KeyeVL1_5Config.model_type`` of the HF port (the release's: unverified)."""
MERGER_NORM_EPS = 1e-5
"""``mlp_AR.pre_norm`` eps, hard-coded in vLLM's ``KeyeVL1_5Projector``."""
VISION_ROPE_THETA = 10000.0
"""The tower's 2D RoPE base, ``SigLIPRotaryEmbedding``'s default (vLLM ``keye.py``)."""

_DOCUMENT_KEYS = {"bos": "bos_token_id", "eos": "eos_token_id", "pad": "pad_token_id"}
_MEDIA_KEYS = {"image": "image_token_id", "video": "video_token_id",
               "media_begin": "vision_start_token_id", "media_end": "vision_end_token_id"}


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ConversionError(message)


def _first(value: Any) -> int | None:
    if isinstance(value, list):  # several eos ids: ours is one
        value = value[0] if value else None
    return None if value is None else int(value)


def _rope(text: dict[str, Any]) -> tuple[float, list[int] | None]:
    """(theta, mrope_section or None) from ``rope_scaling`` / ``rope_parameters``."""
    rp = dict(text.get("rope_scaling") or text.get("rope_parameters") or {})
    kind = rp.get("rope_type") or rp.get("type") or "default"
    _require(kind in ("default", "mrope"), f"rope type {kind!r}: Keye-VL uses plain or "
             "multimodal RoPE (rope_scaling.type mrope/default); scaled RoPE is not supported")
    theta = float(rp.get("rope_theta") or text.get("rope_theta") or 1e6)
    section = rp.get("mrope_section")
    return theta, [int(x) for x in section] if section else None


def llm_from_hf(text: dict[str, Any]) -> LLMConfig:
    """Our GQA LLM (Qwen3: q/k RMSNorm, no bias) from the Qwen3 fields of a Keye config."""
    _require(text.get("hidden_act", "silu") == "silu",
             f"hidden_act {text.get('hidden_act')!r}: only silu (SwiGLU) is supported")
    _require(not text.get("attention_bias", False), "attention_bias=true is not supported "
             "(Qwen3 has no q/k/v bias)")
    _require(not text.get("use_sliding_window", False), "use_sliding_window=true is not "
             "supported (Keye-VL 1.5 attends to the whole document)")
    heads = int(text["num_attention_heads"])
    hidden = int(text["hidden_size"])
    layers = int(text["num_hidden_layers"])
    theta, section = _rope(text)
    return LLMConfig(
        attention="gqa", vocab_size=int(text["vocab_size"]), hidden_size=hidden,
        num_layers=layers, num_attention_heads=heads,
        num_query_groups=int(text.get("num_key_value_heads") or heads),
        kv_channels=int(text.get("head_dim") or hidden // heads), qk_layernorm=True,
        add_qkv_bias=False, ffn_hidden_size=int(text["intermediate_size"]), num_experts=None,
        num_dense_layers=layers, rope_theta=theta,
        position_embedding="mrope" if section else "rope", mrope_section=section,
        norm_epsilon=float(text.get("rms_norm_eps", 1e-6)),
        untie_embeddings=not text.get("tie_word_embeddings", False),
        max_position_embeddings=int(text["max_position_embeddings"]))


def llm_to_hf(llm: LLMConfig) -> dict[str, Any]:
    """The Qwen3 text fields (top level of the Keye config)."""
    _require(llm.attention == "gqa" and llm.qk_layernorm and not llm.add_qkv_bias
             and llm.num_experts is None,
             "a Keye-VL export needs the Qwen3 LLM: model.llm.attention=gqa, qk_layernorm=true, "
             "add_qkv_bias=false, num_experts=null")
    rope: dict[str, Any] = {"type": "mrope", "mrope_section": list(llm.mrope_section)} \
        if llm.position_embedding == "mrope" else {"type": "default"}
    return {
        "vocab_size": llm.vocab_size, "hidden_size": llm.hidden_size,
        "intermediate_size": llm.ffn_hidden_size, "num_hidden_layers": llm.num_layers,
        "num_attention_heads": llm.num_attention_heads,
        "num_key_value_heads": llm.query_groups, "head_dim": llm.head_dim,
        "hidden_act": "silu", "max_position_embeddings": llm.max_position_embeddings,
        "rms_norm_eps": llm.norm_epsilon, "rope_theta": llm.rope_theta, "rope_scaling": rope,
        "attention_bias": False, "attention_dropout": 0.0, "use_sliding_window": False,
        "tie_word_embeddings": not llm.untie_embeddings,
    }


def vision_from_hf(v: dict[str, Any]) -> SiglipVisionConfig:
    """Our tower from ``vision_config`` (SigLIP's fields + ``spatial_merge_size``)."""
    from megatron_vlm.families.keye.siglip_init import siglip_vision_config

    merge = int(v.get("spatial_merge_size", 2))
    try:
        return siglip_vision_config(v, rope_theta=VISION_ROPE_THETA, merge_kernel_height=merge,
                                    merge_kernel_width=merge)
    except (KeyError, ValueError) as e:
        raise ConversionError(f"vision_config: {e}") from e


def vision_to_hf(vision: SiglipVisionConfig) -> dict[str, Any]:
    _require(vision.merge_kernel_height == vision.merge_kernel_width,
             "Keye's config has one spatial_merge_size: set model.vision.merge_kernel_height "
             "equal to merge_kernel_width")
    _require(vision.rope_theta == VISION_ROPE_THETA,
             f"model.vision.rope_theta={vision.rope_theta}: Keye's released code fixes "
             f"{VISION_ROPE_THETA} (no config field), so the export would compute other angles")
    return {
        "hidden_size": vision.hidden_size, "intermediate_size": vision.ffn_hidden_size,
        "num_hidden_layers": vision.num_layers,
        "num_attention_heads": vision.num_attention_heads, "num_channels": vision.in_channels,
        "image_size": vision.pos_emb_side * vision.patch_size, "patch_size": vision.patch_size,
        "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": vision.norm_epsilon,
        "attention_dropout": vision.attention_dropout,
        "spatial_merge_size": vision.merge_kernel_height,
    }


def token_ids_from_hf(cfg: dict[str, Any], text: dict[str, Any]) -> TokenIdsConfig:
    """bos/eos/pad from the text fields (or the top level), media ids from the top level."""
    ids = {n: _first(text.get(k, cfg.get(k))) for n, k in _DOCUMENT_KEYS.items()}
    ids.update({n: _first(cfg.get(k)) for n, k in _MEDIA_KEYS.items()})
    return TokenIdsConfig(**ids)


def model_from_hf(cfg: dict[str, Any], params_dtype: str = "fp32") -> tuple[ModelConfig, bool]:
    """(our Keye model config, rope_interleave) for a Keye-VL 1.5 ``config.json``."""
    _require(not cfg.get("quantization_config"), "a quantized Keye-VL checkpoint is not "
             "supported: convert the bf16 release")
    text = cfg.get("text_config") or cfg
    _require("vision_config" in cfg, "config.json has no vision_config (a Keye-VL 1.5 config "
             "has SigLIP's fields there)")
    llm = llm_from_hf(text)
    vision = vision_from_hf(cfg["vision_config"])
    projector = KeyeMergerConfig(vision_hidden_size=vision.hidden_size,
                                 merge_size=vision.merge_size, output_size=llm.hidden_size,
                                 norm_epsilon=MERGER_NORM_EPS)
    model = ModelConfig(family="keye", llm=llm, vision=vision, projector=projector,
                        params_dtype=params_dtype, token_ids=token_ids_from_hf(cfg, text))
    return model, True


def model_to_hf(model: ModelConfig, dtype: str, token_ids: TokenIdsConfig) -> dict[str, Any]:
    """The flat Keye-VL 1.5 ``config.json`` (module docstring): Qwen3 fields at the top level,
    ``vision_config``, the special-token ids we know (none invented)."""
    _require(model.family == "keye" and model.is_vlm,
             f"the keye_vl_1_5 export needs a Keye VLM checkpoint (model.family="
             f"{model.family!r}, vision {'set' if model.is_vlm else 'null'})")
    merger = model.projector
    _require(merger.norm_epsilon == MERGER_NORM_EPS and merger.ffn_hidden_size in (
        None, merger.input_size), f"model.projector: Keye's released merger has LayerNorm eps "
        f"{MERGER_NORM_EPS} and a {merger.input_size}-wide first linear (no config fields)")
    out = {"architectures": [ARCHITECTURE], "model_type": MODEL_TYPE, **llm_to_hf(model.llm)}
    out.update({k: getattr(token_ids, n) for n, k in {**_DOCUMENT_KEYS, **_MEDIA_KEYS}.items()
                if getattr(token_ids, n) is not None})
    out["vision_config"] = vision_to_hf(model.vision)
    out["torch_dtype"] = {"bf16": "bfloat16", "fp32": "float32"}[dtype]
    return out
