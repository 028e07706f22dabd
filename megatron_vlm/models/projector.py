"""The Kimi projector from merged ViT tokens to the LLM width (SPEC §2).

``LayerNorm(d)`` on each of the ``k = kh*kw`` sub-tokens -> concatenate to ``k*d`` -> Linear
``k*d -> k*d`` -> GELU (exact, not tanh) -> Linear ``k*d -> llm hidden`` (transformers 5.23
``Kimi_K25MultimodalProjection``: ``pre_norm``, ``in_proj``, ``out_proj``; K2.5 checkpoints:
``mm_projector.pre_norm``, ``proj.0``, ``proj.2``).

The two linears are megatron's ``MLP`` (column- then row-parallel), so they shard over TP like the
LLM's; the projector runs on the full merged sequence on every TP rank (no sequence parallelism:
the LLM scatters the multimodal embeddings after they are assembled).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec, build_module
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import Tensor

from megatron_vlm.config.parallel import ParallelConfig
from megatron_vlm.config.vision import ProjectorConfig
from megatron_vlm.parallel.runtime import groups_or_default

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def build_projector_transformer_config(
    projector: ProjectorConfig, parallel: ParallelConfig, params_dtype: str = "fp32"
) -> TransformerConfig:
    """megatron config for the projector MLP: ``hidden_size`` is the *output* (LLM) width and
    ``ffn_hidden_size`` the intermediate width, as megatron's ``MLP`` reads them."""
    if projector.intermediate_size % parallel.tp:
        raise ValueError(
            f"parallel.tp={parallel.tp} does not divide the projector's intermediate size "
            f"{projector.intermediate_size}"
        )
    dtype = _DTYPES[params_dtype]
    return TransformerConfig(
        num_layers=1,
        hidden_size=projector.output_size,
        num_attention_heads=parallel.tp,  # unused; megatron wants heads divisible by tp
        ffn_hidden_size=projector.intermediate_size,
        add_bias_linear=True,
        gated_linear_unit=False,
        activation_func=F.gelu,  # exact GELU
        init_method_std=projector.init_method_std,
        hidden_dropout=0.0,
        tensor_model_parallel_size=parallel.tp,
        pipeline_model_parallel_size=1,
        context_parallel_size=1,
        sequence_parallel=False,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=False,
        use_cpu_initialization=not torch.cuda.is_available(),
        perform_initialization=True,
        gradient_accumulation_fusion=False,
        bias_activation_fusion=False,
        cuda_graph_scope=[],
    )


def projector_mlp_spec() -> ModuleSpec:
    """megatron's local MLP: column-parallel ``linear_fc1``, row-parallel ``linear_fc2``."""
    return ModuleSpec(
        module=MLP,
        submodules=MLPSubmodules(linear_fc1=ColumnParallelLinear, linear_fc2=RowParallelLinear),
    )


class KimiProjector(MegatronModule):
    """Parameter names: ``pre_norm`` (LayerNorm over one sub-token), ``mlp.linear_fc1``
    (HF ``in_proj`` / ``proj.0``), ``mlp.linear_fc2`` (HF ``out_proj`` / ``proj.2``)."""

    def __init__(self, config: TransformerConfig, projector: ProjectorConfig,
                 tp_group: torch.distributed.ProcessGroup | None = None) -> None:
        super().__init__(config=config)
        self.projector = projector
        self.pre_norm = torch.nn.LayerNorm(
            projector.vision_hidden_size, eps=projector.norm_epsilon, dtype=config.params_dtype
        )
        self.mlp = build_module(
            projector_mlp_spec(), config=config,
            input_size=projector.input_size, ffn_hidden_size=projector.intermediate_size,
            tp_group=groups_or_default(required=True).tp if tp_group is None else tp_group,
        )

    def forward(self, merged: Tensor) -> Tensor:
        """``merged [T, k, d]`` (MoonViT's output) -> LLM embeddings ``[T, llm_hidden]``."""
        if merged.dim() != 3 or merged.shape[1:] != (
            self.projector.merge_size, self.projector.vision_hidden_size
        ):
            raise ValueError(
                f"projector expects [tokens, {self.projector.merge_size}, "
                f"{self.projector.vision_hidden_size}]; got {tuple(merged.shape)}"
            )
        x = self.pre_norm(merged).flatten(1).unsqueeze(1)  # [T, 1, k*d]: megatron's [s, b, h]
        out, bias = self.mlp(x)
        if bias is not None:
            out = out + bias
        return out.squeeze(1)


def build_projector(
    projector: ProjectorConfig, parallel: ParallelConfig, params_dtype: str = "fp32", *,
    tp_group: torch.distributed.ProcessGroup | None = None,
) -> KimiProjector:
    """Build the projector, sharded over ``tp_group`` (the model's TP group; None: that of
    :func:`~megatron_vlm.parallel.runtime.groups_or_default`)."""
    config = build_projector_transformer_config(projector, parallel, params_dtype)
    return KimiProjector(config, projector, tp_group)
