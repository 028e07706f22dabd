"""Routed experts as two grouped GEMMs with torch's ``grouped_mm``, without Transformer Engine.

megatron-core 0.16.1 offers grouped expert GEMMs only through Transformer Engine
(``TEGroupedMLP``) or the ``grouped_gemm`` CUDA extension (the legacy ``GroupedMLP``, whose
parameters ``weight1``/``weight2`` are laid out differently from the per-expert MLPs). Without
either, its ``SequentialMLP`` runs each local expert's two small GEMMs in a Python loop (K2-proxy:
64 experts x ~380 tokens per micro-batch). torch (2.8+ on CUDA sm90, bf16; 2.13 also on CPU in
bf16) has ``grouped_mm``: one kernel for all experts' jagged GEMMs.

:class:`GroupedMMSequentialMLP` keeps ``SequentialMLP``'s parameters and checkpoint layout
(``local_experts.{e}.linear_fc1/2.weight``, so conversion tables, Muon's per-expert blocks and
saved checkpoints are unchanged) and replaces only the forward: :class:`GroupedExperts` stacks the
experts' weights (``[E, h, 2f]``, ``[E, f, h]``) and runs two ``grouped_mm`` calls with the SwiGLU
and routing-probability scaling of megatron's ``MLP`` in between. Configurations it does not
cover (biases, expert tensor parallelism, FP8, other activations, probabilities on the input) use
``SequentialMLP``'s own forward.

**No retained copy of the weights.** Under plain autograd the stacked weights are saved for the
backward pass: one copy of all local experts' weights per MoE layer per micro-batch in flight
(K2.5 at ep=8: 48 experts x 3 x 2048 x 7168 bf16 = 4.2 GB). :class:`GroupedExperts` saves the
expert input, the probabilities and the first GEMM's output ``[T, 2f]`` (plus references to the
parameters themselves), and stacks the weights again in backward, one matrix at a time: while a
layer runs, at most one stacked copy's worth of bytes is alive (forward: the stacked fc1 weights;
backward: the stacked fc2 gradient plus the stacked fc1 weights, then plus the fc1 gradient),
and nothing stacked outlives the layer. The SwiGLU and probability scaling are recomputed from the
saved fc1 output (elementwise; autograd of today's path kept three more ``[T, f]`` tensors). The
GEMM gradients are torch's own ``_grouped_mm`` derivative formulas (``derivatives.yaml``:
``_grouped_mm_mat1_backward``/``_grouped_mm_mat2_backward`` for a row-major input and the
column-major stacked weights), so outputs and gradients equal plain autograd's bit for bit
(``tests/unit/test_grouped_experts.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel.layers import RowParallelLinear
from megatron.core.transformer.moe.experts import SequentialMLP

from megatron_vlm.models.specs import grouped_mm_fn


def _stacked(weights) -> torch.Tensor:
    """``[E, out, in]`` per-expert ``nn.Linear`` weights as the ``[E, in, out]`` right operand of
    ``x @ W^T`` (a column-major view of one stacked copy)."""
    return torch.stack(weights).transpose(1, 2)


def _swiglu_scaled(fc1: torch.Tensor, probs: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """megatron ``MLP``'s glu (no clamp, no offset) times the routing probabilities."""
    gate, up = torch.chunk(fc1, 2, dim=-1)
    act = F.silu(gate) * up
    return (act * probs.unsqueeze(-1)).to(dtype)


def _weight_grads(grad: torch.Tensor, inp: torch.Tensor, offs: torch.Tensor, mm) -> tuple:
    """Per-expert weight gradients of ``mm(inp, _stacked(W), offs)``: torch's
    ``_grouped_mm_mat2_backward`` for a column-major ``mat2`` (``(grad^T @ inp)`` per group),
    unbound into ``[out, in]`` views of one ``[E, out, in]`` tensor, as ``stack``'s backward
    gives them."""
    return tuple(mm(grad.transpose(-2, -1), inp, offs=offs).unbind(0))


