"""HF ``config.json`` <-> our model config, field by field, refusing what we cannot reproduce.

Accepted: transformers 5.23 names (``Kimi_K25Config``, ``DeepseekV3Config``, ``SiglipVisionConfig``)
and the release / remote-code names where they differ (K2.5's ``vt_*``, ``init_pos_emb_*``,
``projector_ln_eps``, text ``model_type: kimi_k2``; Kimi-VL's ``moonvit`` vision config; RoPE as
``rope_scaling`` + ``rope_theta`` or as ``rope_parameters``).

YaRN (SPEC §2): megatron computes the published formula (cos/sin x mscale(s, m) / mscale(s, m'),
softmax x mscale(s, m')^2, mscale(s, 0) = 1). transformers 5.23 uses ``attention_factor`` when
given, else mscale(s, m)/mscale(s, m') when *both* m and m' are non-zero, else mscale(s, 1); its
softmax factor is mscale(s, m')^2 only for non-zero m'. Import solves for the m that gives HF's
cos/sin factor; export writes ``attention_factor`` whenever HF's implicit value would differ.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from megatron_vlm.config.model import LLMConfig, ModelConfig, TokenIdsConfig, YarnConfig
from megatron_vlm.config.vision import ProjectorConfig, VisionConfig
from megatron_vlm.convert.int4 import check_quantization_config, quantization_config
from megatron_vlm.convert.rules import ConversionError
from megatron_vlm.convert.tables import Family, family_of

IMAGE_TOKEN_ID = 163605
VIDEO_TOKEN_ID = 163840
VISION_START_TOKEN_ID = 163602
VISION_END_TOKEN_ID = 163604
KIMI_K25_MEDIA_DEFAULTS = {"image": IMAGE_TOKEN_ID, "video": VIDEO_TOKEN_ID,
                           "media_begin": VISION_START_TOKEN_ID, "media_end": VISION_END_TOKEN_ID}
"""``Kimi_K25Config``'s default media ids (Kimi's tokenizer): what an export writes for a model
whose ids are known neither from its config nor from its tokenizer."""
_HF_MEDIA_KEYS = {"image": "image_token_id", "video": "video_token_id",
                  "media_begin": "vision_start_token_id", "media_end": "vision_end_token_id"}
_HF_DOCUMENT_KEYS = {"bos": "bos_token_id", "eos": "eos_token_id", "pad": "pad_token_id"}


def read_config(hf_dir: Path) -> dict[str, Any]:
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise ConversionError(f"no config.json in {hf_dir}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConversionError(f"corrupt {path}: {e}") from e


def architecture_of(cfg: dict[str, Any]) -> Family:
    archs = cfg.get("architectures") or []
    if len(archs) != 1:
        raise ConversionError(f"config.json must name exactly one architecture, found {archs}")
    return family_of(archs[0])


def mscale(s: float, m: float) -> float:
    return 1.0 if s <= 1 else 0.1 * m * math.log(s) + 1.0


def _pick(cfg: dict[str, Any], *names: str, default: Any = None) -> Any:
    for n in names:
        if cfg.get(n) is not None:
            return cfg[n]
    return default


HF_MLA_LATENT_NORM_EPS = 1e-6
"""eps of ``q_a_layernorm``/``kv_a_layernorm`` in transformers' DeepSeek-V3 (its RMSNorm default,
whatever ``rms_norm_eps`` says; not in the HF config)."""


def _require(cond: bool, message: str) -> None:
    if not cond:
        raise ConversionError(message)


def yarn_from_hf(text: dict[str, Any]) -> tuple[float, YarnConfig]:
    """(rope theta, our YaRN config) reproducing transformers' RoPE for this text config."""
    rp = dict(text.get("rope_parameters") or text.get("rope_scaling") or {})
    theta = float(_pick(rp, "rope_theta", default=_pick(text, "rope_theta", default=10000.0)))
    kind = rp.get("rope_type") or rp.get("type") or "default"
    if kind == "default":
        return theta, YarnConfig()
    _require(kind == "yarn", f"RoPE type {kind!r} is not supported (default or yarn)")
    _require(rp.get("truncate", True), "YaRN with truncate=false is not supported (megatron "
             "floors/ceils the correction range)")
    l0 = int(rp.get("original_max_position_embeddings") or text["max_position_embeddings"])
    s = float(rp.get("factor") or text["max_position_embeddings"] / l0)
    m, m_all, factor = rp.get("mscale"), rp.get("mscale_all_dim"), rp.get("attention_factor")
    m_all_ours = float(m_all or 0.0)
    if factor is None and m and m_all:
        m_ours = float(m)
    else:
        cos_sin = float(factor) if factor is not None else mscale(s, 1.0)
        # mscale(s, m_ours) / mscale(s, m_all_ours) = cos_sin, solved for m_ours.
        m_ours = (cos_sin * mscale(s, m_all_ours) - 1.0) / (0.1 * math.log(s)) if s > 1 else 1.0
    return theta, YarnConfig(
        factor=s, original_max_position_embeddings=l0,
        beta_fast=float(rp.get("beta_fast") or 32.0), beta_slow=float(rp.get("beta_slow") or 1.0),
        mscale=m_ours, mscale_all_dim=m_all_ours)


