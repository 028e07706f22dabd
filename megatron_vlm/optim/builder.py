"""Optimizer construction: megatron-core's optimizer over DDP-wrapped model chunks."""

from __future__ import annotations

from megatron.core.optimizer import (
    MegatronOptimizer,
    OptimizerConfig,
    get_megatron_optimizer,
    get_standard_config_overrides,
)
from megatron.core.optimizer.optimizer_config import ParamKey
from megatron.core.optimizer_param_scheduler import ParamGroupOverride

from megatron_vlm.config.optim import OptimConfig


def build_optimizer_config(
    optim: OptimConfig, params_dtype: str, use_distributed_optimizer: bool
) -> OptimizerConfig:
    """Our OptimConfig -> megatron's OptimizerConfig (AdamW, fp32 main params under bf16)."""
    bf16 = params_dtype == "bf16"
    return OptimizerConfig(
        optimizer="adam",
        lr=optim.lr,
        min_lr=optim.min_lr,
        weight_decay=optim.weight_decay,
        adam_beta1=optim.adam_beta1,
        adam_beta2=optim.adam_beta2,
        adam_eps=optim.adam_eps,
        clip_grad=optim.clip_grad,
        bf16=bf16,
        fp16=False,
        params_dtype=None if not bf16 else __import__("torch").bfloat16,
        use_distributed_optimizer=use_distributed_optimizer,
        # Overlap knobs are GPU features; keep CPU/gloo runs simple and deterministic.
        overlap_param_gather_with_optimizer_step=False,
    )


# Parameter-name patterns (fnmatch, DDP names) of the VLM's modules, for per-module LRs.
MODULE_PATTERNS = {
    "vision": "*vision_tower.*",
    "projector": "*projector.*",
    "llm": "*language_model.*",
}


def module_lr_overrides(optim: OptimConfig) -> dict[ParamKey, ParamGroupOverride]:
    """Per-module learning rates: ``lr`` and ``min_lr`` times each module's multiplier."""
    mults = {"vision": optim.vision_lr_mult, "projector": optim.projector_lr_mult,
             "llm": optim.llm_lr_mult}
    return {
        ParamKey(name=MODULE_PATTERNS[name]): ParamGroupOverride(
            max_lr=optim.lr * mult, min_lr=optim.min_lr * mult)
        for name, mult in mults.items() if mult != 1.0
    }


def build_optimizer(
    optim: OptimConfig,
    model_chunks: list,
    params_dtype: str,
    use_distributed_optimizer: bool,
) -> MegatronOptimizer:
    """megatron-core optimizer over ``model_chunks`` (each wrapped in megatron DDP).

    Norm weights, biases and the router's expert bias (a buffer, never a parameter) get no weight
    decay (megatron's standard overrides exclude 1-D parameters); frozen parameters
    (``requires_grad=False``) are in no group; VLM modules get their learning-rate multipliers.
    """
    config = build_optimizer_config(optim, params_dtype, use_distributed_optimizer)
    overrides = {**get_standard_config_overrides(config), **module_lr_overrides(optim)}
    return get_megatron_optimizer(config, model_chunks, config_overrides=overrides)
