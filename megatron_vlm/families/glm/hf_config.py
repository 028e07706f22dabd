"""GLM-4.5V / GLM-4.1V ``config.json`` <-> our ``ModelConfig`` (``model.family: glm``).

The layout is transformers 5.25's (``Glm4vMoeConfig`` / ``Glm4vConfig``): ``text_config`` (the
GLM-4.5-Air MoE or GLM-4 dense text model), ``vision_config`` (tower, downsample and merger:
``hf_vision_config.py``) and the media token ids at the top level. RoPE is read from
``rope_parameters`` (5.x) or ``rope_scaling`` + ``rope_theta`` + ``partial_rotary_factor`` (the
released files); export writes ``rope_parameters``.

What the architectures fix, not the config (transformers' modules): GLM-4.5V is NeoX-style M-RoPE
(``rotate_half``), a dense first ``first_k_dense_replace`` layers with ``gate_proj``/``up_proj``,
sigmoid routing with an fp32 ``e_score_correction_bias`` (always on), no sandwich norms;
GLM-4.1V is interleaved-pair M-RoPE, a fused ``gate_up_proj``, the post-attention and post-MLP
norms, q/k/v biases always on and head dim ``hidden_size / num_attention_heads``.
``mrope_section`` defaults to ``[8, 12, 12]`` and ``partial_rotary_factor`` to 0.5 (GLM-4.5V's
config default) or 1.0 (GLM-4.1V's rotary module), as transformers reads them.

MTP: ``text_config.num_nextn_predict_layers`` (GLM-4.5 / Air's field; transformers' GLM-4.5V
does not build the layer) -> ``model.llm.mtp_num_layers``, written back when non-zero. Without
the field, a 46-layer checkpoint's layer 46 is carried unchanged (``hf_table.UNREAD_MTP_LAYER``).

Token ids: ``image_token_id``, ``video_token_id``, ``image_start_token_id``,
``image_end_token_id`` map to ``model.token_ids.{image, video, media_begin, media_end}``; bos /
eos / pad live in ``text_config``. ``video_start_token_id`` / ``video_end_token_id`` have no
field of ours: transformers 5.25 never reads them from the config (``Glm4vProcessor`` looks
``<|begin_of_video|>`` / ``<|end_of_video|>`` up by name in the tokenizer and
``get_rope_index`` takes ``mm_token_type_ids``), so import checks nothing about them and export
leaves them out (transformers' defaults, GLM's tokenizer ids, then apply).
"""

from __future__ import annotations

from typing import Any

from megatron_vlm.config.model import LLMConfig, ModelConfig, TokenIdsConfig
from megatron_vlm.convert.rules import ConversionError
from megatron_vlm.families.glm.hf_vision_config import vision_from_hf, vision_to_hf

MOE_ARCHITECTURE = "Glm4vMoeForConditionalGeneration"
"""GLM-4.5V (GLM-4.5-Air text model)."""
DENSE_ARCHITECTURE = "Glm4vForConditionalGeneration"
"""GLM-4.1V (GLM-4 9B text model)."""
ARCHITECTURES = (MOE_ARCHITECTURE, DENSE_ARCHITECTURE)
MODEL_TYPES = {MOE_ARCHITECTURE: ("glm4v_moe", "glm4v_moe_text", "glm4v_moe_vision"),
               DENSE_ARCHITECTURE: ("glm4v", "glm4v_text", "glm4v_vision")}
"""(top, text, vision) ``model_type`` of each architecture."""
DEFAULT_MROPE_SECTION = [8, 12, 12]
"""transformers' ``Glm4v(Moe)TextRotaryEmbedding`` default when the config names none."""

_DOCUMENT_KEYS = {"bos": "bos_token_id", "eos": "eos_token_id", "pad": "pad_token_id"}
_MEDIA_KEYS = {"image": "image_token_id", "video": "video_token_id",
               "media_begin": "image_start_token_id", "media_end": "image_end_token_id"}


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ConversionError(message)


def _first(value: Any) -> int | None:
    if isinstance(value, list):  # several eos ids (GLM's generation stops): ours is one
        value = value[0] if value else None
    return None if value is None else int(value)


def _rope(text: dict[str, Any], moe: bool) -> tuple[float, float, list[int]]:
    """(theta, rotary fraction, mrope_section) from ``rope_parameters`` / ``rope_scaling``."""
    rp = dict(text.get("rope_parameters") or text.get("rope_scaling") or {})
    kind = rp.get("rope_type") or rp.get("type") or "default"
    _require(kind in ("default", "mrope"), f"text_config rope type {kind!r}: GLM-4.1V/4.5V use "
             "plain M-RoPE (rope_type default); scaled RoPE is not supported")
    theta = float(rp.get("rope_theta") or text.get("rope_theta") or 10000.0)
    fraction = rp.get("partial_rotary_factor", text.get("partial_rotary_factor"))
    fraction = float((0.5 if moe else 1.0) if fraction is None else fraction)
    section = [int(x) for x in (rp.get("mrope_section") or DEFAULT_MROPE_SECTION)]
    return theta, fraction, section