def yarn_to_hf(theta: float, yarn: YarnConfig) -> dict[str, Any]:
    if not yarn.enabled:
        return {"rope_type": "default", "rope_theta": theta}
    s, m, m_all = yarn.factor, yarn.mscale, yarn.mscale_all_dim
    out = {"rope_type": "yarn", "rope_theta": theta, "factor": s,
           "original_max_position_embeddings": yarn.original_max_position_embeddings,
           "beta_fast": yarn.beta_fast, "beta_slow": yarn.beta_slow,
           "mscale": m, "mscale_all_dim": m_all}
    ours = mscale(s, m) / mscale(s, m_all)
    hf_implicit = mscale(s, m) / mscale(s, m_all) if (m and m_all) else mscale(s, 1.0)
    if ours != hf_implicit:
        out["attention_factor"] = ours
    return out


def llm_from_hf(text: dict[str, Any]) -> tuple[LLMConfig, bool]:
    """(our LLM config, rope_interleave) from a DeepSeek-V3 style text config."""
    _require(text.get("hidden_act", "silu") == "silu", f"hidden_act {text.get('hidden_act')!r}: "
             "only silu (SwiGLU) is supported")
    _require(not text.get("attention_bias", False), "attention_bias=true is not supported")
    _require(text.get("scoring_func", "sigmoid") == "sigmoid",
             f"scoring_func {text.get('scoring_func')!r}: only sigmoid routing is supported")
    _require(text.get("topk_method", "noaux_tc") == "noaux_tc",
             f"topk_method {text.get('topk_method')!r}: only noaux_tc is supported")
    _require(text.get("norm_topk_prob", True), "norm_topk_prob=false is not supported")
    _require(text.get("moe_layer_freq", 1) == 1, "moe_layer_freq != 1 is not supported")
    num_layers = int(text["num_hidden_layers"])
    experts = text.get("n_routed_experts") or None
    dense = min(int(text.get("first_k_dense_replace") or 0), num_layers) if experts else num_layers
    if dense == num_layers:
        experts = None  # no MoE layer: a dense model (routing settings unused)
    topk = int(text.get("num_experts_per_tok") or 1)
    groups, group_topk = text.get("n_group"), text.get("topk_group")
    if not experts or not groups or groups == 1:
        groups = group_topk = None
    elif topk // int(group_topk) != 2:
        # HF scores a group by its top-2 experts; megatron by its top (topk // group_topk).
        raise ConversionError(
            f"n_group={groups}, topk_group={group_topk}, num_experts_per_tok={topk}: megatron "
            "scores each group by its top num_experts_per_tok // topk_group experts, HF by its "
            "top 2; they agree only when that ratio is 2")
    theta, yarn = yarn_from_hf(text)
    llm = LLMConfig(
        vocab_size=int(text["vocab_size"]), hidden_size=int(text["hidden_size"]),
        num_layers=num_layers, num_attention_heads=int(text["num_attention_heads"]),
        q_lora_rank=text.get("q_lora_rank"), kv_lora_rank=int(text["kv_lora_rank"]),
        qk_nope_head_dim=int(text["qk_nope_head_dim"]),
        qk_rope_head_dim=int(text["qk_rope_head_dim"]), v_head_dim=int(text["v_head_dim"]),
        ffn_hidden_size=int(text["intermediate_size"]), num_dense_layers=dense,
        num_experts=int(experts) if experts else None, moe_router_topk=topk,
        num_shared_experts=int(text.get("n_shared_experts") or 0),
        moe_ffn_hidden_size=int(text.get("moe_intermediate_size") or 1),
        moe_router_topk_scaling_factor=float(text.get("routed_scaling_factor", 1.0)),
        moe_router_num_groups=groups, moe_router_group_topk=group_topk,
        rope_theta=theta, yarn=yarn, norm_epsilon=float(text.get("rms_norm_eps", 1e-6)),
        mla_latent_norm_epsilon=HF_MLA_LATENT_NORM_EPS,
        untie_embeddings=not text.get("tie_word_embeddings", False),
        max_position_embeddings=int(text["max_position_embeddings"]))
    return llm, bool(text.get("rope_interleave", True))


