"""Typed configuration dataclasses. Imports nothing else from the package."""

from megatron_vlm.config.checkpoint import CheckpointConfig
from megatron_vlm.config.data import DataConfig
from megatron_vlm.config.data_mm import MultimodalDataConfig, StageMix
from megatron_vlm.config.job import JobConfig, apply_overrides, from_dict, load_yaml
from megatron_vlm.config.model import (
    KernelConfig,
    LLMConfig,
    ModelConfig,
    TokenIdsConfig,
    YarnConfig,
)
from megatron_vlm.config.optim import OptimConfig
from megatron_vlm.config.parallel import ParallelConfig
from megatron_vlm.config.train import TrainConfig
from megatron_vlm.config.vision import ProjectorConfig, VisionConfig

__all__ = [
    "CheckpointConfig", "DataConfig", "JobConfig", "KernelConfig", "LLMConfig", "ModelConfig",
    "MultimodalDataConfig", "OptimConfig", "ParallelConfig", "ProjectorConfig", "StageMix",
    "TokenIdsConfig", "TrainConfig", "VisionConfig", "YarnConfig", "apply_overrides", "from_dict",
    "load_yaml",
]
