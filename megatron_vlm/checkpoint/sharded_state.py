"""Model and optimizer state as megatron sharded state dicts, and the optimizer fix-ups around them.

``sharded_state_dict`` builds the ``{"model" | "model0".., "optimizer"}`` dict that ``dist.py``
saves and loads; models are seen only through ``sharded_state_dict``/``load_state_dict`` and
megatron's DDP / Float16Module wrappers (``unwrap``).

megatron-core 0.16.1 without Apex/TE (the CPU path) needs two DistributedOptimizer workarounds,
detailed in each function's docstring:

* ``allocate_distributed_optimizer_state``: ``DistributedOptimizer.sharded_state_dict(
  is_loading=True)`` reads ``step`` from every parameter's state (``distrib_optimizer.py:641``),
  so an optimizer that has not stepped first gets the state a loaded one will overwrite.
* ``fix_distributed_optimizer_steps``: ``load_state_dict`` shares one step tensor across all
  parameters (``distrib_optimizer.py:825``) and the ``dp_reshardable`` load copies the pre-load
  step over it (``distrib_optimizer.py:1664``, ``:940``); each parameter gets its own restored step.
"""

from __future__ import annotations

from typing import Any

import torch


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The bare megatron module inside DDP / Float16Module wrappers."""
    from megatron.core.distributed import DistributedDataParallel
    from megatron.core.transformer.module import Float16Module

    while isinstance(model, (DistributedDataParallel, Float16Module)):
        model = model.module
    return model


def model_keys(num_chunks: int) -> list[str]:
    return ["model"] if num_chunks == 1 else [f"model{i}" for i in range(num_chunks)]


def sharded_state_dict(
    model_chunks: list, optimizer, metadata: dict, is_loading: bool
) -> dict[str, Any]:
    """``{"model" | "model0".., "optimizer"}`` sharded state dicts built from the live objects."""
    chunks = [unwrap(m) for m in model_chunks]
    state: dict[str, Any] = {
        key: chunk.sharded_state_dict(metadata=dict(metadata))
        for key, chunk in zip(model_keys(len(chunks)), chunks)
    }
    if optimizer is not None:
        state["optimizer"] = optimizer.sharded_state_dict(
            dict(state), is_loading=is_loading, metadata=dict(metadata)
        )
    return state


def uses_distributed_optimizer(optimizer) -> bool:
    from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer

    if optimizer is None:
        return False
    inner = getattr(optimizer, "chained_optimizers", [optimizer])
    return any(isinstance(o, DistributedOptimizer) for o in inner)


def optimizer_has_state(optimizer) -> bool:
    """Whether the (inner torch) optimizer(s) hold per-parameter state, i.e. have stepped."""
    if optimizer is None:
        return False
    inner = getattr(optimizer, "chained_optimizers", [optimizer])
    return any(len(getattr(o, "optimizer", o).state) > 0 for o in inner)


def allocate_distributed_optimizer_state(optimizer) -> None:
    """Give a DistributedOptimizer that has not stepped the state a loaded one will overwrite.

    Workaround for megatron-core 0.16.1 without Apex/TE (the CPU path):
    ``DistributedOptimizer.sharded_state_dict(is_loading=True)`` first calls ``state_dict()``,
    which reads ``step`` from every parameter's state (``distrib_optimizer.py:641``) and fails
    on an optimizer that has none. We allocate what torch Adam would have before its first step
    (``init_state_fn``'s zero moments, ``step = 0``); the checkpoint then overwrites all of it.
    """
    from megatron.core.optimizer import distrib_optimizer

    if distrib_optimizer.HAVE_APEX_OR_TE:
        return
    for o in getattr(optimizer, "chained_optimizers", [optimizer]):
        if not isinstance(o, distrib_optimizer.DistributedOptimizer) or len(o.optimizer.state):
            continue
        o.init_state_fn(o.optimizer, o.config)
        for group in o.optimizer.param_groups:
            for p in group["params"]:
                o.optimizer.state[p]["step"] = torch.tensor(0.0)


def fix_distributed_optimizer_steps(optimizer) -> None:
    """Give every parameter its own, restored Adam ``step`` after a DistributedOptimizer load.

    Workaround for megatron-core 0.16.1 without Apex/TE: ``DistributedOptimizer.
    load_state_dict`` puts one shared step tensor into every parameter's state
    (``distrib_optimizer.py:825``; torch Adam then increments it once per parameter), and the
    ``dp_reshardable`` parameter load copies the pre-load live step over it (``step`` is a
    ``LocalNonpersistentObject`` there, ``distrib_optimizer.py:1664``; copy at ``:940``). The
    checkpoint's step survives in the inner optimizer's param groups.
    """
    from megatron.core.optimizer import distrib_optimizer

    if distrib_optimizer.HAVE_APEX_OR_TE:
        return
    dtype = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
    for o in getattr(optimizer, "chained_optimizers", [optimizer]):
        if not isinstance(o, distrib_optimizer.DistributedOptimizer):
            continue
        for group in o.optimizer.param_groups:
            for p in group["params"]:
                if p in o.optimizer.state:
                    o.optimizer.state[p]["step"] = torch.tensor(float(group["step"]), dtype=dtype)