def llm_to_hf(llm: LLMConfig) -> dict[str, Any]:
    _require(llm.mla_latent_norm_epsilon == HF_MLA_LATENT_NORM_EPS,
             f"model.llm.mla_latent_norm_epsilon={llm.mla_latent_norm_epsilon}: transformers' "
             f"DeepSeek-V3 always uses {HF_MLA_LATENT_NORM_EPS} (no config field), so the "
             "exported model would compute different logits; export needs that value")
    moe = llm.num_experts is not None
    return {
        "model_type": "deepseek_v3", "vocab_size": llm.vocab_size,
        "hidden_size": llm.hidden_size, "intermediate_size": llm.ffn_hidden_size,
        "moe_intermediate_size": llm.moe_ffn_hidden_size, "num_hidden_layers": llm.num_layers,
        "num_attention_heads": llm.num_attention_heads,
        "num_key_value_heads": llm.num_attention_heads,
        "n_shared_experts": llm.num_shared_experts if moe else 0,
        "n_routed_experts": llm.num_experts if moe else 1,
        "routed_scaling_factor": llm.moe_router_topk_scaling_factor,
        "kv_lora_rank": llm.kv_lora_rank, "q_lora_rank": llm.q_lora_rank,
        "qk_rope_head_dim": llm.qk_rope_head_dim, "v_head_dim": llm.v_head_dim,
        "qk_nope_head_dim": llm.qk_nope_head_dim,
        "n_group": llm.moe_router_num_groups or 1, "topk_group": llm.moe_router_group_topk or 1,
        "num_experts_per_tok": llm.moe_router_topk,
        "first_k_dense_replace": llm.num_dense_layers if moe else llm.num_layers,
        "norm_topk_prob": True, "hidden_act": "silu",
        "max_position_embeddings": llm.max_position_embeddings, "rms_norm_eps": llm.norm_epsilon,
        "tie_word_embeddings": not llm.untie_embeddings, "rope_interleave": True,
        "attention_bias": False, "attention_dropout": 0.0, "num_nextn_predict_layers": 0,
        "rope_parameters": yarn_to_hf(llm.rope_theta, llm.yarn),
    }


def moonvit_from_hf(vision: dict[str, Any]) -> VisionConfig:
    """K2.5 (5.23 or release ``vt_*`` names) or Kimi-VL ``moonvit`` vision config."""
    _require(_pick(vision, "hidden_act", default="gelu_pytorch_tanh") == "gelu_pytorch_tanh",
             f"vision hidden_act {vision.get('hidden_act')!r}: MoonViT uses gelu_pytorch_tanh")
    merge = _pick(vision, "merge_kernel_size", default=[2, 2])
    rope = vision.get("rope_parameters") or {}
    return VisionConfig(
        hidden_size=int(_pick(vision, "hidden_size", "vt_hidden_size", default=1152)),
        num_layers=int(_pick(vision, "num_hidden_layers", "vt_num_hidden_layers", default=27)),
        num_attention_heads=int(_pick(vision, "num_attention_heads", "vt_num_attention_heads",
                                      default=16)),
        ffn_hidden_size=int(_pick(vision, "intermediate_size", "vt_intermediate_size",
                                  default=4304)),
        patch_size=int(_pick(vision, "patch_size", default=14)),
        pos_emb_height=int(_pick(vision, "pos_emb_height", "init_pos_emb_height", default=64)),
        pos_emb_width=int(_pick(vision, "pos_emb_width", "init_pos_emb_width", default=64)),
        temporal_patch_size=int(_pick(vision, "pos_emb_time", "init_pos_emb_time", default=4)),
        merge_kernel_height=int(merge[0]), merge_kernel_width=int(merge[1]),
        rope_theta=float(rope.get("rope_theta", 10000.0)), norm_epsilon=1e-5)


