"""Kimi K2.5 / Kimi-VL: ``model.vision`` is MoonViT (-3D), ``model.projector`` Kimi's projector
(``config/vision.py``, where they have always lived)."""

from megatron_vlm.config.vision import ProjectorConfig, VisionConfig

VISION_CONFIG = VisionConfig
PROJECTOR_CONFIG = ProjectorConfig
