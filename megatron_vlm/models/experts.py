"""Routed experts as two grouped GEMMs with torch's ``grouped_mm``, without Transformer Engine.

megatron-core 0.16.1 offers grouped expert GEMMs only through Transformer Engine
(``TEGroupedMLP``) or the ``grouped_gemm`` CUDA extension (the legacy ``GroupedMLP``, whose
parameters ``weight1``/``weight2`` are laid out differently from the per-expert MLPs). Without
either, its ``SequentialMLP`` runs each local expert's two small GEMMs in a Python loop (K2-proxy:
64 experts x ~380 tokens per micro-batch). torch (2.8+ on CUDA sm90, bf16; 2.13 also on CPU in
bf16) has ``grouped_mm``: one kernel for all experts' jagged GEMMs.

:class:`GroupedMMSequentialMLP` keeps ``SequentialMLP``'s parameters and checkpoint layout
(``local_experts.{e}.linear_fc1/2.weight``, so conversion tables, Muon's per-expert blocks and
saved checkpoints are unchanged) and replaces only the forward: the experts' weights are stacked
(``[E, h, 2f]``, ``[E, f, h]``; one copy per forward) and run as two ``grouped_mm`` calls with the
SwiGLU and routing-probability scaling of megatron's ``MLP`` in between. Configurations it does not
cover (biases, expert tensor parallelism, FP8, other activations, probabilities on the input) use
``SequentialMLP``'s own forward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.moe.experts import SequentialMLP

from megatron_vlm.models.specs import grouped_mm_fn


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
        mm = grouped_mm_fn()
        # [E, 2f, h] -> [E, h, 2f] and [E, h, f] -> [E, f, h]: x @ W^T per expert.
        w1 = torch.stack([e.linear_fc1.weight for e in self.local_experts]).transpose(1, 2)
        w2 = torch.stack([e.linear_fc2.weight for e in self.local_experts]).transpose(1, 2)
        counts = torch.as_tensor(tokens_per_expert, device=x.device)
        offs = torch.cumsum(counts, dim=0).to(torch.int32)
        fc1 = mm(x, w1, offs=offs)  # [T, 2f]
        gate, up = torch.chunk(fc1, 2, dim=-1)
        act = F.silu(gate) * up  # megatron MLP's glu (no clamp, no offset)
        act = (act * permuted_probs.unsqueeze(-1)).to(x.dtype)
        return mm(act, w2, offs=offs), None  # [T, h]
