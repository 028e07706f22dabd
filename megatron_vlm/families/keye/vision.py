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

Reused from MoonViT (``models/vision/``): the megatron config mapping, layer modules per kernel
choice (``models/specs.py``), the packed-sequence parameters, raster-order angles
(``rope2d.rope_2d_angles``), the 2x2 regroup (``merger.tpool_patch_merger`` with t = 1) and the
TP ``split`` mode (``parallel/vision_split.py``, items = frames).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.tensor_parallel.mappings import (
    gather_from_sequence_parallel_region,
    scatter_to_sequence_parallel_region,
)
from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlock, TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules
from torch import Tensor

from megatron_vlm.config.model import KernelConfig
from megatron_vlm.config.parallel import ParallelConfig
from megatron_vlm.config.vision import VisionConfig
from megatron_vlm.families.keye.config import SiglipVisionConfig
from megatron_vlm.models.specs import KernelChoice, resolve_kernels, vit_modules
from megatron_vlm.models.vision.merger import tpool_patch_merger
from megatron_vlm.models.vision.moonvit import (
    build_vision_transformer_config,
    check_grid,
    packed_seq_params,
)
from megatron_vlm.models.vision.rope2d import Rope2DSelfAttention, rope_2d_angles
from megatron_vlm.parallel.runtime import groups_or_default
from megatron_vlm.parallel.vision_split import (
    assign_items,
    gather_items,
    item_costs,
    mark_replicated,
    replica_process_groups,
    set_replica_ids,
)

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


def siglip_kernel_choice(vision: SiglipVisionConfig, params_dtype: str = "fp32",
                         kernels: KernelConfig | None = None) -> KernelChoice:
    """Layer implementations of a tower built alone from ``kernels`` (None = all ``auto``)."""
    return resolve_kernels(kernels, params_dtype=params_dtype,
                           attention_dropout=vision.attention_dropout,
                           head_dims=(vision.head_dim,))


def siglip_layer_spec(choice: KernelChoice) -> ModuleSpec:
    """One SigLIP layer with Keye's 2D RoPE: megatron's TransformerLayer, modules (local or
    Transformer Engine, attention kernel) from ``models/specs.py`` for ``choice``."""
    m = vit_modules(choice)
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=m.input_layernorm,
            self_attention=ModuleSpec(
                module=KeyeRopeSelfAttention,
                params={"attn_mask_type": AttnMaskType.no_mask},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=m.linear_qkv, core_attention=m.core_attention,
                    linear_proj=m.linear_proj, q_layernorm=IdentityOp, k_layernorm=IdentityOp,
                ),
            ),
            self_attn_bda=get_bias_dropout_add,
            pre_mlp_layernorm=m.pre_mlp_layernorm,
            mlp=ModuleSpec(
                module=MLP,
                submodules=MLPSubmodules(linear_fc1=m.linear_fc1, linear_fc2=m.linear_fc2),
            ),
            mlp_bda=get_bias_dropout_add,
        ),
    )