class GroupedExperts(torch.autograd.Function):
    """``fc2(swiglu(fc1(x)) * probs)`` over all local experts as two grouped GEMMs, saving the
    inputs and the fc1 output; the stacked weights are rebuilt in backward."""

    @staticmethod
    def forward(ctx, x, probs, offs, num_experts: int, *weights):
        mm = grouped_mm_fn()
        w1, w2 = weights[:num_experts], weights[num_experts:]
        fc1 = mm(x, _stacked(w1), offs=offs)  # [T, 2f]; the stacked copy dies here
        act = _swiglu_scaled(fc1, probs, x.dtype)
        out = mm(act, _stacked(w2), offs=offs)  # [T, h]
        ctx.num_experts = num_experts
        ctx.save_for_backward(x, probs, offs, fc1, *weights)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        mm = grouped_mm_fn()
        x, probs, offs, fc1, *weights = ctx.saved_tensors
        n = ctx.num_experts
        w1, w2 = weights[:n], weights[n:]
        need_x, need_probs = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        need_w1, need_w2 = any(ctx.needs_input_grad[4:4 + n]), any(ctx.needs_input_grad[4 + n:])
        with torch.enable_grad():  # SwiGLU and scaling recomputed: same ops, same derivatives
            fc1 = fc1.detach().requires_grad_(need_x or need_w1)
            probs = probs.detach().requires_grad_(need_probs)
            act = _swiglu_scaled(fc1, probs, x.dtype)
        # _grouped_mm_mat1_backward (row-major input): grad @ W per group.
        grad_act = mm(grad_out, _stacked(w2).transpose(-2, -1), offs=offs)
        grad_w2 = _weight_grads(grad_out, act.detach(), offs, mm) if need_w2 else (None,) * n
        wanted = [t for t in (fc1, probs) if t.requires_grad]
        grads = iter(torch.autograd.grad(act, wanted, grad_act) if wanted else ())
        grad_fc1 = next(grads) if fc1.requires_grad else None
        grad_probs = next(grads) if need_probs else None
        del act, grad_act
        grad_x = (mm(grad_fc1, _stacked(w1).transpose(-2, -1), offs=offs) if need_x else None)
        grad_w1 = _weight_grads(grad_fc1, x, offs, mm) if need_w1 else (None,) * n
        return grad_x, grad_probs, None, None, *grad_w1, *grad_w2


class GroupedMMSequentialMLP(SequentialMLP):
    """``SequentialMLP`` whose forward is two grouped GEMMs over all local experts."""

    def _grouped_supported(self, x: torch.Tensor) -> bool:
        cfg = self.config
        return (
            grouped_mm_fn() is not None
            and x.dtype == torch.bfloat16
            and cfg.gated_linear_unit and cfg.activation_func is F.silu
            and not cfg.add_bias_linear
            and not (cfg.fp8 or cfg.fp4)
            and not cfg.moe_apply_probs_on_input
            and cfg.activation_func_clamp_value is None and cfg.glu_linear_offset == 0.0
            and self.tp_group.size() == 1
        )

    def forward(self, permuted_local_hidden_states: torch.Tensor,
                tokens_per_expert: torch.Tensor, permuted_probs: torch.Tensor):
        x = permuted_local_hidden_states
        if not self._grouped_supported(x):
            return super().forward(x, tokens_per_expert, permuted_probs)
        counts = torch.as_tensor(tokens_per_expert, device=x.device)
        offs = torch.cumsum(counts, dim=0).to(torch.int32)
        weights = ([e.linear_fc1.weight for e in self.local_experts]
                   + [e.linear_fc2.weight for e in self.local_experts])
        out = GroupedExperts.apply(x, permuted_probs, offs, len(self.local_experts), *weights)
        return out, None  # [T, h]


class ExpertBiasRowParallelLinear(RowParallelLinear):
    """A routed expert's ``linear_fc2`` when the experts have biases (GPT-OSS).

    megatron-core 0.16.1's ``MLP.forward`` adds an expert's fc2 bias, scaled by the routing
    probability, *in place* to this layer's output (``transformer/mlp.py:247``). Without expert
    communication (TP = EP = 1) that output is the input returned as is by megatron's
    ``_ReduceFromModelParallelRegion`` autograd function, and autograd refuses the in-place add
    when training ("Output 0 of _ReduceFromModelParallelRegion is a view and is being modified
    inplace"). The output is copied then (inference and bias-free experts are untouched).
    """

    def forward(self, input_: torch.Tensor):
        output, bias = super().forward(input_)
        if bias is not None and torch.is_grad_enabled():
            output = output.clone()
        return output, bias
