"""The optimizer step with the gradient norm computed once.

megatron-core's ``MegatronOptimizer.step()`` copies the model's gradients to the main ones
(``prepare_grads``), computes the global gradient norm, clips with it and steps. The trainer needs
the norm *before* the step to skip a step whose gradients are not finite; calling ``step()``
afterwards would compute the norm a second time (one more reduction over the model-parallel group
per step). :func:`step_with_grad_norm` is ``step()``'s remainder for a norm already computed, for
each optimizer kind this package builds (megatron-core 0.16.1 ``optimizer.py``:
``MixedPrecisionOptimizer.step`` / ``FP32Optimizer.step`` clip with ``clip_grad_norm``,
``ChainedOptimizer.step`` clips every sub-optimizer with the one total norm,
``LayerWiseDistributedOptimizer.step`` then all-gathers the updated parameters). Tested equal to
``optimizer.step()`` in ``tests/unit/test_lean_step.py``.
"""

from __future__ import annotations

from megatron.core.optimizer import ChainedOptimizer, MegatronOptimizer
from megatron.core.optimizer.clip_grads import clip_grad_by_total_norm_fp32
from megatron.core.optimizer.layer_wise_optimizer import LayerWiseDistributedOptimizer


def _clip(optimizer: MegatronOptimizer, grad_norm: float) -> None:
    if getattr(optimizer, "is_stub_optimizer", False) or optimizer.config.clip_grad <= 0.0:
        return
    params = optimizer.get_parameters()
    if params:
        clip_grad_by_total_norm_fp32(
            params, max_norm=optimizer.config.clip_grad, total_norm=grad_norm,
            use_decoupled_grad=optimizer.config.use_precision_aware_optimizer_no_fp8_or_ds_fp8)


def step_with_grad_norm(optimizer: MegatronOptimizer, grad_norm: float) -> bool:
    """Clip with ``grad_norm`` (when ``clip_grad > 0``) and step; call after ``prepare_grads()``
    and ``get_grad_norm()``. Returns whether the update succeeded."""
    subs = (optimizer.chained_optimizers if isinstance(optimizer, ChainedOptimizer)
            else [optimizer])
    for sub in subs:
        _clip(sub, grad_norm)
    success = optimizer.step_with_ready_grads()
    if isinstance(optimizer, LayerWiseDistributedOptimizer):
        optimizer.allgather_params()  # each DP rank updated its own parameters: share them
    return success
