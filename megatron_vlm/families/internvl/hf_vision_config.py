"""InternVL3.5 ``config.json`` (transformers 5.25 ``InternVLConfig`` layout, the ``-HF``
checkpoints) <-> our ``model.vision`` and ``model.projector``.

For the family's ``config.json`` mapping: the tower is HF's ``vision_config``; the projector's
facts sit at the top level (``downsample_ratio``, ``projector_hidden_act``) and its width is the
text model's ``hidden_size``. Supported is what InternVL3.5 runs: the last layer's output
(``vision_feature_layer = -1``), CLS dropped (``vision_feature_select_strategy = 'default'``), no
final norm (``use_mean_pooling``), learned absolute positions, exact GELU; import refuses the
rest with the field's name.

Fixed in transformers' code, not in the config: ``mlp1``'s LayerNorm eps (``nn.LayerNorm``
default 1e-5) and the q/k norms' eps (1e-6, ``vision.QK_NORM_EPSILON``).
"""

from __future__ import annotations

from typing import Any

from megatron_vlm.convert.rules import ConversionError
from megatron_vlm.families.internvl.config import InternVisionConfig, InternVLProjectorConfig

PROJECTOR_NORM_EPS = 1e-5
"""``InternVLMultiModalProjector.layer_norm``: ``nn.LayerNorm(dim)``'s default eps."""
FIXED_TOP_LEVEL = {"vision_feature_layer": -1, "vision_feature_select_strategy": "default",
                   "projector_hidden_act": "gelu"}
"""Top-level ``InternVLConfig`` fields whose other values our tower / projector cannot run."""
FIXED_VISION = {"hidden_act": "gelu", "use_mean_pooling": True,
                "use_absolute_position_embeddings": True}
"""``vision_config`` fields likewise (``use_mean_pooling`` false adds a final LayerNorm)."""


def _square(value: Any, name: str) -> int:
    """An int, or a list/tuple of equal ints (transformers stores ``[448, 448]``)."""
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise ConversionError(f"vision_config.{name}={value}: only square sizes are "
                                  "supported")
        value = value[0]
    return int(value)


def _check_fixed(hf: dict[str, Any], fixed: dict[str, Any], where: str) -> None:
    for key, value in fixed.items():
        if hf.get(key, value) != value:
            raise ConversionError(f"{where}{key}={hf[key]!r}: InternVL3.5's tower and projector "
                                  f"run {key}={value!r} only")


def vision_from_hf(hf: dict[str, Any], llm_hidden_size: int
                   ) -> tuple[InternVisionConfig, InternVLProjectorConfig]:
    """Our tower and projector from a whole ``InternVLConfig`` dict (``vision_config`` and the
    top-level projector fields) and the LLM width (``text_config.hidden_size``)."""
    _check_fixed(hf, FIXED_TOP_LEVEL, "")
    vc = dict(hf.get("vision_config") or {})
    _check_fixed(vc, FIXED_VISION, "vision_config.")
    ratio = float(hf.get("downsample_ratio", 0.5))
    merge = round(1 / ratio)
    if abs(merge * ratio - 1.0) > 1e-9:
        raise ConversionError(f"downsample_ratio={ratio}: pixel shuffle needs 1 / an integer "
                              "(InternVL3.5: 0.5)")
    patch = _square(vc.get("patch_size", 14), "patch_size")
    image = _square(vc.get("image_size", 448), "image_size")
    if image % patch:
        raise ConversionError(f"vision_config.image_size={image} is not a multiple of "
                              f"patch_size={patch}")
    vision = InternVisionConfig(
        hidden_size=int(vc.get("hidden_size", 1024)),
        num_layers=int(vc.get("num_hidden_layers", 24)),
        num_attention_heads=int(vc.get("num_attention_heads", 16)),
        ffn_hidden_size=int(vc.get("intermediate_size", 4096)), patch_size=patch,
        in_channels=int(vc.get("num_channels", 3)), pos_emb_side=image // patch,
        norm_type=vc.get("norm_type", "layer_norm"),
        norm_epsilon=float(vc.get("layer_norm_eps", 1e-6)),
        qkv_bias=bool(vc.get("attention_bias", False)),
        qk_norm=bool(vc.get("use_qk_norm", False)),
        layer_scale_init=float(vc.get("layer_scale_init_value", 0.1)),
        merge_kernel_height=merge, merge_kernel_width=merge,
        init_method_std=float(vc.get("initializer_range", 0.02)),
        attention_dropout=float(vc.get("attention_dropout", 0.0)),
        hidden_dropout=float(vc.get("hidden_dropout_prob", 0.0)),
    )  # parallel_mode: the recipe's choice (HF has none); default split
    projector = InternVLProjectorConfig(
        vision_hidden_size=vision.hidden_size, merge_size=vision.merge_size,
        output_size=llm_hidden_size, norm_epsilon=PROJECTOR_NORM_EPS,
        init_method_std=vision.init_method_std)
    return vision, projector


def vision_to_hf(vision: InternVisionConfig, projector: InternVLProjectorConfig
                 ) -> dict[str, Any]:
    """The top-level ``InternVLConfig`` fields of the tower and projector: ``vision_config``
    (the dict transformers builds ``InternVLVisionConfig`` from), ``downsample_ratio`` and the
    fixed ones; the caller adds ``text_config``."""
    if projector.norm_epsilon != PROJECTOR_NORM_EPS:
        raise ConversionError(f"model.projector.norm_epsilon={projector.norm_epsilon}: HF's "
                              f"mlp1 LayerNorm is fixed at {PROJECTOR_NORM_EPS}")
    side = vision.pos_emb_side * vision.patch_size
    vision_config = {
        "hidden_size": vision.hidden_size, "num_hidden_layers": vision.num_layers,
        "num_attention_heads": vision.num_attention_heads,
        "intermediate_size": vision.ffn_hidden_size, "num_channels": vision.in_channels,
        "image_size": [side, side], "patch_size": [vision.patch_size, vision.patch_size],
        "norm_type": vision.norm_type, "layer_norm_eps": vision.norm_epsilon,
        "attention_bias": vision.qkv_bias, "use_qk_norm": vision.qk_norm,
        "layer_scale_init_value": vision.layer_scale_init,
        "initializer_range": vision.init_method_std,
        "attention_dropout": vision.attention_dropout,
        "hidden_dropout_prob": vision.hidden_dropout, **FIXED_VISION,
    }
    return {"vision_config": vision_config, "downsample_ratio": 1 / vision.merge_kernel_height,
            **FIXED_TOP_LEVEL}