def _moe_fields(text: dict[str, Any]) -> dict[str, Any]:
    """Our MoE fields from GLM-4.5-Air's."""
    _require(text.get("norm_topk_prob", True) or int(text.get("num_experts_per_tok", 8)) == 1,
             "norm_topk_prob=false is not supported (megatron normalises sigmoid top-k scores)")
    groups, topk_groups = int(text.get("n_group", 1)), int(text.get("topk_group", 1))
    return dict(
        num_dense_layers=int(text.get("first_k_dense_replace", 1)),
        num_experts=int(text.get("n_routed_experts", 128)),
        moe_router_topk=int(text.get("num_experts_per_tok", 8)),
        num_shared_experts=int(text.get("n_shared_experts", 1)),
        moe_ffn_hidden_size=int(text.get("moe_intermediate_size", 1408)),
        moe_router_score_function="sigmoid",
        moe_router_topk_scaling_factor=float(text.get("routed_scaling_factor", 1.0)),
        moe_router_num_groups=groups if groups > 1 else None,
        moe_router_group_topk=topk_groups if groups > 1 else None,
        moe_router_enable_expert_bias=True,
        mtp_num_layers=int(text.get("num_nextn_predict_layers") or 0),
    )


def llm_from_hf(text: dict[str, Any], moe: bool, tied: bool = False) -> LLMConfig:
    """Our GQA LLM from a GLM ``text_config`` (``moe``: GLM-4.5V's, else GLM-4.1V's; ``tied``:
    the top-level ``tie_word_embeddings``, which a ``text_config`` one also sets)."""
    _require(text.get("hidden_act", "silu") == "silu",
             f"text_config.hidden_act={text.get('hidden_act')!r}: GLM's MLPs are SwiGLU (silu)")
    _require(not text.get("use_qk_norm", False), "text_config.use_qk_norm=true (GLM-4.5's "
             "355B variant) is not supported: GLM-4.5V / Air have no q/k norms")
    heads, hidden = int(text["num_attention_heads"]), int(text["hidden_size"])
    head_dim = int(text.get("head_dim") or hidden // heads) if moe else hidden // heads
    if not moe and text.get("head_dim") not in (None, head_dim):
        raise ConversionError(f"text_config.head_dim={text['head_dim']}: GLM-4.1V's attention "
                              f"uses hidden_size / num_attention_heads = {head_dim}")
    layers = int(text["num_hidden_layers"])
    theta, fraction, section = _rope(text, moe)
    fields = _moe_fields(text) if moe else dict(num_dense_layers=layers, num_experts=None)
    return LLMConfig(
        attention="gqa", vocab_size=int(text["vocab_size"]), hidden_size=hidden,
        num_layers=layers, num_attention_heads=heads,
        num_query_groups=int(text.get("num_key_value_heads") or heads), kv_channels=head_dim,
        qk_layernorm=False, add_qkv_bias=bool(text.get("attention_bias", True)) if moe else True,
        ffn_hidden_size=int(text["intermediate_size"]), rope_theta=theta,
        position_embedding="mrope", mrope_section=section,
        mrope_style="neox" if moe else "interleaved", rotary_fraction=fraction,
        sandwich_norms=not moe, norm_epsilon=float(text.get("rms_norm_eps", 1e-5)),
        init_method_std=float(text.get("initializer_range", 0.02)),
        untie_embeddings=not (tied or text.get("tie_word_embeddings", False)),
        attention_dropout=float(text.get("attention_dropout", 0.0)),
        max_position_embeddings=int(text.get("max_position_embeddings", 65536 if moe else 32768)),
        **fields)


def _check_exportable(llm: LLMConfig) -> bool:
    """True for GLM-4.5V's LLM, False for GLM-4.1V's; else a ConversionError naming the key."""
    moe = llm.num_experts is not None
    _require(llm.attention == "gqa" and not llm.qk_layernorm and llm.position_embedding == "mrope",
             "a GLM export needs model.llm.attention=gqa, qk_layernorm=false, "
             "position_embedding=mrope")
    if moe:
        _require(llm.mrope_style == "neox" and not llm.sandwich_norms
                 and llm.moe_router_score_function == "sigmoid"
                 and llm.moe_router_enable_expert_bias,
                 "a GLM-4.5V (MoE) export needs model.llm.mrope_style=neox, sandwich_norms=false, "
                 "moe_router_score_function=sigmoid, moe_router_enable_expert_bias=true")
    else:
        _require(llm.mrope_style == "interleaved" and llm.sandwich_norms and llm.add_qkv_bias
                 and llm.head_dim * llm.num_attention_heads == llm.hidden_size
                 and llm.mtp_num_layers == 0,
                 "a GLM-4.1V (dense) export needs model.llm.mrope_style=interleaved, "
                 "sandwich_norms=true, add_qkv_bias=true, kv_channels = hidden_size / "
                 "num_attention_heads and mtp_num_layers=0")
    return moe


def llm_to_hf(llm: LLMConfig) -> dict[str, Any]:
    """The ``text_config`` of our GLM LLM (GLM-4.5V's when it has experts)."""
    moe = _check_exportable(llm)
    rope = {"rope_type": "default", "rope_theta": llm.rope_theta,
            "partial_rotary_factor": llm.rotary_fraction, "mrope_section": list(llm.mrope_section)}
    out: dict[str, Any] = {
        "model_type": MODEL_TYPES[MOE_ARCHITECTURE if moe else DENSE_ARCHITECTURE][1],
        "vocab_size": llm.vocab_size, "hidden_size": llm.hidden_size,
        "intermediate_size": llm.ffn_hidden_size, "num_hidden_layers": llm.num_layers,
        "num_attention_heads": llm.num_attention_heads,
        "num_key_value_heads": llm.query_groups, "hidden_act": "silu",
        "max_position_embeddings": llm.max_position_embeddings,
        "initializer_range": llm.init_method_std, "rms_norm_eps": llm.norm_epsilon,
        "rope_parameters": rope, "attention_dropout": llm.attention_dropout,
    }
    if moe:
        out.update({
            "head_dim": llm.head_dim, "attention_bias": llm.add_qkv_bias,
            "moe_intermediate_size": llm.moe_ffn_hidden_size,
            "num_experts_per_tok": llm.moe_router_topk,
            "n_shared_experts": llm.num_shared_experts, "n_routed_experts": llm.num_experts,
            "routed_scaling_factor": llm.moe_router_topk_scaling_factor,
            "n_group": llm.moe_router_num_groups or 1,
            "topk_group": llm.moe_router_group_topk or 1,
            "first_k_dense_replace": llm.num_dense_layers, "norm_topk_prob": True,
        })
        if llm.mtp_num_layers:
            out["num_nextn_predict_layers"] = llm.mtp_num_layers
    return out


def token_ids_from_hf(cfg: dict[str, Any], text: dict[str, Any]) -> TokenIdsConfig:
    """bos/eos/pad from ``text_config`` (or the top level), media ids from the top level."""
    ids = {n: _first(text.get(k, cfg.get(k))) for n, k in _DOCUMENT_KEYS.items()}
    ids.update({n: _first(cfg.get(k)) for n, k in _MEDIA_KEYS.items()})
    return TokenIdsConfig(**ids)


def model_from_hf(cfg: dict[str, Any], params_dtype: str = "fp32") -> tuple[ModelConfig, bool]:
    """(our GLM model config, rope_interleave: unused by the GQA table) for a GLM-4.5V or
    GLM-4.1V ``config.json``."""
    _require(not cfg.get("quantization_config"), "a quantized GLM checkpoint is not supported: "
             "convert the bf16 release")
    archs = cfg.get("architectures") or []
    _require(len(archs) == 1 and archs[0] in ARCHITECTURES,
             f"architectures {archs}: the GLM table converts one of {list(ARCHITECTURES)}")
    _require(isinstance(cfg.get("text_config"), dict) and isinstance(cfg.get("vision_config"),
                                                                     dict),
             "a GLM config.json has text_config and vision_config sections")
    text = cfg["text_config"]
    llm = llm_from_hf(text, moe=archs[0] == MOE_ARCHITECTURE,
                      tied=bool(cfg.get("tie_word_embeddings", False)))
    vision, projector = vision_from_hf(cfg["vision_config"])
    _require(projector.output_size == llm.hidden_size,
             f"vision_config.out_hidden_size={projector.output_size} != text_config.hidden_size="
             f"{llm.hidden_size}: the merger writes LLM-width rows")
    model = ModelConfig(family="glm", llm=llm, vision=vision, projector=projector,
                        params_dtype=params_dtype, token_ids=token_ids_from_hf(cfg, text))
    return model, True


def model_to_hf(model: ModelConfig, dtype: str, token_ids: TokenIdsConfig) -> dict[str, Any]:
    """The ``config.json`` transformers builds ``Glm4v(Moe)ForConditionalGeneration`` from (the
    MoE architecture for an LLM with experts), with the token ids we know (none invented)."""
    _require(model.family == "glm" and model.is_vlm,
             f"the glm4v export needs a GLM VLM checkpoint (model.family={model.family!r}, "
             f"vision {'set' if model.is_vlm else 'null'})")
    text = llm_to_hf(model.llm)
    arch = MOE_ARCHITECTURE if model.llm.num_experts is not None else DENSE_ARCHITECTURE
    top, _, vision_type = MODEL_TYPES[arch]
    text.update({k: getattr(token_ids, n) for n, k in _DOCUMENT_KEYS.items()
                 if getattr(token_ids, n) is not None})
    out = {"architectures": [arch], "model_type": top, "text_config": text,
           "vision_config": {"model_type": vision_type,
                             **vision_to_hf(model.vision, model.projector)}}
    out.update({k: getattr(token_ids, n) for n, k in _MEDIA_KEYS.items()
                if getattr(token_ids, n) is not None})
    out["tie_word_embeddings"] = not model.llm.untie_embeddings
    out["dtype"] = {"bf16": "bfloat16", "fp32": "float32"}[dtype]
    return out
