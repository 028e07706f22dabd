"""LayerNorm/RMSNorm that works with sequence parallelism, for the local (non-TE) specs.

megatron-core 0.16.1's ``WrappedTorchNorm`` refuses ``sequence_parallel``
(``transformer/torch_norm.py:32``), and megatron requires SP for MoE with TP > 1
(``transformer/moe/moe_layer.py:380``). Under SP each TP rank normalises its own slice of the
sequence with replicated weights, so the weights' gradients are partial sums: marking them
``sequence_parallel`` makes megatron's ``finalize_model_grads`` all-reduce them over the TP group
(``distributed/finalize_model_grads.py:354``) -- exactly what TE's norms do.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.transformer_config import TransformerConfig


class SequenceParallelNorm:
    """Spec-compatible factory (same signature as megatron's ``WrappedTorchNorm``)."""

    def __new__(
        cls,
        config: TransformerConfig,
        hidden_size: int,
        eps: float = 1e-5,
        persist_layer_norm: bool = False,
        zero_centered_gamma: bool = False,
        normalization: str = "LayerNorm",
    ) -> torch.nn.Module:
        if config.layernorm_zero_centered_gamma:
            raise ValueError("zero-centered gamma is not supported by the torch norm path")
        if config.normalization == "RMSNorm":
            norm = torch.nn.RMSNorm(hidden_size, eps=eps)
        elif config.normalization == "LayerNorm":
            norm = torch.nn.LayerNorm(hidden_size, eps=eps)
        else:
            raise ValueError(f"unsupported normalization {config.normalization!r}")
        for param in norm.parameters():
            param.sequence_parallel = config.sequence_parallel
        return norm
