"""The Keye-VL 1.5 vision tower: SigLIP-so400m NaViT with 2D RoPE on megatron-core blocks.

Per patch (``pixel_values [N, 3, 14, 14]``, raster order item, frame, row, col): Conv2d patch
embedding -> + the learned ``27x27`` absolute table bilinearly resized (``align_corners=False``)
to the frame's ``(h, w)`` grid -> megatron ``TransformerBlock`` of SigLIP layers (pre-LN,
LayerNorm eps 1e-6, biases on q/k/v/out and the MLP, GELU-tanh MLP) whose attention rotates q/k
with Keye's 2D RoPE -> post-layernorm (FAMILIES.md §1; vLLM ``keye.py`` is the released code).

Temporal patch 1: a video item of ``t`` frames is ``t`` images. Every frame (and every image) is
one attention segment of the packed THD sequence (``cu_seqlens`` over ``h*w``), gets the same
position table and the same RoPE rows, and merges 2x2 on its own (no temporal pooling), so the
tower first rewrites ``grid_thw [M, 3]`` as one ``[1, h, w]`` row per frame (:func:`frame_grid`)
and then treats frames exactly as MoonViT treats images.

RoPE as Keye computes it: ``inv_freq = 1 / theta^(arange(0, d/2, 2) / (d/2))`` (18 for d = 72),
per patch ``[row * inv_freq | col * inv_freq]`` (d/2), repeated twice (d), applied NeoX style
(``x * cos + rotate_half(x) * sin``) in fp32, rows and columns from the frame's raster index
(``row = i // w``). q/k rows keep the checkpoint's (SigLIP's) order: no permutation on import.

Reused from ``models/vision/``: the megatron config mapping (``moonvit.py``), layer modules per
kernel choice (``models/specs.py``), raster-order angles (``rope2d.rope_2d_angles``) and
``packed_vit.PackedViT``, the packed tower MoonViT is too: encode path, 2x2 merge
(``merger.tpool_patch_merger`` with t = 1), TP ``split`` mode (``parallel/vision_split.py``,
items = frames) and the group set-up of the build function.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.spec_utils import ModuleSpec
from torch import Tensor

from megatron_vlm.config.model import KernelConfig
from megatron_vlm.config.parallel import ParallelConfig
from megatron_vlm.config.vision import VisionConfig
from megatron_vlm.families.keye.config import SiglipVisionConfig
from megatron_vlm.models.specs import KernelChoice
from megatron_vlm.models.vision.moonvit import (
    build_vision_transformer_config,
    moonvit_layer_spec,
    vit_kernel_choice,
)
from megatron_vlm.models.vision.packed_vit import PackedViT, tower_groups
from megatron_vlm.models.vision.rope2d import Rope2DSelfAttention, rope_2d_angles

_NO_FRAME_LIMIT = 2**62  # Keye has no chunk size: any t frames, each its own segment


# --------------------------------------------------------------------------- frames and RoPE


def frame_grid(grid_thw: Tensor) -> Tensor:
    """``grid_thw [M, 3]`` -> ``[sum(t), 3]``: one ``[1, h, w]`` row per image or video frame,
    in item then frame order (vLLM ``split_thw``)."""
    grid = grid_thw.detach().cpu().long()
    rows = torch.cat([torch.ones_like(grid[:, :1]), grid[:, 1:]], dim=1)
    return rows.repeat_interleave(grid[:, 0], dim=0)


def keye_rope_angles(frames: Tensor, head_dim: int, theta: float) -> Tensor:
    """Per-patch angles ``[N, head_dim/2]`` (fp32, CPU) for the patches of ``frames [F, 3]``
    (t = 1 rows) in raster order: ``[row * inv_freq | col * inv_freq]``, each ``head_dim/4``
    wide, ``inv_freq_i = theta^(-4i/head_dim)``."""
    # MoonViT's angles are the same frequencies and raster ids, interleaved (col_i, row_i).
    pairs = rope_2d_angles(frames, head_dim, theta).unflatten(-1, (-1, 2))
    return torch.cat([pairs[..., 1], pairs[..., 0]], dim=-1)


def apply_rope_half(x: Tensor, angles: Tensor) -> Tensor:
    """Rotate ``x [N, ..., d]`` NeoX style (``x*cos + rotate_half(x)*sin``) by ``angles
    [N, d/2]`` repeated twice along the head dim; math in fp32, result in ``x``'s dtype."""
    emb = torch.cat([angles, angles], dim=-1)
    shape = (emb.shape[0],) + (1,) * (x.dim() - 2) + (emb.shape[1],)
    cos, sin = emb.cos().view(shape), emb.sin().view(shape)
    xf = x.float()
    x1, x2 = xf.chunk(2, dim=-1)
    return (xf * cos + torch.cat([-x2, x1], dim=-1) * sin).to(x.dtype)


