"""The GLM-4.1V / GLM-4.5V projector: the 2x2 downsample convolution and the merger
(FAMILIES.md §2; transformers 5.25 ``Glm4vVisionModel.downsample`` and
``Glm4vVisionPatchMerger``).

Per LLM token, the tower's ``[4, d]`` patch features (row-major in the 2x2 block) ->
``Conv2d(d, out, kernel 2, stride 2)`` with bias (one output per block: a linear map of the
``[d, 2, 2]`` block) -> Linear ``out -> out`` (no bias) -> LayerNorm(out) -> GELU (exact) ->
SwiGLU ``down(silu(gate(x)) * up(x))`` ``out -> ffn -> out`` (no biases). One LLM token per 2x2
patches per temporal patch: a video of ``t`` temporal patches gives ``t*h*w/4`` tokens.

The SwiGLU is megatron's ``MLP`` (``linear_fc1 = [gate; up]`` column-parallel, ``linear_fc2``
row-parallel), sharded over TP like Kimi's projector; the downsample, ``proj`` and LayerNorm run
replicated on every TP rank (their gradients are complete on every rank: the column-parallel
``linear_fc1`` all-reduces its input gradient).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import build_module
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import Tensor

from megatron_vlm.config.parallel import ParallelConfig
from megatron_vlm.config.vision import ProjectorConfig
from megatron_vlm.families.glm.config import GlmMergerConfig, GlmVisionConfig
from megatron_vlm.models.projector import build_projector_transformer_config, projector_mlp_spec
from megatron_vlm.parallel.runtime import groups_or_default


def llm_tokens_per_item(vision: GlmVisionConfig, grid_thw: Tensor) -> Tensor:
    """``t*h*w / merge``: LLM placeholder tokens of each item ``[M]`` (``t`` temporal patches,
    each merged on its own); the family's ``llm_tokens_per_item``."""
    if bool((grid_thw[:, 1] % vision.merge_kernel_height).any()
            or (grid_thw[:, 2] % vision.merge_kernel_width).any()):
        raise ValueError(f"grid_thw {grid_thw.tolist()} has a side not divisible by the merge "
                         f"kernel {vision.merge_kernel_height}x{vision.merge_kernel_width}; "
                         "resize images to multiples of patch_size x merge kernel (28 px)")
    return grid_thw.prod(dim=1) // vision.merge_size


def merger_transformer_config(merger: GlmMergerConfig, parallel: ParallelConfig,
                              params_dtype: str = "fp32") -> TransformerConfig:
    """megatron config of the merger's SwiGLU: Kimi's projector mapping (``hidden_size`` = LLM
    width, ``ffn_hidden_size`` = SwiGLU width, TP, dtype) with GLM's MLP set field by field:
    gated, ``silu``, no biases."""
    base = build_projector_transformer_config(
        ProjectorConfig(vision_hidden_size=merger.vision_hidden_size,
                        merge_size=merger.merge_size, ffn_hidden_size=merger.ffn_hidden_size,
                        output_size=merger.output_size, norm_epsilon=merger.norm_epsilon,
                        init_method_std=merger.init_method_std),
        parallel, params_dtype)
    return dataclasses.replace(base, add_bias_linear=False, gated_linear_unit=True,
                               activation_func=F.silu)


class GlmMerger(MegatronModule):
    """Parameter names: ``downsample`` (Conv2d ``[out, d, 2, 2]``; HF ``visual.downsample``),
    ``proj`` (HF ``visual.merger.proj``), ``post_projection_norm`` (LayerNorm; HF
    ``visual.merger.post_projection_norm``), ``mlp.linear_fc1`` (``[gate_proj; up_proj]``),
    ``mlp.linear_fc2`` (``down_proj``)."""

    def __init__(self, config: TransformerConfig, merger: GlmMergerConfig,
                 tp_group: torch.distributed.ProcessGroup | None = None) -> None:
        super().__init__(config=config)
        self.merger = merger
        dtype, side, out = config.params_dtype, merger.kernel_side, merger.output_size
        self.downsample = torch.nn.Conv2d(merger.vision_hidden_size, out, kernel_size=side,
                                          stride=side, dtype=dtype)
        self.proj = torch.nn.Linear(out, out, bias=False, dtype=dtype)
        self.post_projection_norm = torch.nn.LayerNorm(out, eps=merger.norm_epsilon, dtype=dtype)
        self.mlp = build_module(
            projector_mlp_spec(), config=config, input_size=out,
            ffn_hidden_size=merger.ffn_hidden_size,
            tp_group=groups_or_default(required=True).tp if tp_group is None else tp_group,
        )

    def forward(self, merged: Tensor) -> Tensor:
        """``merged [T, k, d]`` (the tower's output: the ``kh x kw`` patches of each token,
        row-major) -> LLM embeddings ``[T, out]``."""
        m = self.merger
        if merged.dim() != 3 or merged.shape[1:] != (m.merge_size, m.vision_hidden_size):
            raise ValueError(f"the GLM merger expects [tokens, {m.merge_size}, "
                             f"{m.vision_hidden_size}]; got {tuple(merged.shape)}")
        side = m.kernel_side
        # [T, kh, kw, d] -> [T, d, kh, kw]: the conv's kernel covers the block exactly once.
        blocks = merged.view(-1, side, side, m.vision_hidden_size).permute(0, 3, 1, 2)
        x = self.downsample(blocks.to(self.downsample.weight.dtype)).flatten(1)  # [T, out]
        x = F.gelu(self.post_projection_norm(self.proj(x)))
        out, bias = self.mlp(x.unsqueeze(1))  # [T, 1, out]: megatron's [s, b, h]
        if bias is not None:
            out = out + bias
        return out.squeeze(1)


def build_glm_merger(merger: GlmMergerConfig, parallel: ParallelConfig,
                     params_dtype: str = "fp32", *,
                     tp_group: torch.distributed.ProcessGroup | None = None) -> GlmMerger:
    """Build the projector, sharded over ``tp_group`` (None: the process's TP group)."""
    return GlmMerger(merger_transformer_config(merger, parallel, params_dtype), merger, tp_group)
