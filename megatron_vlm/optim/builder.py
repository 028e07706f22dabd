"""Optimizer construction: megatron-core's optimizer over DDP-wrapped model chunks.

``optim.optimizer="adamw"``: megatron's ``get_megatron_optimizer`` (its DistributedOptimizer
with ``parallel.use_distributed_optimizer``). ``"muon"``: Muon + AdamW chained, layer-wise
sharded with ``parallel.use_distributed_optimizer`` (``muon_optimizer.py``).
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable

from megatron.core.optimizer import (
    Float16OptimizerWithFloat16Params,
    MegatronOptimizer,
    OptimizerConfig,
    get_megatron_optimizer,
    get_standard_config_overrides,
)
from megatron.core.optimizer.optimizer_config import ParamKey
from megatron.core.optimizer_param_scheduler import ParamGroupOverride

from megatron_vlm.config.optim import OptimConfig
from megatron_vlm.optim.megatron_wrappers import MixedFloat16Optimizer
from megatron_vlm.optim.muon_optimizer import build_muon_optimizer
from megatron_vlm.optim.qk_clip import mla_attentions
from megatron_vlm.parallel.runtime import groups_or_default


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


def _module_mults(optim: OptimConfig) -> dict[str, float]:
    return {"vision": optim.vision_lr_mult, "projector": optim.projector_lr_mult,
            "llm": optim.llm_lr_mult}


def module_lr_overrides(optim: OptimConfig) -> dict[ParamKey, ParamGroupOverride]:
    """Per-module learning rates: ``lr`` and ``min_lr`` times each module's multiplier.

    ``lr_mult`` is set too although megatron's scheduler reads only ``max_lr``/``min_lr``: on
    checkpoint load megatron matches saved param groups to live ones by ``(wd_mult, lr_mult,
    is_expert_parallel, is_decoupled_lr)`` (``optimizer.py:_filter_and_reorder_param_groups``);
    groups differing only in ``max_lr`` would share an identity and be given one saved group.
    """
    return {
        ParamKey(name=MODULE_PATTERNS[name]): ParamGroupOverride(
            max_lr=optim.lr * mult, min_lr=optim.min_lr * mult, lr_mult=mult)
        for name, mult in _module_mults(optim).items() if mult != 1.0
    }


def module_lr_mult(optim: OptimConfig) -> Callable[[str], float]:
    """The same per-module multipliers as a parameter-name hook (for the Muon param groups):
    the multiplier of the module whose ``MODULE_PATTERNS`` entry matches, else 1."""
    mults = [(MODULE_PATTERNS[name], mult) for name, mult in _module_mults(optim).items()]

    def lr_mult(name: str) -> float:
        for pattern, mult in mults:
            if fnmatch.fnmatchcase(name, pattern):
                return mult
        return 1.0

    return lr_mult


def _check_qk_clip(model_chunks: list, flat_sharded: bool) -> None:
    clipped = any(a.config.qk_clip for a in mla_attentions(model_chunks))
    if clipped and flat_sharded:
        raise ValueError(
            "model.llm.qk_clip rescales whole per-head rows of the fp32 master weights, which "
            "megatron's flat DistributedOptimizer cuts into 1-D shards: with "
            "parallel.use_distributed_optimizer=true use optim.optimizer=muon (layer-wise "
            "sharding of whole parameters), or set parallel.use_distributed_optimizer=false")


def build_optimizer(
    optim: OptimConfig,
    model_chunks: list,
    params_dtype: str,
    use_distributed_optimizer: bool,
    pg_collection=None,
) -> MegatronOptimizer:
    """megatron-core optimizer over ``model_chunks`` (each wrapped in megatron DDP), on
    ``pg_collection`` (the run's groups; None: :func:`~megatron_vlm.parallel.runtime.
    groups_or_default`'s).

    Norm weights, biases and the router's expert bias (a buffer, never a parameter) get no weight
    decay (megatron's standard overrides exclude 1-D parameters); frozen parameters
    (``requires_grad=False``) are in no group; VLM modules get their learning-rate multipliers.
    With ``optim.optimizer="muon"`` the chunks' DDP must all-reduce gradients (built with
    ``DistributedDataParallelConfig(use_distributed_optimizer=False)``), and
    ``use_distributed_optimizer`` selects layer-wise sharding.
    """
    pg_collection = groups_or_default(pg_collection, required=True)
    if optim.optimizer == "muon":
        config = build_optimizer_config(optim, params_dtype, use_distributed_optimizer=False)
        return build_muon_optimizer(optim, model_chunks, config,
                                    layer_wise=use_distributed_optimizer,
                                    lr_mult=module_lr_mult(optim), pg_collection=pg_collection)
    _check_qk_clip(model_chunks, flat_sharded=use_distributed_optimizer)
    config = build_optimizer_config(optim, params_dtype, use_distributed_optimizer)
    overrides = {**get_standard_config_overrides(config), **module_lr_overrides(optim)}
    # megatron refuses its gloo groups with an explicit pg_collection; our checkpoints never use
    # them (dp_reshardable optimizer state is saved without a gather, checkpoint/dist.py).
    optimizer = get_megatron_optimizer(config, model_chunks, config_overrides=overrides,
                                       use_gloo_process_groups=False, pg_collection=pg_collection)
    for member in getattr(optimizer, "chained_optimizers", [optimizer]):
        # bf16 without the DistributedOptimizer: megatron's Float16 wrapper cannot checkpoint
        # our fp32 norm weights; its subclass adds only the fixed (sharded_)state_dict methods.
        if type(member) is Float16OptimizerWithFloat16Params:
            member.__class__ = MixedFloat16Optimizer
    return optimizer
