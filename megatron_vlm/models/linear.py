"""A TP-duplicated linear layer for the local (non-TE) MLA spec.

With megatron-core 0.16.1's local spec, MLA's down-projections are ``ColumnParallelLinear``:
the latent ``[kv_lora + rope]`` output is sharded over TP and re-assembled with
``gather_from_tensor_model_parallel_region`` (``transformer/multi_latent_attention.py:603``),
whose backward only *splits* the gradient. The shared RoPE key ``k_pos_emb`` is used by every
head, and each TP rank holds only its heads' share of its gradient, so the rope columns of
``linear_kv_down_proj`` (and everything before them) get a wrong gradient under TP (measured:
3.6e-3 relative error at TP=2; the loss itself is unchanged, which is why loss-only checks miss
it). TE's spec uses a TP-*duplicated* linear there (``parallel_mode="duplicated"``), which sends
MLA down the other branch (``multi_latent_attention.py:612``): ``k_pos_emb`` is gathered from the
sequence-parallel region, whose backward reduce-scatters (sums) the per-head contributions.

``DuplicatedLinear`` is that layer for the local spec: full weight on every TP rank, input and
output in the sequence-parallel layout. Its weight gradient from a sequence shard is a partial
sum, so the weight is marked ``sequence_parallel`` and ``finalize_model_grads`` all-reduces it over
TP, like the norms. It requires sequence parallelism when TP > 1 (validated in the config).

megatron-core 0.16.1 MLA accepts only ``[TELinear]`` (duplicated) or ``[Linear,
TEColumnParallelLinear, ColumnParallelLinear]`` as a down-projection
(``multi_latent_attention.py:408,453``); without TE its ``Linear`` name is modelopt's class or
``None`` (``:60``). The start-up shims rebind that name to this class (``parallel/cpu_shims.py``,
once, by ``init_distributed``), so MLA passes it ``gather_output=False``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig


class DuplicatedLinear(MegatronModule):
    """``y = x W^T (+ b)`` with ``W`` replicated over tensor-parallel ranks.

    Accepts the keyword arguments megatron passes to ``ColumnParallelLinear`` through specs.
    Initialisation follows megatron's CPU path (one fp32 master weight from ``init_method``), so a
    TP=2 model starts from exactly the TP=1 weights.
    """

    def __init__(
        self,
        input_size: int,
        output_size: int,
        *,
        config: TransformerConfig,
        init_method,
        bias: bool = False,
        gather_output: bool = False,
        skip_bias_add: bool = False,
        is_expert: bool = False,
        tp_comm_buffer_name: str | None = None,
        tp_group=None,
        **unused,
    ) -> None:
        super().__init__(config=config)
        if is_expert:
            raise ValueError("DuplicatedLinear is not an expert layer")
        self.skip_bias_add = skip_bias_add
        # None = torch's default device: the CPU, or "meta" when the converter builds the model
        # under ``torch.device("meta")`` to read its sharded layout without allocating it.
        device = None if config.use_cpu_initialization else torch.cuda.current_device()
        master = torch.empty(output_size, input_size, dtype=torch.float32, device=device)
        if config.perform_initialization:
            # Default (data-parallel) RNG stream: identical on every TP rank, as it must be.
            init_method(master)
        self.weight = torch.nn.Parameter(master.to(config.params_dtype))
        self.bias = (
            torch.nn.Parameter(torch.zeros(output_size, dtype=config.params_dtype, device=device))
            if bias
            else None
        )
        for param in self.parameters():
            param.sequence_parallel = config.sequence_parallel
            param.tensor_model_parallel = False
            param.allreduce = True

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if self.skip_bias_add:
            return F.linear(x, self.weight), self.bias
        return F.linear(x, self.weight, self.bias), None

