"""InternVL's projector: pixel shuffle 0.5 (``ps_version='v2'``) and ``mlp1`` (FAMILIES.md §3;
transformers 5.25 ``InternVLModel.pixel_shuffle`` and ``InternVLMultiModalProjector``).

Pixel shuffle v2 on one tile's features ``[h, w, d]`` (raster): ``view(h, w/2, 2d)`` ->
transpose -> ``view(w/2, h/2, 4d)`` -> transpose back gives ``[h/2, w/2, 4d]`` whose row
``(r, c)`` is the concatenation of patches ``(2r, 2c), (2r, 2c+1), (2r+1, 2c), (2r+1, 2c+1)``:
the 2x2 block row-major, what the tower's merge already hands over as ``[tokens, 4, d]``
(:func:`pixel_shuffle` is the literal port, for features from elsewhere and the tests).

``mlp1``: LayerNorm(``4d``, eps 1e-5) -> Linear ``4d -> H`` -> GELU (exact) -> Linear ``H -> H``,
biases everywhere (H = the LLM width). The linears are megatron's ``MLP`` (column- then
row-parallel), sharded over TP like Kimi's and Keye's projectors; the LayerNorm runs replicated.
One LLM token per 2x2 patches per tile: an image of ``k`` tiles is ``256 k`` tokens.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import build_module
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import Tensor

from megatron_vlm.config.parallel import ParallelConfig
from megatron_vlm.config.vision import ProjectorConfig
from megatron_vlm.families.internvl.config import InternVisionConfig, InternVLProjectorConfig
from megatron_vlm.models.projector import build_projector_transformer_config, projector_mlp_spec
from megatron_vlm.parallel.runtime import groups_or_default


def pixel_shuffle(features: Tensor, scale_factor: float = 0.5) -> Tensor:
    """InternVL's pixel shuffle v2: ``[B, h, w, d]`` -> ``[B, h*s, w*s, d/s^2]`` (the
    remote code's and transformers' ``pixel_shuffle``; their axis names say ``(n, w, h, c)``
    but the tensor is raster ``(rows, cols)``)."""
    b, rows, cols, d = features.shape
    if rows * scale_factor % 1 or cols * scale_factor % 1:
        raise ValueError(f"pixel shuffle {scale_factor} needs a grid divisible by "
                         f"{round(1 / scale_factor)}; got {rows}x{cols}")
    x = features.reshape(b, rows, int(cols * scale_factor), int(d / scale_factor))
    x = x.permute(0, 2, 1, 3).reshape(b, int(cols * scale_factor), int(rows * scale_factor),
                                      int(d / scale_factor ** 2))
    return x.permute(0, 2, 1, 3).contiguous()


def llm_tokens_per_item(vision: InternVisionConfig, grid_thw: Tensor) -> Tensor:
    """``t*h*w / 4``: LLM placeholder tokens of each item ``[M]`` (``t`` tiles or frames, each
    pixel-shuffled on its own: 256 per 448-px tile); the family's ``llm_tokens_per_item``."""
    if bool((grid_thw[:, 1] % vision.merge_kernel_height).any()
            or (grid_thw[:, 2] % vision.merge_kernel_width).any()):
        raise ValueError(f"grid_thw {grid_thw.tolist()} has a side not divisible by the pixel "
                         f"shuffle's {vision.merge_kernel_height}x{vision.merge_kernel_width}; "
                         "InternVL tiles are 448 px (32x32 patches)")
    return grid_thw.prod(dim=1) // vision.merge_size


def projector_transformer_config(projector: InternVLProjectorConfig, parallel: ParallelConfig,
                                 params_dtype: str = "fp32") -> TransformerConfig:
    """megatron config of ``mlp1``'s linears: Kimi's projector mapping (exact GELU, biases,
    ``hidden_size`` = LLM width, ``ffn_hidden_size`` = the first linear's output = LLM width)."""
    return build_projector_transformer_config(
        ProjectorConfig(vision_hidden_size=projector.vision_hidden_size,
                        merge_size=projector.merge_size,
                        ffn_hidden_size=projector.intermediate_size,
                        output_size=projector.output_size, norm_epsilon=projector.norm_epsilon,
                        init_method_std=projector.init_method_std),
        parallel, params_dtype)


class InternVLProjector(MegatronModule):
    """Parameter names: ``pre_norm`` (LayerNorm over the ``4d`` row; HF
    ``multi_modal_projector.layer_norm``, remote ``mlp1.0``), ``mlp.linear_fc1`` (``linear_1`` /
    ``mlp1.1``), ``mlp.linear_fc2`` (``linear_2`` / ``mlp1.3``)."""

    def __init__(self, config: TransformerConfig, projector: InternVLProjectorConfig,
                 tp_group: torch.distributed.ProcessGroup | None = None) -> None:
        super().__init__(config=config)
        self.projector = projector
        self.pre_norm = torch.nn.LayerNorm(projector.input_size, eps=projector.norm_epsilon,
                                           dtype=config.params_dtype)
        self.mlp = build_module(
            projector_mlp_spec(), config=config, input_size=projector.input_size,
            ffn_hidden_size=projector.intermediate_size,
            tp_group=groups_or_default(required=True).tp if tp_group is None else tp_group,
        )

    def forward(self, merged: Tensor) -> Tensor:
        """``merged [T, 4, d]`` (the tower's output) or ``[T, 4d]`` (:func:`pixel_shuffle`'s
        rows) -> LLM embeddings ``[T, H]``."""
        p = self.projector
        if merged.dim() == 3 and merged.shape[1:] == (p.merge_size, p.vision_hidden_size):
            merged = merged.flatten(1)
        if merged.dim() != 2 or merged.shape[1] != p.input_size:
            raise ValueError(f"the InternVL projector expects [tokens, {p.merge_size}, "
                             f"{p.vision_hidden_size}] or [tokens, {p.input_size}]; got "
                             f"{tuple(merged.shape)}")
        x = self.pre_norm(merged.to(self.pre_norm.weight.dtype)).unsqueeze(1)  # [T, 1, 4d]
        out, bias = self.mlp(x)
        if bias is not None:
            out = out + bias
        return out.squeeze(1)


def build_internvl_projector(projector: InternVLProjectorConfig, parallel: ParallelConfig,
                             params_dtype: str = "fp32", *,
                             tp_group: torch.distributed.ProcessGroup | None = None
                             ) -> InternVLProjector:
    """Build ``mlp1``, sharded over ``tp_group`` (None: the process's TP group)."""
    return InternVLProjector(projector_transformer_config(projector, parallel, params_dtype),
                             projector, tp_group)
