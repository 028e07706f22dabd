"""Sandwich norms: an RMSNorm on the attention output and on the MLP output, each before its
residual add (GLM-4.1V / GLM-4; HF ``Glm4vTextDecoderLayer``):

    h = x + post_self_attn_layernorm(attn(input_layernorm(x)))
    y = h + post_mlp_layernorm(mlp(pre_mlp_layernorm(h)))

megatron-core 0.16.1's ``TransformerLayer`` has no slot for these two norms
(``TransformerLayerSubmodules``: input / pre-cross-attn / pre-MLP norms only; FAMILIES.md §5).
:class:`SandwichNormLayer` extends it rather than forking its forward: it builds the two norms
from its spec (:class:`SandwichLayerSubmodules`, the parent's fields plus the two norms) and
routes each sublayer's output through its norm inside the layer's own bias-dropout-add hook
(``self_attn_bda`` / ``mlp_bda``, the one call every forward path of the layer makes between the
sublayer and the residual add: ``_forward_attention``, ``_forward_post_mlp``). Everything else --
recompute, CUDA-graph splits, MoE, sequence parallelism -- stays megatron's.

The norms are ordinary submodules named as in HF (``decoder.layers.N.post_self_attn_layernorm``,
``...post_mlp_layernorm``). Under sequence parallelism the sublayer outputs are this rank's
sequence slice, so the norms are the spec's SP-aware norms (their weight gradients are summed
over TP as the other layer norms').
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_layer import (
    TransformerLayer,
    TransformerLayerSubmodules,
)


@dataclass
class SandwichLayerSubmodules(TransformerLayerSubmodules):
    """megatron's layer submodules plus the two output norms."""

    post_self_attn_layernorm: ModuleSpec | type = IdentityOp
    """Norm of the attention output, before its residual add (HF ``post_self_attn_layernorm``)."""
    post_mlp_layernorm: ModuleSpec | type = IdentityOp
    """Norm of the MLP output, before its residual add (HF ``post_mlp_layernorm``)."""


class _NormThenBiasDropoutAdd:
    """A layer's bias-dropout-add factory (``bda(training, fused)(x_with_bias, residual, p)``)
    that first normalises the sublayer output (bias folded in). A plain callable, not a module:
    the norm is registered once, on the layer."""

    def __init__(self, bda: Callable, norm: torch.nn.Module) -> None:
        self.bda = bda
        self.norm = norm

    def __call__(self, training: bool, fused: bool) -> Callable:
        inner = self.bda(training, fused)
        norm = self.norm

        def norm_then_add(x_with_bias, residual, prob):
            out, bias = x_with_bias
            if bias is not None:
                out = out + bias
            return inner((norm(out), None), residual, prob)

        return norm_then_add


class SandwichNormLayer(TransformerLayer):
    """megatron's ``TransformerLayer`` with :class:`SandwichLayerSubmodules`' output norms
    (module docstring)."""

    def __init__(self, config, submodules: SandwichLayerSubmodules, *args, **kwargs) -> None:
        super().__init__(config, submodules, *args, **kwargs)
        for name, bda in (("post_self_attn_layernorm", "self_attn_bda"),
                          ("post_mlp_layernorm", "mlp_bda")):
            norm = build_module(getattr(submodules, name), config=self.config,
                                hidden_size=self.config.hidden_size,
                                eps=self.config.layernorm_epsilon)
            setattr(self, name, norm)
            wrapped = _NormThenBiasDropoutAdd(getattr(self, bda), norm)
            self._modules.pop(bda, None)  # a module-typed bda (IdentityFuncOp) has no params
            setattr(self, bda, wrapped)


def with_sandwich_norms(layer_spec: ModuleSpec, norm: ModuleSpec | type) -> ModuleSpec:
    """``layer_spec`` (a megatron ``TransformerLayer`` spec) as a :class:`SandwichNormLayer`
    whose two output norms are ``norm`` (the spec's other norms' class: our SP-aware norm on the
    local backend, ``TENorm`` with Transformer Engine)."""
    module = layer_spec.module
    if not (isinstance(module, type) and issubclass(module, TransformerLayer)):
        raise ValueError(f"sandwich norms extend megatron's TransformerLayer, not "
                         f"{layer_spec.module!r}")
    fields = {f.name: getattr(layer_spec.submodules, f.name)
              for f in dataclasses.fields(TransformerLayerSubmodules)}
    submodules = SandwichLayerSubmodules(**fields, post_self_attn_layernorm=norm,
                                         post_mlp_layernorm=norm)
    return dataclasses.replace(layer_spec, module=SandwichNormLayer, submodules=submodules)
