"""Muon + AdamW as one megatron-core optimizer (SPEC §2 MuonClip), with or without DP sharding.

``build_muon_optimizer`` mirrors the assembly of megatron-core 0.16.1's
``optimizer/muon.py:get_megatron_muon_optimizer`` (which needs ``emerging_optimizers``, not
installable here) around our :class:`~megatron_vlm.optim.muon.Muon`:

1. Param groups come from ``param_groups.build_param_groups``: Muon for 2-D hidden matrices,
   AdamW for the rest, megatron's scheduler keys (``max_lr``/``min_lr`` already times the
   module's ``lr_mult``, ``wd_mult``), one group per megatron group identity. Each Muon
   parameter carries its block layout (HF tensors, TP shards gathered) as an attribute.
2. Groups are aligned across all ranks (empty groups where a rank has none), as megatron's
   ``_get_param_groups`` does, because dist-checkpointing stores rank 0's param groups.
3. Up to four torch optimizers, always in this order and skipped only when empty on every rank:
   Muon (dense), Muon (routed experts), AdamW (dense), AdamW (routed experts). Experts are apart
   because their gradient statistics reduce over a different group (megatron's
   ``expt_tp_pp``); the fixed order gives every layout the same checkpoint structure.
4. Without DP sharding: each is wrapped in megatron's ``FP32Optimizer`` (fp32 params) or
   ``Float16OptimizerWithFloat16Params`` (bf16 params, fp32 master weights; our
   checkpointable subclass, ``megatron_wrappers.py``) and chained.
   With ``layer_wise=True`` (``parallel.use_distributed_optimizer``): megatron's
   ``LayerWiseDistributedOptimizer`` (each DP rank owns whole parameters, steps them, then
   all-gathers; ``megatron_wrappers.LayerWiseMuonOptimizer``); the fp32 masters are made after
   sharding, so each rank keeps masters of its own parameters only, as in megatron's assembly.
   Megatron DDP must all-reduce gradients (``DistributedDataParallelConfig(
   use_distributed_optimizer=False)``): every owner needs whole, reduced gradients.

The result is a ``MegatronOptimizer``: ``prepare_grads``, ``get_grad_norm``, clipping, ``step``,
``OptimizerParamScheduler`` (it walks ``param_groups`` of all four) and ``sharded_state_dict``
work as for AdamW.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist
from megatron.core.optimizer import ChainedOptimizer, MegatronOptimizer, OptimizerConfig
from megatron.core.process_groups_config import ProcessGroupCollection
from torch import nn

from megatron_vlm.config.optim import OptimConfig
from megatron_vlm.optim.megatron_wrappers import LayerWiseMuonOptimizer, wrap_optimizer
from megatron_vlm.optim.muon import Muon
from megatron_vlm.optim.param_groups import build_param_groups
from megatron_vlm.parallel import comm
from megatron_vlm.parallel.runtime import groups_or_default

_ORDER = (("muon", False), ("muon", True), ("adamw", False), ("adamw", True))
"""The chained optimizers, in order: (kind, routed experts)."""


def muon_init_state_fn(opt: torch.optim.Optimizer, config=None) -> None:
    """Allocate the state a Muon step would (megatron calls it before loading a checkpoint)."""
    for group in opt.param_groups:
        for p in group["params"]:
            if len(opt.state[p]) == 0:
                opt.state[p]["momentum_buffer"] = torch.zeros_like(p.data)


def adamw_init_state_fn(opt: torch.optim.Optimizer, config=None) -> None:
    """megatron's torch-Adam state allocation (``optimizer/__init__.py`` init_state_fn)."""
    for group in opt.param_groups:
        for p in group["params"]:
            if len(opt.state[p]) == 0:
                opt.state[p]["exp_avg"] = torch.zeros_like(p.data)
                opt.state[p]["exp_avg_sq"] = torch.zeros_like(p.data)


_INIT_STATE = {"muon": muon_init_state_fn, "adamw": adamw_init_state_fn}


def _identity(kind: str, group: dict) -> tuple:
    """Group identity: optimizer, routed experts, then megatron's identifier keys."""
    return (kind, group["is_expert_parallel"], group["lr_mult"], group["wd_mult"])


def _sort_key(identity: tuple) -> tuple:
    kind, expert, mult, wd_mult = identity
    # Default-LR groups first: the trainer logs param_groups[0]["lr"].
    return (_ORDER.index((kind, expert)), mult != 1.0, mult, -wd_mult)


def _empty_group(identity: tuple, optim: OptimConfig) -> dict:
    kind, expert, mult, wd_mult = identity
    return {"params": [], "lr": optim.lr * mult, "max_lr": optim.lr * mult,
            "min_lr": optim.min_lr * mult, "lr_mult": mult,
            "weight_decay": optim.weight_decay * wd_mult, "wd_mult": wd_mult,
            "is_expert_parallel": expert, "is_decoupled_lr": False,
            "default_config": mult == 1.0}