class KeyeRopeSelfAttention(Rope2DSelfAttention):
    """MoonViT's 2D-RoPE attention (angles handed in as ``rotary_pos_emb``, rotated after the
    qkv split, megatron's own RoPE bypassed: see :class:`Rope2DSelfAttention`) with Keye's
    rotate-half layout instead of MoonViT's interleaved pairs."""

    def get_query_key_value_tensors(self, hidden_states: Tensor, *args, **kwargs):
        """q, k, v ``[s, b, np, hn]`` from megatron, with q and k rotated."""
        # megatron's split, not the parent's (which would rotate interleaved pairs).
        out = SelfAttention.get_query_key_value_tensors(self, hidden_states, *args, **kwargs)
        angles = self._rope_angles
        if angles is None:
            return out
        assert kwargs.get("split_qkv", True), "KeyeRopeSelfAttention needs split q, k, v"
        query, key, *rest = out
        if angles.shape[0] != query.shape[0]:
            raise RuntimeError(
                f"2D RoPE angles cover {angles.shape[0]} tokens but attention sees "
                f"{query.shape[0]} (sequence-parallel padding must pad the angles too)")
        return (apply_rope_half(query, angles), apply_rope_half(key, angles), *rest)


# --------------------------------------------------------------------------- position table


class SiglipPositionTable(torch.nn.Module):
    """SigLIP's learned absolute table ``weight [side*side, D]`` (the checkpoint's
    ``embeddings.position_embedding.weight``, row-major), bilinearly resized to each frame."""

    def __init__(self, side: int, dim: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.side = side
        self.weight = torch.nn.Parameter(torch.empty(side * side, dim, dtype=dtype))
        torch.nn.init.normal_(self.weight, std=dim ** -0.5)  # SigLIP's init; imports overwrite

    def resized(self, height: int, width: int) -> Tensor:
        """The table at an ``(height, width)`` grid, ``[height * width, D]`` row-major.
        Resized in fp32 (identity at the table's own size, as ``align_corners=False`` is)."""
        table = self.weight.view(self.side, self.side, -1).permute(2, 0, 1).unsqueeze(0)
        out = F.interpolate(table.float(), size=(height, width), mode="bilinear",
                            align_corners=False)
        return out[0].flatten(1).t().to(self.weight.dtype)

    def forward(self, x: Tensor, frames: Tensor) -> Tensor:
        """``x [N, D]`` patch tokens of ``frames [F, 3]`` (t = 1 rows) -> ``x + pos``."""
        sizes = sorted({(h, w) for _, h, w in frames.tolist()})
        tables, offsets, start = [], {}, 0
        for h, w in sizes:  # resize once per distinct grid, then gather every patch's row
            tables.append(self.resized(h, w))
            offsets[(h, w)] = start
            start += h * w
        index = torch.cat([offsets[(h, w)] + torch.arange(h * w) for _, h, w in frames.tolist()])
        return x + torch.cat(tables).index_select(0, index.to(x.device)).to(x.dtype)


# --------------------------------------------------------------------------- the tower


def megatron_vision_view(vision: SiglipVisionConfig) -> VisionConfig:
    """The fields :func:`~megatron_vlm.models.vision.moonvit.build_vision_transformer_config`
    reads, as a ``VisionConfig`` (same block structure: pre-LN, biases, GELU-tanh MLP); the
    MoonViT-only fields (its tables, temporal chunks) are unused there."""
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


def siglip_layer_spec(choice: KernelChoice) -> ModuleSpec:
    """One SigLIP layer with Keye's 2D RoPE: MoonViT's layer (megatron's TransformerLayer,
    modules for ``choice`` from ``models/specs.py``) with :class:`KeyeRopeSelfAttention`."""
    return moonvit_layer_spec(choice, attention=KeyeRopeSelfAttention)


class KeyeSiglipViT(PackedViT):
    """The Keye-VL 1.5 vision tower: a :class:`~megatron_vlm.models.vision.packed_vit.PackedViT`
    whose segments are frames (:func:`frame_grid`; split mode shares out frames, the merger
    merges each frame on its own), with SigLIP's resized table and Keye's rotate-half RoPE.

    Parameter names (local spec): ``patch_embed`` (Conv2d), ``pos_embed.weight``
    ``[side*side, D]``, ``encoder.layers.{i}.{input_layernorm, self_attention.linear_qkv,
    self_attention.linear_proj, pre_mlp_layernorm, mlp.linear_fc1, mlp.linear_fc2}``,
    ``encoder.final_layernorm`` (SigLIP's ``post_layernorm``). ``linear_qkv`` rows are megatron's
    per-head ``[q_h; k_h; v_h]``, each in SigLIP's own row order.

    ``forward`` returns ``[sum over frames of h*w/k, k, D]`` (``k`` = 2x2 patches of one LLM
    token, sub-token order row-major, frame after frame): what :class:`KeyeMerger` takes.
    ``num_encoded_items`` and ``encoded_item_log`` count frames ``(1, h, w, pixel sum)``.
    """

    layer_spec = staticmethod(siglip_layer_spec)
    kernel_choice = staticmethod(vit_kernel_choice)
    max_frames = _NO_FRAME_LIMIT

    def position_table(self) -> SiglipPositionTable:
        """SigLIP's learned table, resized to every frame."""
        return SiglipPositionTable(self.vision.pos_emb_side, self.vision.hidden_size,
                                   dtype=self.config.params_dtype)

    def rope_angles(self, segments: Tensor) -> Tensor:
        """Keye's ``[row | col]`` angles of every patch."""
        return keye_rope_angles(segments, self.vision.head_dim, self.vision.rope_theta)

    def segments(self, grid: Tensor) -> Tensor:
        """One ``[1, h, w]`` row per image or video frame (:func:`frame_grid`)."""
        return frame_grid(grid)


def build_keye_vision(
    vision: SiglipVisionConfig,
    parallel: ParallelConfig,
    params_dtype: str = "fp32",
    *,
    pg_collection=None,
    kernels: KernelConfig | None = None,
    choice: KernelChoice | None = None,
) -> KeyeSiglipViT:
    """Build the tower on ``pg_collection`` (None: the process's groups), layers from ``choice``
    (else resolved from ``kernels``); TP ``split`` / ``tp`` mode and CP as
    :func:`~megatron_vlm.models.vision.moonvit.build_moonvit` does
    (:func:`~megatron_vlm.models.vision.packed_vit.tower_groups`)."""
    if choice is None:
        choice = vit_kernel_choice(vision, params_dtype, kernels)
    groups = tower_groups(vision.parallel_mode, parallel, pg_collection)
    config = build_vision_transformer_config(megatron_vision_view(vision), groups.parallel,
                                             params_dtype, choice)
    return KeyeSiglipViT(config, vision, choice=choice, **groups.tower_kwargs())
