"""LayerNorm/RMSNorm that works with sequence parallelism, for the local (non-TE) specs.

megatron-core 0.16.1's ``WrappedTorchNorm`` refuses ``sequence_parallel``
(``transformer/torch_norm.py:32``), and megatron requires SP for MoE with TP > 1
(``transformer/moe/moe_layer.py:380``). Under SP each TP rank normalises its own slice of the
sequence with replicated weights, so the weights' gradients are partial sums: marking them
``sequence_parallel`` makes megatron's ``finalize_model_grads`` all-reduce them over the TP group
(``distributed/finalize_model_grads.py:354``) -- exactly what TE's norms do.

MLA's latent norms (``q_layernorm``, ``kv_layernorm``) need an eps of their own: megatron builds
them with ``eps=config.layernorm_epsilon`` (``transformer/multi_latent_attention.py:498-510``),
and TE's fused norm + up-projection reads the same field (``extensions/transformer_engine.py:826``),
while the reference builds them at 1e-6 whatever ``rms_norm_eps`` is
(``LLMConfig.mla_latent_norm_epsilon``). :class:`LatentNorm` and
:class:`TELatentNormColumnParallelLinear` take that eps from ``ModuleSpec.params``.
"""

from __future__ import annotations

import copy

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


class LatentNorm:
    """:class:`SequenceParallelNorm` for MLA's latent norms: ``latent_eps`` (from the spec's
    ``params``) replaces the ``eps`` megatron passes (``config.layernorm_epsilon``)."""

    def __new__(cls, config: TransformerConfig, hidden_size: int, eps: float = 1e-5, *,
                latent_eps: float, **kwargs) -> torch.nn.Module:
        return SequenceParallelNorm(config, hidden_size, eps=latent_eps, **kwargs)


def latent_norm_config(config: TransformerConfig, latent_eps: float) -> TransformerConfig:
    """A shallow copy of ``config`` with ``layernorm_epsilon=latent_eps`` (no ``__post_init__``
    rerun; ``config`` itself is unchanged)."""
    out = copy.copy(config)
    out.layernorm_epsilon = latent_eps
    return out


class TELatentNormColumnParallelLinear:
    """megatron's ``TELayerNormColumnParallelLinear`` (TE's fused RMSNorm + column-parallel
    linear, MLA's ``linear_q_up_proj``/``linear_kv_up_proj`` with the latent norm inside) whose
    norm uses ``latent_eps``: the wrapper hands TE ``eps=config.layernorm_epsilon``, so it is
    built from :func:`latent_norm_config` and then given back the shared ``config``. The module
    is a plain ``TELayerNormColumnParallelLinear`` (same parameters, checkpoint names, ``eps``
    attribute megatron's MLA latent cache reads)."""

    def __new__(cls, input_size: int, output_size: int, *, config: TransformerConfig,
                latent_eps: float, **kwargs) -> torch.nn.Module:
        from megatron.core.extensions.transformer_engine import TELayerNormColumnParallelLinear

        module = TELayerNormColumnParallelLinear(
            input_size, output_size, config=latent_norm_config(config, latent_eps), **kwargs)
        module.config = config
        return module
