"""GLM-4.1V / GLM-4.5V ``vision_config`` (transformers 5.25 ``Glm4vVisionConfig`` /
``Glm4vMoeVisionConfig``, the same fields) <-> our ``model.vision`` and ``model.projector``.

For the family's ``config.json`` mapping (``hf_config.py``): HF's one ``vision_config`` holds both
our tower and our projector (the downsample and merger live in HF's vision model). Two widths are
tied in HF and separate here: ``out_hidden_size`` is the blocks' SwiGLU width *and* the
downsample / merger / LLM width; export refuses ours when they differ.

Fixed in transformers' code, not in the config: the merger's LayerNorm eps (``nn.LayerNorm``
default 1e-5) and ``hidden_act`` ``silu`` for both SwiGLUs (import refuses another).
"""

from __future__ import annotations

from typing import Any

from megatron_vlm.convert.rules import ConversionError
from megatron_vlm.families.glm.config import GlmMergerConfig, GlmVisionConfig

MERGER_NORM_EPS = 1e-5
"""``Glm4vVisionPatchMerger.post_projection_norm``: ``nn.LayerNorm(dim)``'s default eps."""


def _square(value: Any, name: str) -> int:
    """An int, or a list/tuple of equal ints (transformers allows ``[14, 14]``)."""
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise ConversionError(f"vision_config.{name}={value}: only square sizes are "
                                  "supported")
        value = value[0]
    return int(value)


def vision_from_hf(hf: dict[str, Any]) -> tuple[GlmVisionConfig, GlmMergerConfig]:
    """Our tower and projector configs from a GLM ``vision_config`` dict."""
    if hf.get("hidden_act", "silu") != "silu":
        raise ConversionError(f"vision_config.hidden_act={hf['hidden_act']!r}: the Glm4v tower "
                              "and merger are SwiGLU (silu)")
    rope = dict(hf.get("rope_parameters") or {})
    if rope.get("rope_type", "axial") != "axial":
        raise ConversionError(f"vision_config.rope_parameters.rope_type={rope['rope_type']!r}: "
                              "the Glm4v tower uses axial 2D RoPE")
    patch = _square(hf.get("patch_size", 14), "patch_size")
    image = _square(hf.get("image_size", 336), "image_size")
    if image % patch:
        raise ConversionError(f"vision_config.image_size={image} is not a multiple of "
                              f"patch_size={patch}")
    merge = int(hf.get("spatial_merge_size", 2))
    hidden, out = int(hf.get("hidden_size", 1536)), int(hf.get("out_hidden_size", 4096))
    vision = GlmVisionConfig(
        hidden_size=hidden, num_layers=int(hf.get("depth", 24)),
        num_attention_heads=int(hf.get("num_heads", 12)), ffn_hidden_size=out,
        patch_size=patch, temporal_patch_size=_square(hf.get("temporal_patch_size", 2),
                                                      "temporal_patch_size"),
        in_channels=int(hf.get("in_channels", 3)), pos_emb_side=image // patch,
        rope_theta=float(rope.get("rope_theta", 10000.0)), merge_kernel_height=merge,
        merge_kernel_width=merge, norm_epsilon=float(hf.get("rms_norm_eps", 1e-5)),
        attention_bias=bool(hf.get("attention_bias", False)),
        init_method_std=float(hf.get("initializer_range", 0.02)),
        attention_dropout=float(hf.get("attention_dropout", 0.0)),
    )
    projector = GlmMergerConfig(
        vision_hidden_size=hidden, merge_size=merge * merge, output_size=out,
        ffn_hidden_size=int(hf.get("intermediate_size", 13696)), norm_epsilon=MERGER_NORM_EPS,
        init_method_std=vision.init_method_std,
    )
    return vision, projector


def vision_to_hf(vision: GlmVisionConfig, projector: GlmMergerConfig) -> dict[str, Any]:
    """The ``vision_config`` dict transformers builds ``Glm4v(Moe)VisionConfig`` from."""
    if vision.ffn_hidden_size != projector.output_size:
        raise ConversionError(
            f"model.vision.ffn_hidden_size={vision.ffn_hidden_size} != model.projector."
            f"output_size={projector.output_size}: HF's Glm4v has one out_hidden_size for both; "
            "set them equal to export")
    if projector.norm_epsilon != MERGER_NORM_EPS:
        raise ConversionError(f"model.projector.norm_epsilon={projector.norm_epsilon}: HF's "
                              f"merger LayerNorm is fixed at {MERGER_NORM_EPS}")
    return {
        "depth": vision.num_layers, "hidden_size": vision.hidden_size, "hidden_act": "silu",
        "attention_bias": vision.attention_bias, "attention_dropout": vision.attention_dropout,
        "num_heads": vision.num_attention_heads, "in_channels": vision.in_channels,
        "image_size": vision.pos_emb_side * vision.patch_size, "patch_size": vision.patch_size,
        "rms_norm_eps": vision.norm_epsilon, "spatial_merge_size": vision.merge_kernel_height,
        "temporal_patch_size": vision.temporal_patch_size,
        "out_hidden_size": projector.output_size,
        "intermediate_size": projector.ffn_hidden_size,
        "initializer_range": vision.init_method_std,
        "rope_parameters": {"rope_type": "axial", "rope_theta": vision.rope_theta},
    }