class KeyeSiglipViT(MegatronModule):
    """The Keye-VL 1.5 vision tower.

    Parameter names (local spec): ``patch_embed`` (Conv2d), ``pos_embed.weight``
    ``[side*side, D]``, ``encoder.layers.{i}.{input_layernorm, self_attention.linear_qkv,
    self_attention.linear_proj, pre_mlp_layernorm, mlp.linear_fc1, mlp.linear_fc2}``,
    ``encoder.final_layernorm`` (SigLIP's ``post_layernorm``). ``linear_qkv`` rows are megatron's
    per-head ``[q_h; k_h; v_h]``, each in SigLIP's own row order.

    ``forward`` returns ``[sum over frames of h*w/k, k, D]`` (``k`` = 2x2 patches of one LLM
    token, sub-token order row-major, frame after frame): what :class:`KeyeMerger` takes.
    """

    def __init__(self, config: TransformerConfig, vision: SiglipVisionConfig,
                 pg_collection=None, choice: KernelChoice | None = None, split_group=None,
                 split_reduce_group=None, replica_group=None) -> None:
        super().__init__(config=config)
        self.vision = vision
        self.split_group = split_group
        """Ranks sharing this micro-batch's frames, each encoding its share (MoonViT's
        ``split_group``); None: encode every frame."""
        self.split_reduce_group = split_reduce_group
        """The CP group under context parallelism: the gather's backward sums over it."""
        self.replica_group = replica_group
        """Split mode under TP: the TP group the tower is replicated over."""
        self.num_encoded_items = 0
        """Frames (images and video frames) this rank has run through :meth:`encode`."""
        self.encoded_item_log: list[tuple[int, int, int, float]] | None = None
        """Test-only: when set to a list, :meth:`encode` appends ``(1, h, w, pixel sum)`` of
        every frame it encodes (MoonViT logs items; here the unit of work is a frame)."""
        if choice is None:
            choice = siglip_kernel_choice(vision, "bf16" if config.bf16 else "fp32")
        self.patch_embed = torch.nn.Conv2d(
            vision.in_channels, vision.hidden_size, kernel_size=vision.patch_size,
            stride=vision.patch_size, dtype=config.params_dtype)
        self.pos_embed = SiglipPositionTable(vision.pos_emb_side, vision.hidden_size,
                                             dtype=config.params_dtype)
        self.encoder = TransformerBlock(
            config=config,
            spec=TransformerBlockSubmodules(
                layer_specs=[siglip_layer_spec(choice)] * vision.num_layers,
                layer_norm=vit_modules(choice).final_norm),
            post_layer_norm=True, pre_process=True, post_process=True,
            pg_collection=groups_or_default(pg_collection, required=True),
        )
        self.tp_group = self.encoder.tp_group

    def encode(self, pixel_values: Tensor, grid_thw: Tensor) -> Tensor:
        """Pre-merge features ``[N, D]`` (after the post-layernorm) for ``pixel_values
        [N, C, p, p]`` in raster order (item, frame, row, col) and ``grid_thw [M, 3]``.

        With sequence parallelism the result is gathered to every TP rank and its backward
        splits the gradient (consumers run replicated over TP, as MoonViT's do).
        """
        grid = grid_thw.detach().cpu().long()
        num_patches = pixel_values.shape[0]
        check_grid(grid, num_patches, _NO_FRAME_LIMIT)
        frames = frame_grid(grid)
        self.num_encoded_items += frames.shape[0]
        if self.encoded_item_log is not None:
            sums = pixel_values.detach().double().split(frames.prod(dim=1).tolist())
            self.encoded_item_log.extend(
                (*map(int, f), float(x.sum())) for f, x in zip(frames.tolist(), sums))
        device = pixel_values.device
        x = self.patch_embed(pixel_values.to(self.patch_embed.weight.dtype)).flatten(1)
        x = self.pos_embed(x, frames).unsqueeze(1)  # [N, 1, D]: megatron's [s, b, h]
        angles = keye_rope_angles(frames, self.vision.head_dim, self.vision.rope_theta)
        # SP shards the sequence evenly over TP: pad with one empty document (MoonViT.encode).
        pad = (-num_patches) % self.config.tensor_model_parallel_size
        pad = pad if self.config.sequence_parallel else 0
        x = F.pad(x, (0, 0, 0, 0, 0, pad))
        angles = F.pad(angles, (0, 0, 0, pad)).to(device)
        params = packed_seq_params(frames.prod(dim=1), pad, device)  # one segment per frame
        if self.config.sequence_parallel:
            x = scatter_to_sequence_parallel_region(x, group=self.tp_group)
        x = self.encoder(hidden_states=x, attention_mask=None, rotary_pos_emb=angles,
                         packed_seq_params=params)
        if self.config.sequence_parallel:
            x = gather_from_sequence_parallel_region(x, tensor_parallel_output_grad=False,
                                                     group=self.tp_group)
        return x[:num_patches, 0]

    def forward(self, pixel_values: Tensor, grid_thw: Tensor) -> Tensor:
        """Features grouped for the merger, ``[tokens, kh*kw, D]`` (see the class docstring)."""
        grid = grid_thw.detach().cpu().long()
        if self.split_group is not None and self.split_group.size() > 1:
            return self._forward_split(pixel_values, grid)
        x = self.encode(pixel_values, grid)
        return tpool_patch_merger(x, frame_grid(grid), self.vision.merge_kernel_height,
                                  self.vision.merge_kernel_width)

    def _forward_split(self, pixel_values: Tensor, grid: Tensor) -> Tensor:
        """Split mode: encode this rank's share of the frames, gather all in frame order."""
        check_grid(grid, pixel_values.shape[0], _NO_FRAME_LIMIT)
        vis, group, frames = self.vision, self.split_group, frame_grid(grid)
        owners = assign_items(item_costs(frames, vis.hidden_size, vis.ffn_hidden_size),
                              group.size())
        mine = [f for f, owner in enumerate(owners) if owner == group.rank()]
        if mine:
            bounds = F.pad(frames.prod(dim=1).cumsum(0), (1, 0)).tolist()
            index = torch.cat([torch.arange(bounds[f], bounds[f + 1]) for f in mine])
            x = self.encode(pixel_values.index_select(0, index.to(pixel_values.device)),
                            frames[mine])
            local = tpool_patch_merger(x, frames[mine], vis.merge_kernel_height,
                                       vis.merge_kernel_width)
        else:
            local = pixel_values.new_zeros(0, vis.merge_size, vis.hidden_size,
                                           dtype=self.patch_embed.weight.dtype)
        rows = (frames[:, 1] * frames[:, 2] // vis.merge_size).tolist()
        return gather_items(local, self.patch_embed.weight, rows, owners, group,
                            self.split_reduce_group)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (),
                           metadata: dict | None = None) -> dict:
        """megatron's, with one main replica per TP group in split mode (``set_replica_ids``)."""
        state = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        if self.replica_group is not None:
            set_replica_ids(state, self.replica_group.rank())
        return state


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
    :func:`~megatron_vlm.models.vision.moonvit.build_moonvit` does."""
    if choice is None:
        choice = siglip_kernel_choice(vision, params_dtype, kernels)
    groups = groups_or_default(pg_collection, required=True)
    tower_groups, parallel_tower = groups, parallel
    split_group = replica_group = reduce_group = None
    if vision.parallel_mode == "split" and parallel.tp > 1:
        if not parallel.sequence_parallel:
            raise ValueError(
                "model.vision.parallel_mode=split needs parallel.sequence_parallel=true (megatron "
                "sums the replicated tower's gradients over TP only then); or set "
                "model.vision.parallel_mode=tp")
        split_group = replica_group = groups.tp
        parallel_tower = ParallelConfig(tp=1, sequence_parallel=False)
        tower_groups = replica_process_groups(groups)
    if parallel.cp > 1:
        reduce_group = groups.cp
        split_group = groups.tp_cp if vision.parallel_mode == "split" else reduce_group
    config = build_vision_transformer_config(megatron_vision_view(vision), parallel_tower,
                                             params_dtype, choice)
    model = KeyeSiglipViT(config, vision, pg_collection=tower_groups, choice=choice,
                          split_group=split_group, split_reduce_group=reduce_group,
                          replica_group=replica_group)
    if replica_group is not None:
        mark_replicated(model)
    return model