def collect_param_groups(
    optim: OptimConfig, model_chunks: list[nn.Module], lr_mult: Callable[[str], float] | None
) -> dict[tuple, dict]:
    """Muon/AdamW groups of all chunks, merged by identity and aligned across ranks."""
    groups: dict[tuple, dict] = {}
    for chunk in model_chunks:
        found = build_param_groups(
            chunk, lr=optim.lr, min_lr=optim.min_lr, weight_decay=optim.weight_decay,
            lr_mult=lr_mult, router_in_muon=optim.muon_router, gathered=True,
            layouts_on_params=True)
        for kind, kind_groups in (("muon", found.muon), ("adamw", found.adamw)):
            for group in kind_groups:
                identity = _identity(kind, group)
                if identity in groups:
                    groups[identity]["params"] += group["params"]
                else:
                    groups[identity] = group
    identities = list(groups)
    if dist.is_initialized() and dist.get_world_size() > 1:
        everyone: list[list[tuple] | None] = [None] * dist.get_world_size()
        comm.all_gather_object(everyone, identities)
        identities = sorted({i for part in everyone for i in part}, key=_sort_key)
    else:
        identities = sorted(identities, key=_sort_key)
    return {i: groups.get(i) or _empty_group(i, optim) for i in identities}


def _torch_optimizer(kind: str, groups: list[dict], optim: OptimConfig,
                     pgs: ProcessGroupCollection) -> torch.optim.Optimizer:
    if kind == "muon":
        return Muon(groups, lr=optim.lr, weight_decay=optim.weight_decay,
                    momentum=optim.muon_momentum, nesterov=optim.muon_nesterov,
                    ns_steps=optim.muon_ns_steps, adjust_lr_fn=optim.muon_scale,
                    ns_dtype=torch.bfloat16 if optim.muon_ns_dtype == "bf16" else torch.float32,
                    tp_group=pgs.tp, expert_tp_group=pgs.expt_tp)
    return torch.optim.AdamW(groups, lr=optim.lr, weight_decay=optim.weight_decay,
                             betas=(optim.adam_beta1, optim.adam_beta2), eps=optim.adam_eps)


def _propagate_layouts(optimizer: MegatronOptimizer) -> None:
    """fp32 master weights inherit their model parameter's ``muon_layout`` (megatron copies only
    the tensor-parallel attributes, ``copy_tensor_model_parallel_attributes``)."""
    for opt in getattr(optimizer, "chained_optimizers", [optimizer]):
        for model_group, main_group in zip(getattr(opt, "float16_groups", []),
                                           getattr(opt, "fp32_from_float16_groups", [])):
            for model_param, main_param in zip(model_group, main_group):
                layout = getattr(model_param, "muon_layout", None)
                if layout is not None:
                    main_param.muon_layout = layout


def build_muon_optimizer(
    optim: OptimConfig,
    model_chunks: list[nn.Module],
    config: OptimizerConfig,
    *,
    layer_wise: bool,
    lr_mult: Callable[[str], float] | None = None,
    pg_collection: ProcessGroupCollection | None = None,
) -> MegatronOptimizer:
    """Muon + AdamW over ``model_chunks`` (each wrapped in megatron DDP), see the module doc.

    Args:
        optim: our optimizer config (lr, weight decay, Muon and AdamW hyperparameters).
        model_chunks: this rank's DDP-wrapped chunks; frozen parameters are left out.
        config: megatron ``OptimizerConfig`` (bf16, clip_grad); must not ask for megatron's
            flat DistributedOptimizer.
        layer_wise: shard whole parameters over DP (``LayerWiseMuonOptimizer``).
        lr_mult: per-parameter-name LR multiplier (the VLM's per-module LRs).
        pg_collection: the run's process groups (None: :func:`~megatron_vlm.parallel.runtime.
            groups_or_default`'s).
    """
    if config.use_distributed_optimizer:
        raise ValueError(
            "Muon cannot run on megatron's flat DistributedOptimizer (it cuts matrices into 1-D "
            "shards, Megatron-LM #2164); build_muon_optimizer(layer_wise=True) shards whole "
            "parameters instead")
    for chunk in model_chunks:
        ddp_config = getattr(chunk, "ddp_config", None)
        if ddp_config is not None and ddp_config.use_distributed_optimizer:
            raise ValueError(
                "optim.optimizer=muon needs megatron DDP to all-reduce whole gradients, but the "
                "model chunks were wrapped with DistributedDataParallelConfig("
                "use_distributed_optimizer=True) (reduce-scatter into flat shards). Wrap them "
                "with use_distributed_optimizer=False; parallel.use_distributed_optimizer=true "
                "then selects the layer-wise (whole-parameter) Muon sharding")
    pgs = groups_or_default(pg_collection, required=True)
    groups = collect_param_groups(optim, model_chunks, lr_mult)
    optimizers, init_fns, kinds = [], [], []
    for kind, expert in _ORDER:
        mine = [g for (k, e, *_), g in groups.items() if (k, e) == (kind, expert)]
        if mine:
            optimizers.append(_torch_optimizer(kind, mine, optim, pgs))
            init_fns.append(_INIT_STATE[kind])
            kinds.append((kind, expert))

    if layer_wise:
        result: MegatronOptimizer = LayerWiseMuonOptimizer(optimizers, config, pgs, init_fns)
    else:
        wrapped = []
        for opt, init_fn, (_, expert) in zip(optimizers, init_fns, kinds):
            w = wrap_optimizer(opt, config, init_fn)
            # As megatron's builder: gradient statistics of routed experts reduce over
            # expert-TP x EP x PP, the rest over TP x PP (optimizer/__init__.py).
            w.grad_stats_parallel_group = pgs.tp_ep_pp if expert else pgs.mp
            w.tp_group = pgs.expt_tp if expert else pgs.tp
            wrapped.append(w)
        result = ChainedOptimizer(wrapped)
    _propagate_layouts(result)
    return result
