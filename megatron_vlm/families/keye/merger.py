"""The Keye-VL 1.5 merger (``mlp_AR``, FAMILIES.md §1; vLLM ``KeyeVL1_5Projector``).

Per frame ``(h, w)`` of pre-merge features ``x [h*w, d]``:
``x.view(h/2, 2, w/2, 2, d).permute(0, 2, 1, 3, 4)`` -> ``[h*w/4, 4*d]`` (one row per 2x2 block,
patches row-major inside it) -> LayerNorm(``4*d``, eps 1e-5) -> Linear ``4d -> 4d`` -> GELU
(exact) -> Linear ``4d -> llm hidden``, biases everywhere. One LLM token per 2x2 patches per
frame: no temporal pooling (a video of ``t`` frames gives ``t*h*w/4`` tokens).

The regroup is the tower's (``KeyeSiglipViT.forward`` returns ``[tokens, 4, d]``, MoonViT's
merger with t = 1; :func:`keye_merge` does it for pre-merge features); this module is the
LayerNorm + MLP. The two linears are megatron's ``MLP`` (column- then row-parallel), sharded
over TP like Kimi's projector (``models/projector.py``), run on the full merged sequence.
"""

from __future__ import annotations

import torch
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import build_module
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import Tensor

from megatron_vlm.config.parallel import ParallelConfig
from megatron_vlm.config.vision import ProjectorConfig
from megatron_vlm.families.keye.config import KeyeMergerConfig, SiglipVisionConfig
from megatron_vlm.families.keye.vision import frame_grid
from megatron_vlm.models.projector import build_projector_transformer_config, projector_mlp_spec
from megatron_vlm.models.vision.merger import tpool_patch_merger
from megatron_vlm.parallel.runtime import groups_or_default


def keye_merge(x: Tensor, grid_thw: Tensor, kernel_height: int = 2,
               kernel_width: int = 2) -> Tensor:
    """Pre-merge features ``x [sum(t*h*w), d]`` -> ``[sum(t*h*w) / (kh*kw), kh*kw*d]``: per
    frame, the ``kh x kw`` blocks in raster order, each the concatenation of its patches
    (row-major), i.e. ``view(t, h/kh, kh, w/kw, kw, d).permute(0, 1, 3, 2, 4, 5)``."""
    return tpool_patch_merger(x, frame_grid(grid_thw), kernel_height, kernel_width).flatten(1)


def llm_tokens_per_item(vision: SiglipVisionConfig, grid_thw: Tensor) -> Tensor:
    """``t*h*w / merge``: LLM placeholder tokens of each item ``[M]`` (every frame merged on
    its own, no temporal pooling); the family's ``llm_tokens_per_item``."""
    if bool((grid_thw[:, 1] % vision.merge_kernel_height).any()
            or (grid_thw[:, 2] % vision.merge_kernel_width).any()):
        raise ValueError(f"grid_thw {grid_thw.tolist()} has a side not divisible by the merge "
                         f"kernel {vision.merge_kernel_height}x{vision.merge_kernel_width}; "
                         "resize images to multiples of patch_size x merge kernel (28 px)")
    return grid_thw.prod(dim=1) // vision.merge_size


def merger_transformer_config(merger: KeyeMergerConfig, parallel: ParallelConfig,
                              params_dtype: str = "fp32") -> TransformerConfig:
    """megatron config of the merger's MLP: the same mapping as Kimi's projector (exact GELU,
    biases, ``hidden_size`` = LLM width, ``ffn_hidden_size`` = intermediate width)."""
    return build_projector_transformer_config(
        ProjectorConfig(vision_hidden_size=merger.vision_hidden_size,
                        merge_size=merger.merge_size, ffn_hidden_size=merger.ffn_hidden_size,
                        output_size=merger.output_size, norm_epsilon=merger.norm_epsilon,
                        init_method_std=merger.init_method_std),
        parallel, params_dtype)


class KeyeMerger(MegatronModule):
    """Parameter names: ``pre_norm`` (LayerNorm over the merged ``k*d`` row; Keye
    ``mlp_AR.pre_norm``), ``mlp.linear_fc1`` (``mlp_AR.linear_1``), ``mlp.linear_fc2``
    (``mlp_AR.linear_2``)."""

    def __init__(self, config: TransformerConfig, merger: KeyeMergerConfig,
                 tp_group: torch.distributed.ProcessGroup | None = None) -> None:
        super().__init__(config=config)
        self.merger = merger
        self.pre_norm = torch.nn.LayerNorm(merger.input_size, eps=merger.norm_epsilon,
                                           dtype=config.params_dtype)
        self.mlp = build_module(
            projector_mlp_spec(), config=config, input_size=merger.input_size,
            ffn_hidden_size=merger.intermediate_size,
            tp_group=groups_or_default(required=True).tp if tp_group is None else tp_group,
        )

    def forward(self, merged: Tensor) -> Tensor:
        """``merged [T, k, d]`` (the tower's output) or ``[T, k*d]`` (:func:`keye_merge`) ->
        LLM embeddings ``[T, llm_hidden]``."""
        m = self.merger
        if merged.dim() == 3 and merged.shape[1:] == (m.merge_size, m.vision_hidden_size):
            merged = merged.flatten(1)
        if merged.dim() != 2 or merged.shape[1] != m.input_size:
            raise ValueError(f"the Keye merger expects [tokens, {m.merge_size}, "
                             f"{m.vision_hidden_size}] or [tokens, {m.input_size}]; got "
                             f"{tuple(merged.shape)}")
        x = self.pre_norm(merged).unsqueeze(1)  # [T, 1, k*d]: megatron's [s, b, h]
        out, bias = self.mlp(x)
        if bias is not None:
            out = out + bias
        return out.squeeze(1)


def build_keye_merger(merger: KeyeMergerConfig, parallel: ParallelConfig,
                      params_dtype: str = "fp32", *,
                      tp_group: torch.distributed.ProcessGroup | None = None) -> KeyeMerger:
    """Build the merger, sharded over ``tp_group`` (None: the process's TP group)."""
    return KeyeMerger(merger_transformer_config(merger, parallel, params_dtype), merger, tp_group)