def moonvit_to_hf(vision: VisionConfig) -> dict[str, Any]:
    return {
        "model_type": "kimi_k25_vision", "hidden_size": vision.hidden_size,
        "num_hidden_layers": vision.num_layers, "num_attention_heads": vision.num_attention_heads,
        "intermediate_size": vision.ffn_hidden_size, "patch_size": vision.patch_size,
        "pos_emb_height": vision.pos_emb_height, "pos_emb_width": vision.pos_emb_width,
        "pos_emb_time": vision.temporal_patch_size, "hidden_act": "gelu_pytorch_tanh",
        "merge_kernel_size": [vision.merge_kernel_height, vision.merge_kernel_width],
        "rope_parameters": {"rope_theta": vision.rope_theta, "rope_type": "axial"},
    }


def model_from_hf(cfg: dict[str, Any], family: Family,
                  params_dtype: str = "fp32") -> tuple[ModelConfig, bool]:
    """(our model config, rope_interleave) for a K2.5 / Kimi-VL / DeepSeek-V3 config, or by
    the family's own mapping (``Family.config_from_hf``)."""
    if family.config_from_hf is not None:
        return family.config_from_hf(cfg, params_dtype)
    check_quantization_config(cfg)
    if family.name == "deepseek_v3":
        llm, interleave = llm_from_hf(cfg)
        return ModelConfig(llm=llm, params_dtype=params_dtype,
                           token_ids=token_ids_from_hf(cfg, family)), interleave
    text = dict(cfg["text_config"])
    llm, interleave = llm_from_hf(text)
    vision = moonvit_from_hf(cfg.get("vision_config") or {})
    width = _pick(cfg, "projection_hidden_size", default=vision.hidden_size)
    if family.name == "kimi_k25":
        width = _pick(cfg.get("vision_config") or {}, "mm_hidden_size", default=width)
    _require(int(width) == vision.hidden_size,
             f"projection_hidden_size={width} must equal the vision hidden size "
             f"{vision.hidden_size} (it sizes the projector's per-token LayerNorm)")
    eps = float(_pick(cfg, "projection_layer_norm_eps", "projector_ln_eps",
                      default=_pick(cfg.get("vision_config") or {}, "projector_ln_eps",
                                    default=1e-5)))
    projector = ProjectorConfig(vision_hidden_size=vision.hidden_size,
                                merge_size=vision.merge_size, output_size=llm.hidden_size,
                                norm_epsilon=eps)
    return ModelConfig(llm=llm, vision=vision, projector=projector, params_dtype=params_dtype,
                       token_ids=token_ids_from_hf(cfg, family)), interleave


def _int_or_none(value: Any) -> int | None:
    # A list (generation configs allow several eos ids) keeps its first: ours is one id.
    if isinstance(value, list):
        value = value[0] if value else None
    return None if value is None else int(value)


def token_ids_from_hf(cfg: dict[str, Any], family: Family) -> TokenIdsConfig:
    """The special-token ids an HF config names (None where it names none; ``media_content``
    never is: it lives in the tokenizer alone). Document ids from ``text_config`` (K2.5,
    Kimi-VL) or the top level; Kimi-VL's image id is ``media_placeholder_token_id``."""
    text = cfg if family.name == "deepseek_v3" else (cfg.get("text_config") or {})
    ids = {name: _int_or_none(_pick(text, key, default=cfg.get(key)))
           for name, key in _HF_DOCUMENT_KEYS.items()}
    if family.name != "deepseek_v3":
        ids.update({name: _int_or_none(cfg.get(key)) for name, key in _HF_MEDIA_KEYS.items()})
        if ids["image"] is None:
            ids["image"] = _int_or_none(cfg.get("media_placeholder_token_id"))
    return TokenIdsConfig(**ids)


