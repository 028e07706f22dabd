"""The GLM-4.1V / GLM-4.5V vision tower (Glm4v) on megatron-core blocks.

Per patch (``pixel_values [N, C*T*p*p]`` as the Glm4v processors emit them, or
``[N, C, T, p, p]``): Conv3d patch embedding over ``T = 2`` frames (bias) -> RMSNorm -> + the
learned ``24x24`` table sampled bicubically at the patch centre (``F.grid_sample`` at
``((c + 0.5) / w) * 2 - 1``, ``align_corners=False``, border padding, in fp32) -> megatron
``TransformerBlock`` of pre-RMSNorm layers (fused qkv, bias only if ``attention_bias``, output
projection without bias, SwiGLU MLP without biases) whose attention rotates q/k with 2D RoPE ->
final RMSNorm (FAMILIES.md §2; transformers 5.25 ``Glm4vVisionModel`` / ``Glm4vMoeVisionModel``,
one architecture).

Patch order is BLOCK-MAJOR: inside each temporal patch the ``2x2`` patches of one LLM token are
consecutive (``view(h/2, 2, w/2, 2).permute(0, 2, 1, 3)`` of the raster grid), blocks in raster
order, as the processors flatten them. The table sample and the RoPE ids follow that order, and
the tower's merge is a plain ``view(-1, 4, D)`` (sub-tokens row-major in the block, what the
downsample Conv2d's ``[kh, kw]`` kernel expects).

A video item ``[t, h, w]`` (``t`` temporal patches of 2 frames) is ``t`` segments ``[1, h, w]``:
every temporal patch attends only to itself and gets the same table rows and RoPE ids
(transformers' ``Glm4vModel.get_video_features`` splits the grid the same way before its vision
model). Time reaches the LLM only through the timestamp text between temporal patches.

RoPE as Glm4v computes it (``Glm4vVisionRotaryEmbedding``): ``inv_freq = 1 / theta^(arange(0,
d/2, 2) / (d/2))`` (32 for d = 128), per patch ``[row * inv_freq | col * inv_freq]`` (d/2)
repeated twice (d), rotate-half over the whole head, fp32: Keye's layout, so Keye's attention
class (:class:`~megatron_vlm.families.keye.vision.KeyeRopeSelfAttention`) applies it; only the
ids differ (block-major here). The fused ``qkv`` keeps HF's per-head row order inside q, k, v:
no permutation on import.

Reused: ``PackedViT`` (encode path, split mode over temporal patches, group set-up), MoonViT's
megatron config mapping (edited to RMSNorm, SwiGLU and GLM's biases) and layer spec.
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig
from torch import Tensor

from megatron_vlm.config.model import KernelConfig
from megatron_vlm.config.parallel import ParallelConfig
from megatron_vlm.config.vision import VisionConfig
from megatron_vlm.families.glm.config import GlmVisionConfig
from megatron_vlm.families.keye.vision import KeyeRopeSelfAttention, frame_grid
from megatron_vlm.models.specs import KernelChoice
from megatron_vlm.models.vision.moonvit import (
    build_vision_transformer_config,
    moonvit_layer_spec,
    vit_kernel_choice,
)
from megatron_vlm.models.vision.packed_vit import PackedViT, tower_groups

_NO_FRAME_LIMIT = 2**62  # any number of temporal patches, each its own segment


# --------------------------------------------------------------------------- patch order, RoPE


def block_major_index(height: int, width: int, kernel: int) -> Tensor:
    """Raster indices ``[h*w]`` of a ``(height, width)`` grid in block-major order: the
    ``kernel x kernel`` blocks in raster order, the patches of a block row-major (the order of
    transformers' ``get_vision_position_ids`` and of the Glm4v processors' flattening)."""
    if height % kernel or width % kernel:
        raise ValueError(f"grid (h={height}, w={width}) is not divisible by the merge kernel "
                         f"{kernel}x{kernel}; resize images to multiples of patch_size x "
                         f"{kernel} (28 px)")
    raster = torch.arange(height * width).view(height // kernel, kernel, width // kernel, kernel)
    return raster.permute(0, 2, 1, 3).flatten()


def block_major_coords(segments: Tensor, kernel: int) -> tuple[Tensor, Tensor]:
    """``(row, col)`` ``[N]`` of every patch of ``segments [S, 3]`` (rows ``[t, h, w]``, frames
    repeating the same ids) in block-major order."""
    rows, cols = [], []
    for t, h, w in segments.tolist():
        index = block_major_index(h, w, kernel)
        rows.append((index // w).repeat(t))
        cols.append((index % w).repeat(t))
    return torch.cat(rows), torch.cat(cols)


def glm_rope_angles(segments: Tensor, head_dim: int, theta: float, kernel: int) -> Tensor:
    """Per-patch angles ``[N, head_dim/2]`` (fp32, CPU): ``[row * inv_freq | col * inv_freq]``
    with ``inv_freq_i = theta^(-4i/head_dim)`` (``head_dim/4`` each), block-major ids."""
    half = head_dim // 2
    inv_freq = 1.0 / (theta ** (torch.arange(0, half, 2, dtype=torch.float) / half))
    row, col = block_major_coords(segments, kernel)
    return torch.cat([row.float()[:, None] * inv_freq, col.float()[:, None] * inv_freq], dim=-1)


# --------------------------------------------------------------------------- embeddings


class GlmPatchEmbed(torch.nn.Module):
    """Conv3d ``(T, p, p)`` stride ``(T, p, p)`` with bias (HF ``patch_embed.proj``), then the
    RMSNorm applied right after it (HF ``post_conv_layernorm``), before the position add."""

    def __init__(self, vision: GlmVisionConfig, dtype: torch.dtype) -> None:
        super().__init__()
        self.vision = vision
        kernel = (vision.temporal_patch_size, vision.patch_size, vision.patch_size)
        self.proj = torch.nn.Conv3d(vision.in_channels, vision.hidden_size, kernel_size=kernel,
                                    stride=kernel, dtype=dtype)
        self.norm = torch.nn.RMSNorm(vision.hidden_size, eps=vision.norm_epsilon, dtype=dtype)

    @property
    def weight(self) -> Tensor:
        """The convolution's weight (``PackedViT`` reads the tower's dtype and device here)."""
        return self.proj.weight

    def forward(self, pixel_values: Tensor) -> Tensor:
        """``[N, C*T*p*p]`` or ``[N, C, T, p, p]`` -> ``[N, D]``."""
        v = self.vision
        if pixel_values[0].numel() != v.patch_dim:
            raise ValueError(
                f"GLM pixel_values rows must hold in_channels x temporal_patch_size x patch_size^2"
                f" = {v.patch_dim} values; got shape {tuple(pixel_values.shape)}")
        x = pixel_values.reshape(-1, v.in_channels, v.temporal_patch_size, v.patch_size,
                                 v.patch_size)
        return self.norm(self.proj(x).flatten(1))


class GlmPositionTable(torch.nn.Module):
    """The learned table ``weight [side*side, D]`` (HF ``embeddings.position_embedding.weight``,
    row-major), sampled bicubically at every patch centre of each frame's grid."""

    def __init__(self, side: int, dim: int, kernel: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.side = side
        self.kernel = kernel
        self.weight = torch.nn.Parameter(torch.empty(side * side, dim, dtype=dtype))
        torch.nn.init.normal_(self.weight)  # nn.Embedding's init; imports overwrite it

    def sampled(self, height: int, width: int) -> Tensor:
        """The table at the patch centres of an ``(height, width)`` grid, ``[h*w, D]`` raster
        order, in fp32: ``grid_sample`` (bicubic, ``align_corners=False``, border) at
        ``((c + 0.5) / w) * 2 - 1``, ``((r + 0.5) / h) * 2 - 1``, as transformers does."""
        table = self.weight.view(self.side, self.side, -1).permute(2, 0, 1)[None].float()
        r, c = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
        norm_w = (c.flatten().float() + 0.5) / width * 2 - 1
        norm_h = (r.flatten().float() + 0.5) / height * 2 - 1
        grid = torch.stack([norm_w, norm_h], dim=-1)[None, :, None].to(table.device)
        out = F.grid_sample(table, grid, mode="bicubic", align_corners=False,
                            padding_mode="border")
        return out[0, :, :, 0].t()

    def forward(self, x: Tensor, segments: Tensor) -> Tensor:
        """``x [N, D]`` patch tokens of ``segments [S, 3]`` (block-major) -> ``x + pos``."""
        sizes = sorted({(h, w) for _, h, w in segments.tolist()})
        tables, offsets, start = [], {}, 0
        for h, w in sizes:  # sample once per distinct grid, then gather every patch's row
            tables.append(self.sampled(h, w))
            offsets[(h, w)] = start
            start += h * w
        index = torch.cat([(offsets[(h, w)] + block_major_index(h, w, self.kernel)).repeat(t)
                           for t, h, w in segments.tolist()])
        pos = torch.cat(tables).index_select(0, index.to(x.device))
        # transformers casts the fp32 sample to the table's dtype before the add.
        return x + pos.to(self.weight.dtype).to(x.dtype)


# --------------------------------------------------------------------------- the tower


def megatron_vision_view(vision: GlmVisionConfig) -> VisionConfig:
    """The fields :func:`~megatron_vlm.models.vision.moonvit.build_vision_transformer_config`
    reads, as a ``VisionConfig``; its block structure (LayerNorm, biases, GELU) is then edited
    to GLM's in :func:`glm_vision_transformer_config`."""
    return VisionConfig(
        hidden_size=vision.hidden_size, num_layers=vision.num_layers,
        num_attention_heads=vision.num_attention_heads, ffn_hidden_size=vision.ffn_hidden_size,
        patch_size=vision.patch_size, in_channels=vision.in_channels,
        merge_kernel_height=vision.merge_kernel_height,
        merge_kernel_width=vision.merge_kernel_width, rope_theta=vision.rope_theta,
        norm_epsilon=vision.norm_epsilon, init_method_std=vision.init_method_std,
        attention_dropout=vision.attention_dropout, hidden_dropout=vision.hidden_dropout,
        recompute=vision.recompute, recompute_num_layers=vision.recompute_num_layers,
        qk_clip=vision.qk_clip, log_max_attention_logit=vision.log_max_attention_logit,
        parallel_mode=vision.parallel_mode,
    )


def glm_vision_transformer_config(vision: GlmVisionConfig, parallel: ParallelConfig,
                                  params_dtype: str = "fp32",
                                  choice: KernelChoice | None = None) -> TransformerConfig:
    """MoonViT's megatron mapping (shape, parallelism, numerics, recompute) with GLM's block
    structure set field by field: RMSNorm, no linear biases (qkv bias per
    ``model.vision.attention_bias``), SwiGLU (``silu(gate) * up``, megatron's ``linear_fc1`` =
    ``[gate; up]``)."""
    base = build_vision_transformer_config(megatron_vision_view(vision), parallel, params_dtype,
                                           choice)
    return dataclasses.replace(
        base, normalization="RMSNorm", add_bias_linear=False,
        add_qkv_bias=vision.attention_bias, gated_linear_unit=True, activation_func=F.silu,
        bias_activation_fusion=False,
    )


def glm_layer_spec(choice: KernelChoice) -> ModuleSpec:
    """One Glm4v block: MoonViT's layer (megatron's TransformerLayer, modules for ``choice``)
    with the rotate-half 2D RoPE attention; norms and the gated MLP follow the config."""
    return moonvit_layer_spec(choice, attention=KeyeRopeSelfAttention)


class GlmViT(PackedViT):
    """The Glm4v vision tower: a :class:`~megatron_vlm.models.vision.packed_vit.PackedViT` whose
    segments are temporal patches (:func:`~megatron_vlm.families.keye.vision.frame_grid`),
    patches block-major.

    Parameter names (local spec): ``patch_embed.proj`` (Conv3d), ``patch_embed.norm``
    (RMSNorm), ``pos_embed.weight`` ``[side*side, D]``, ``encoder.layers.{i}.{input_layernorm,
    self_attention.linear_qkv, self_attention.linear_proj, pre_mlp_layernorm, mlp.linear_fc1,
    mlp.linear_fc2}``, ``encoder.final_layernorm``. ``linear_qkv`` rows are megatron's per-head
    ``[q_h; k_h; v_h]``; ``linear_fc1`` is ``[gate; up]``.

    ``forward`` returns ``[sum over temporal patches of h*w/4, 4, D]`` (the 2x2 patches of each
    LLM token, row-major): what :class:`~megatron_vlm.families.glm.merger.GlmMerger` takes.
    """

    layer_spec = staticmethod(glm_layer_spec)
    kernel_choice = staticmethod(vit_kernel_choice)
    max_frames = _NO_FRAME_LIMIT

    def patch_embedding(self) -> GlmPatchEmbed:
        """Conv3d over a temporal patch, then RMSNorm."""
        return GlmPatchEmbed(self.vision, dtype=self.config.params_dtype)

    def position_table(self) -> GlmPositionTable:
        """The learned table, sampled bicubically per frame grid."""
        vis = self.vision
        return GlmPositionTable(vis.pos_emb_side, vis.hidden_size, vis.merge_kernel_height,
                                dtype=self.config.params_dtype)

    def rope_angles(self, segments: Tensor) -> Tensor:
        """``[row | col]`` angles of every patch, block-major."""
        vis = self.vision
        return glm_rope_angles(segments, vis.head_dim, vis.rope_theta, vis.merge_kernel_height)

    def segments(self, grid: Tensor) -> Tensor:
        """One ``[1, h, w]`` row per image or temporal patch of a video."""
        return frame_grid(grid)

    def _merge(self, x: Tensor, segments: Tensor) -> Tensor:
        """Block-major ``[N, D]`` -> ``[N / k, k, D]``: the patches of a token are consecutive."""
        del segments  # every segment's patch count is a multiple of k (checked by the index)
        return x.view(-1, self.vision.merge_size, x.shape[-1])


def build_glm_vision(
    vision: GlmVisionConfig,
    parallel: ParallelConfig,
    params_dtype: str = "fp32",
    *,
    pg_collection=None,
    kernels: KernelConfig | None = None,
    choice: KernelChoice | None = None,
) -> GlmViT:
    """Build the tower on ``pg_collection`` (None: the process's groups), layers from ``choice``
    (else resolved from ``kernels``); TP ``split`` / ``tp`` mode and CP as
    :func:`~megatron_vlm.models.vision.moonvit.build_moonvit` does
    (:func:`~megatron_vlm.models.vision.packed_vit.tower_groups`)."""
    if choice is None:
        choice = vit_kernel_choice(vision, params_dtype, kernels)
    groups = tower_groups(vision.parallel_mode, parallel, pg_collection)
    config = glm_vision_transformer_config(vision, groups.parallel, params_dtype, choice)
    return GlmViT(config, vision, choice=choice, **groups.tower_kwargs())
