"""InternViT-300M / InternViT-6B (InternVL3.5's vision towers) on megatron-core blocks.

Per tile (``pixel_values [N, 3, 14, 14]`` raster patches, item then tile then row then col):
Conv2d patch embedding (bias) -> the CLS token prepended -> + the learned ``[1, 1 + 32*32, D]``
table (row 0 the CLS token's) -> megatron ``TransformerBlock`` of pre-norm layers with layer
scale: ``x += lambda_1 * proj(attn(norm1(x)))``, ``x += lambda_2 * fc2(gelu(fc1(norm2(x))))``
(biases on the output projection and the MLP) -> no final norm -> the CLS row dropped
(FAMILIES.md §3; transformers 5.25 ``InternVLVisionModel`` with ``use_mean_pooling`` (no final
norm) and ``vision_feature_select_strategy='default'`` (CLS dropped), as
``InternVLModel.get_image_features`` runs it).

The two sizes differ in the block: 300M has LayerNorm and q/k/v biases; 6B has RMSNorm, no q/k/v
bias, and RMS-normalises q and k over the WHOLE width (all heads at once, HF ``q_norm`` /
``k_norm`` of size ``hidden``), not per head as megatron's ``qk_layernorm`` does: the
attention's own :class:`WholeWidthRMSNorm` s all-reduce the sum of squares over TP, so TP
inside the tower gives the unsharded result.
No RoPE: positions are the learned table only.

How the tower takes the packed batch: the data side hands raster patches ``[N, 3, 14, 14]``
and one ``grid_thw`` row ``(t, h, w)`` per item; an InternVL image item is ``(k, 32, 32)`` -- its
``k`` tiles (thumbnail last) -- and a video item ``(n, 32, 32)``, one tile per frame. Every
tile is its own attention segment of ``1 + h*w`` tokens (CLS first) in the THD sequence
(:func:`~megatron_vlm.families.keye.vision.frame_grid`), so tiles never attend to each other;
after the CLS rows are dropped each tile's ``32x32`` features merge 2x2 row-major, which is
InternVL's pixel shuffle 0.5 (v2) (``projector.pixel_shuffle`` shows the identity).

Megatron has no layer scale and no bias-free qkv with biased projections: the layer scales are
the layers' ``self_attn_bda`` / ``mlp_bda`` modules (:class:`LayerScaleBiasDropoutAdd`,
parameter ``weight``), the bias-free qkv a linear class that ignores the ``bias`` megatron passes
(:func:`without_bias`); megatron 0.16.1 ``TransformerLayer`` builds both from the layer spec.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from megatron.core.tensor_parallel.layers import set_tensor_model_parallel_attributes
from megatron.core.tensor_parallel.mappings import (
    gather_from_sequence_parallel_region,
    scatter_to_sequence_parallel_region,
)
from megatron.core.transformer.attention import SelfAttention
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.utils import make_sharded_tensors_for_checkpoint
from torch import Tensor

from megatron_vlm.config.model import KernelConfig
from megatron_vlm.config.parallel import ParallelConfig
from megatron_vlm.config.vision import VisionConfig
from megatron_vlm.families.internvl.config import InternVisionConfig
from megatron_vlm.families.keye.vision import frame_grid
from megatron_vlm.models.specs import KernelChoice
from megatron_vlm.models.vision.moonvit import (
    build_vision_transformer_config,
    moonvit_layer_spec,
    vit_kernel_choice,
)
from megatron_vlm.models.vision.packed_vit import (
    PackedViT,
    check_grid,
    packed_seq_params,
    tower_groups,
)

_NO_FRAME_LIMIT = 2**62  # any number of tiles / frames per item, each its own segment
QK_NORM_EPSILON = 1e-6
"""Epsilon of the 6B's q/k norms: transformers builds them with RMSNorm's default, whatever
``layer_norm_eps`` is."""


# --------------------------------------------------------------------------- block parts


class LayerScaleBiasDropoutAdd(torch.nn.Module):
    """Megatron's bias-dropout-add with InternViT's per-channel layer scale:
    ``residual + weight * dropout(x + bias)`` (HF ``lambda_1`` / ``lambda_2``). Called as
    megatron calls a bda: ``module(training, fused)(x_with_bias, residual, prob)``."""

    def __init__(self, hidden_size: int, init_value: float, dtype: torch.dtype,
                 sequence_parallel: bool) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.full((hidden_size,), init_value, dtype=dtype))
        # Under SP each TP rank scales its own slice of the sequence with a replicated weight:
        # megatron's finalize_model_grads all-reduces params marked so (as for the norms).
        self.weight.sequence_parallel = sequence_parallel

    def forward(self, training: bool, fused: bool) -> Callable[..., Tensor]:
        """The bda function for this layer (``fused`` is ignored: no fused kernel scales)."""
        del fused

        def bias_dropout_scale_add(x_with_bias: tuple[Tensor, Tensor | None], residual: Tensor,
                                   prob: float) -> Tensor:
            x, bias = x_with_bias
            if bias is not None:
                x = x + bias
            return residual + self.weight * F.dropout(x, p=prob, training=training)

        return bias_dropout_scale_add


class WholeWidthRMSNorm(torch.nn.Module):
    """RMSNorm of q (or k) ``[s, b, heads, head_dim]`` over all heads together (HF
    ``InternVLVisionRMSNorm(hidden)`` applied before the head split), in fp32 like HF.

    :class:`InternViTSelfAttention`'s ``q_norm`` / ``k_norm``; the weight is this TP rank's
    heads' share ``[local heads * head_dim]`` (TP-sharded on dim 0) and the sum of squares is
    all-reduced over ``tp_group``, forward and backward (every rank's output depends on every
    rank's input). Epsilon: HF builds these norms at RMSNorm's default 1e-6 whatever
    ``layer_norm_eps`` is."""

    def __init__(self, config: TransformerConfig,
                 tp_group: torch.distributed.ProcessGroup | None) -> None:
        super().__init__()
        tp = config.tensor_model_parallel_size
        self.full_width = config.num_attention_heads * config.kv_channels
        self.eps = QK_NORM_EPSILON
        self.weight = torch.nn.Parameter(torch.ones(self.full_width // tp,
                                                    dtype=config.params_dtype))
        set_tensor_model_parallel_attributes(self.weight, is_parallel=True, dim=0, stride=1)
        self.tp_group = tp_group

    def forward(self, x: Tensor) -> Tensor:
        """``x [s, b, local heads, head_dim]`` -> normalised, same shape and dtype."""
        xf = x.float().flatten(-2)
        sum_sq = xf.pow(2).sum(-1, keepdim=True)
        if self.tp_group is not None and self.tp_group.size() > 1:
            sum_sq = torch.distributed.nn.functional.all_reduce(sum_sq, group=self.tp_group)
        xf = xf * torch.rsqrt(sum_sq / self.full_width + self.eps)
        return (self.weight * xf.to(x.dtype)).view_as(x)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (),
                           metadata: dict | None = None) -> dict:
        """The weight sharded over TP on dim 0, as megatron's column-parallel weights are."""
        return make_sharded_tensors_for_checkpoint(
            self.state_dict(prefix="", keep_vars=True), prefix, {"weight": 0}, sharded_offsets,
            tp_group=self.tp_group, dp_cp_group=(metadata or {}).get("dp_cp_group"))


class InternViTSelfAttention(SelfAttention):
    """megatron's ``SelfAttention`` (no RoPE: the tower passes none) with, when built with
    ``qk_norm=True`` (InternViT-6B), whole-width RMSNorms ``q_norm`` / ``k_norm`` applied to q
    and k after megatron's split.

    Not megatron's ``q_layernorm`` / ``k_layernorm`` slots: megatron 0.16.1's
    ``finalize_model_grads`` sums over TP the gradient of every parameter whose name contains
    ``q_layernorm`` / ``k_layernorm`` when the model's config has ``qk_layernorm`` (a Qwen3
    LLM does), which is right for its per-head norms, replicated over TP, and wrong for these
    TP-sharded ones."""

    def __init__(self, *args, qk_norm: bool = False, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.q_norm = self.k_norm = None
        if qk_norm:
            self.q_norm = WholeWidthRMSNorm(self.config, self.pg_collection.tp)
            self.k_norm = WholeWidthRMSNorm(self.config, self.pg_collection.tp)

    def get_query_key_value_tensors(self, hidden_states: Tensor, *args, **kwargs):
        """q, k, v ``[s, b, np, hn]`` from megatron, q and k normalised over all heads."""
        out = super().get_query_key_value_tensors(hidden_states, *args, **kwargs)
        if self.q_norm is None:
            return out
        assert kwargs.get("split_qkv", True), "InternViTSelfAttention needs split q, k, v"
        query, key, *rest = out
        return (self.q_norm(query), self.k_norm(key), *rest)


@functools.cache
def without_bias(linear: type) -> type:
    """``linear`` (a megatron / TE parallel linear class) built without bias whatever megatron
    passes: megatron 0.16.1 gives ``linear_qkv`` a bias iff ``add_bias_linear or add_qkv_bias``,
    and InternViT-6B has biases on the output projection and the MLP but not on q, k, v."""

    def __init__(self, *args, bias: bool = True, **kwargs) -> None:
        del bias
        linear.__init__(self, *args, bias=False, **kwargs)

    return type(f"{linear.__name__}NoBias", (linear,), {"__init__": __init__})


def internvit_layer_spec(choice: KernelChoice, vision: InternVisionConfig,
                         config: TransformerConfig) -> ModuleSpec:
    """One InternViT block: MoonViT's layer (megatron's ``TransformerLayer``, modules for
    ``choice``; the norm class follows ``config.normalization``) without RoPE, with layer scales
    as the bdas, and for 6B whole-width q/k norms and a bias-free qkv."""
    spec = moonvit_layer_spec(choice, attention=InternViTSelfAttention)
    layer = spec.submodules
    attention = layer.self_attention.submodules
    if not vision.qkv_bias:
        attention = dataclasses.replace(attention, linear_qkv=without_bias(attention.linear_qkv))
    scale = ModuleSpec(module=LayerScaleBiasDropoutAdd, params={
        "hidden_size": vision.hidden_size, "init_value": vision.layer_scale_init,
        "dtype": config.params_dtype, "sequence_parallel": config.sequence_parallel})
    self_attention = dataclasses.replace(
        layer.self_attention, submodules=attention,
        params={**layer.self_attention.params, "qk_norm": vision.qk_norm})
    layer = dataclasses.replace(layer, self_attention=self_attention, self_attn_bda=scale,
                                mlp_bda=scale)
    return dataclasses.replace(spec, submodules=layer)


# --------------------------------------------------------------------------- embeddings


class InternViTEmbeddings(torch.nn.Module):
    """CLS token and the learned table, HF shapes: ``cls_token [1, 1, D]``,
    ``position_embeddings [1, 1 + side^2, D]`` (HF ``embeddings.cls_token`` /
    ``embeddings.position_embeddings``)."""

    def __init__(self, side: int, dim: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.side = side
        # HF initialises both to zeros; small normal values keep a fresh tower's tokens distinct.
        self.cls_token = torch.nn.Parameter(torch.empty(1, 1, dim, dtype=dtype))
        self.position_embeddings = torch.nn.Parameter(torch.empty(1, 1 + side * side, dim,
                                                                  dtype=dtype))
        torch.nn.init.normal_(self.cls_token, std=0.02)
        torch.nn.init.normal_(self.position_embeddings, std=0.02)

    def patch_table(self, height: int, width: int) -> Tensor:
        """The patch rows at an ``(height, width)`` grid, ``[h*w, D]`` raster order: the table
        itself at ``side x side``, else resized bicubically (``align_corners=False``, in the
        table's dtype) as transformers' ``interpolate_pos_encoding``."""
        table = self.position_embeddings[0, 1:]
        if (height, width) == (self.side, self.side):
            return table
        grid = table.reshape(1, self.side, self.side, -1).permute(0, 3, 1, 2)
        out = F.interpolate(grid, size=(height, width), mode="bicubic", align_corners=False)
        return out[0].flatten(1).t()

    def forward(self, x: Tensor, segments: Tensor) -> Tensor:
        """``x [N, D]`` patch tokens of ``segments [S, 3]`` (t = 1 rows) -> ``[N + S, D]``:
        per segment the CLS token then its patches, positions added."""
        dim = x.shape[-1]
        cls = (self.cls_token[0, 0] + self.position_embeddings[0, 0]).to(x.dtype)
        tables = {(h, w): self.patch_table(h, w).to(x.dtype)
                  for h, w in sorted({(h, w) for _, h, w in segments.tolist()})}
        parts = []
        for tile, (_, h, w) in zip(x.split(segments.prod(dim=1).tolist()), segments.tolist()):
            parts += [cls.view(1, dim), tile + tables[(h, w)]]
        return torch.cat(parts)


# --------------------------------------------------------------------------- the tower


def megatron_vision_view(vision: InternVisionConfig) -> VisionConfig:
    """The fields :func:`~megatron_vlm.models.vision.moonvit.build_vision_transformer_config`
    reads, as a ``VisionConfig``; the block structure is then edited to InternViT's in
    :func:`internvit_transformer_config`."""
    return VisionConfig(
        hidden_size=vision.hidden_size, num_layers=vision.num_layers,
        num_attention_heads=vision.num_attention_heads, ffn_hidden_size=vision.ffn_hidden_size,
        patch_size=vision.patch_size, in_channels=vision.in_channels,
        merge_kernel_height=vision.merge_kernel_height,
        merge_kernel_width=vision.merge_kernel_width, norm_epsilon=vision.norm_epsilon,
        init_method_std=vision.init_method_std, attention_dropout=vision.attention_dropout,
        hidden_dropout=vision.hidden_dropout, recompute=vision.recompute,
        recompute_num_layers=vision.recompute_num_layers, qk_clip=vision.qk_clip,
        log_max_attention_logit=vision.log_max_attention_logit,
        parallel_mode=vision.parallel_mode,
    )


def internvit_transformer_config(vision: InternVisionConfig, parallel: ParallelConfig,
                                 params_dtype: str = "fp32",
                                 choice: KernelChoice | None = None) -> TransformerConfig:
    """MoonViT's megatron mapping (shape, parallelism, numerics, recompute) with InternViT's
    block set field by field: LayerNorm or RMSNorm, exact GELU, linear biases (the qkv bias per
    ``model.vision.qkv_bias``, see :func:`without_bias`)."""
    base = build_vision_transformer_config(megatron_vision_view(vision), parallel, params_dtype,
                                           choice)
    norm = {"layer_norm": "LayerNorm", "rms_norm": "RMSNorm"}[vision.norm_type]
    return dataclasses.replace(
        base, normalization=norm, layernorm_epsilon=vision.norm_epsilon, add_bias_linear=True,
        add_qkv_bias=vision.qkv_bias, gated_linear_unit=False, activation_func=F.gelu,
        # qk_layernorm stays False: the 6B's q/k norms are the attention's own (see
        # InternViTSelfAttention), not megatron's per-head ones.
        bias_activation_fusion=False, qk_layernorm=False,
    )


class InternViT(PackedViT):
    """The InternViT tower: a :class:`~megatron_vlm.models.vision.packed_vit.PackedViT` whose
    segments are tiles (one ``[1, h, w]`` row per tile or frame), each with its CLS token.

    Parameter names (local spec): ``patch_embed`` (Conv2d with bias), ``pos_embed.cls_token``,
    ``pos_embed.position_embeddings``, ``encoder.layers.{i}.{input_layernorm,
    self_attention.linear_qkv, self_attention.q_norm, self_attention.k_norm (6B),
    self_attention.linear_proj, self_attn_bda.weight, pre_mlp_layernorm, mlp.linear_fc1,
    mlp.linear_fc2, mlp_bda.weight}``; no final norm. ``linear_qkv`` rows are megatron's per-head
    ``[q_h; k_h; v_h]``.

    ``forward`` returns ``[tiles * h*w/4, 4, D]`` (the 2x2 patches of each LLM token,
    row-major): the pixel shuffle's output, what
    :class:`~megatron_vlm.families.internvl.projector.InternVLProjector` takes.
    """

    kernel_choice = staticmethod(vit_kernel_choice)
    max_frames = _NO_FRAME_LIMIT

    def __init__(self, config: TransformerConfig, vision: InternVisionConfig, **kwargs) -> None:
        super().__init__(config, vision, **kwargs)
        # InternVL reads the last layer's output un-normalised (HF use_mean_pooling -> Identity);
        # PackedViT's block always builds a final norm, so it is dropped here (megatron's
        # TransformerBlock skips a None final_layernorm).
        self.encoder.final_layernorm = None

    def layer_spec(self, choice: KernelChoice) -> ModuleSpec:
        """:func:`internvit_layer_spec` for this tower's config."""
        return internvit_layer_spec(choice, self.vision, self.config)

    def position_table(self) -> InternViTEmbeddings:
        """CLS token and learned table."""
        return InternViTEmbeddings(self.vision.pos_emb_side, self.vision.hidden_size,
                                   dtype=self.config.params_dtype)

    def rope_angles(self, segments: Tensor) -> None:
        """No RoPE in InternViT."""
        return None

    def segments(self, grid: Tensor) -> Tensor:
        """One ``[1, h, w]`` row per tile (image) or frame (video)."""
        return frame_grid(grid)

    def encode(self, pixel_values: Tensor, grid_thw: Tensor) -> Tensor:
        """Features ``[N, D]`` of the patches (CLS rows dropped, no final norm) for
        ``pixel_values [N, C, p, p]`` in raster order and ``grid_thw [M, 3]``; as
        :meth:`PackedViT.encode` with one CLS token at the head of every segment."""
        grid = grid_thw.detach().cpu().long()
        check_grid(grid, pixel_values.shape[0], self.max_frames)
        segments = self.segments(grid)
        self.num_encoded_items += segments.shape[0]
        if self.encoded_item_log is not None:
            sums = pixel_values.detach().double().split(segments.prod(dim=1).tolist())
            self.encoded_item_log.extend(
                (*map(int, g), float(x.sum())) for g, x in zip(segments.tolist(), sums))
        device = pixel_values.device
        x = self.patch_embed(pixel_values.to(self.patch_embed.weight.dtype)).flatten(1)  # [N, D]
        x = self.pos_embed(x, segments).unsqueeze(1)  # [N + S, 1, D]: megatron's [s, b, h]
        lengths = segments.prod(dim=1) + 1
        num_tokens = x.shape[0]
        # SP shards the sequence evenly over TP ranks: pad with one empty document, cut below.
        pad = (-num_tokens) % self.config.tensor_model_parallel_size
        pad = pad if self.config.sequence_parallel else 0
        x = F.pad(x, (0, 0, 0, 0, 0, pad))
        params = packed_seq_params(lengths, pad, device)
        if self.config.sequence_parallel:
            x = scatter_to_sequence_parallel_region(x, group=self.tp_group)
        x = self.encoder(hidden_states=x, attention_mask=None, rotary_pos_emb=None,
                         packed_seq_params=params)
        if self.config.sequence_parallel:
            # Projector runs replicated on every TP rank: backward splits, it does not reduce.
            x = gather_from_sequence_parallel_region(
                x, tensor_parallel_output_grad=False, group=self.tp_group)
        is_patch = torch.ones(num_tokens, dtype=torch.bool)
        is_patch[F.pad(lengths.cumsum(0), (1, 0))[:-1]] = False  # each segment's CLS row
        return x[:num_tokens, 0][is_patch.to(device)]


def build_internvit(
    vision: InternVisionConfig,
    parallel: ParallelConfig,
    params_dtype: str = "fp32",
    *,
    pg_collection=None,
    kernels: KernelConfig | None = None,
    choice: KernelChoice | None = None,
) -> InternViT:
    """Build the tower on ``pg_collection`` (None: the process's groups), layers from ``choice``
    (else resolved from ``kernels``); TP ``split`` / ``tp`` mode and CP as
    :func:`~megatron_vlm.models.vision.moonvit.build_moonvit` does
    (:func:`~megatron_vlm.models.vision.packed_vit.tower_groups`)."""
    if choice is None:
        choice = vit_kernel_choice(vision, params_dtype, kernels)
    groups = tower_groups(vision.parallel_mode, parallel, pg_collection)
    config = internvit_transformer_config(vision, groups.parallel, params_dtype, choice)
    return InternViT(config, vision, choice=choice, **groups.tower_kwargs())