def model_to_hf(model: ModelConfig, family: str, dtype: str, int4_experts: bool = False,
                token_ids: TokenIdsConfig | None = None) -> dict[str, Any]:
    """config.json for ``family`` (``kimi_k25`` or ``deepseek_v3``) that transformers loads.

    ``int4_experts``: the release's ``quantization_config`` (``int4.py``), in ``text_config``
    for K2.5 as the release has it, top level for a DeepSeek-V3/K2 LLM.
    ``token_ids``: the ids to write (default ``model.token_ids``): bos/eos/pad in the text
    config where known; media ids, where unknown, ``Kimi_K25Config``'s defaults.
    """
    if family not in ("kimi_k25", "deepseek_v3"):
        from megatron_vlm.convert.tables import conversion_family

        to_hf = conversion_family(family).config_to_hf
        _require(to_hf is not None, f"export family {family!r} writes no config.json")
        _require(not int4_experts, f"--int4-experts: family {family!r} has no INT4 experts")
        return to_hf(model, dtype, token_ids if token_ids is not None else model.token_ids)
    torch_dtype = {"bf16": "bfloat16", "fp32": "float32"}[dtype]
    ids = token_ids if token_ids is not None else model.token_ids
    text = llm_to_hf(model.llm)
    text.update({key: getattr(ids, name) for name, key in _HF_DOCUMENT_KEYS.items()
                 if getattr(ids, name) is not None})
    if int4_experts:
        _require(model.llm.num_experts, "--int4-experts: the model has no routed experts")
        text["quantization_config"] = quantization_config(vlm=family == "kimi_k25")
    if family == "deepseek_v3":
        _require(not model.is_vlm, "a VLM exports as kimi_k25 (its LLM alone: --family "
                 "deepseek_v3 needs a text-only checkpoint)")
        return {"architectures": ["DeepseekV3ForCausalLM"], **text, "dtype": torch_dtype}
    _require(family == "kimi_k25", f"export family {family!r}: choose kimi_k25 or deepseek_v3")
    _require(model.is_vlm, "kimi_k25 export needs a VLM checkpoint (use --family deepseek_v3)")
    return {
        "architectures": ["Kimi_K25ForConditionalGeneration"], "model_type": "kimi_k25",
        "text_config": text, "vision_config": moonvit_to_hf(model.vision),
        "projection_hidden_size": model.vision.hidden_size,
        "projection_layer_norm_eps": model.projector.norm_epsilon,
        **{key: KIMI_K25_MEDIA_DEFAULTS[name] if getattr(ids, name) is None else getattr(ids, name)
           for name, key in _HF_MEDIA_KEYS.items()},
        "tie_word_embeddings": not model.llm.untie_embeddings, "dtype": torch_dtype,
    }


def siglip_vision_from_hf(cfg: dict[str, Any]) -> VisionConfig:
    """MoonViT shaped like a SiglipVisionModel, position table at SigLIP's native grid, RoPE off
    and SigLIP's LayerNorm eps (SPEC §2: the equality check; for MoonViT training the table is
    then resized and eps/RoPE set back)."""
    v = cfg.get("vision_config", cfg)
    _require(v.get("hidden_act", "gelu_pytorch_tanh") == "gelu_pytorch_tanh",
             f"SigLIP hidden_act {v.get('hidden_act')!r}: MoonViT uses gelu_pytorch_tanh")
    grid = int(v["image_size"]) // int(v["patch_size"])
    return VisionConfig(
        hidden_size=int(v["hidden_size"]), num_layers=int(v["num_hidden_layers"]),
        num_attention_heads=int(v["num_attention_heads"]),
        ffn_hidden_size=int(v["intermediate_size"]), patch_size=int(v["patch_size"]),
        in_channels=int(v.get("num_channels", 3)), pos_emb_height=grid, pos_emb_width=grid,
        norm_epsilon=float(v.get("layer_norm_eps", 1e-6)), rope=False)
