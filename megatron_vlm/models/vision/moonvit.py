"""MoonViT and MoonViT-3D (SPEC §2) on megatron-core blocks.

Patch conv -> + learned 2D / sin-cos temporal position tables -> megatron ``TransformerBlock`` of
pre-LN layers (LayerNorm eps 1e-5, qkv and linear biases, GELU-tanh MLP, final LayerNorm) whose
attention is megatron's ``SelfAttention`` with our 2D RoPE (:class:`Rope2DSelfAttention`) and our
packed bidirectional core attention -> temporal-pool 2x2 merger.

All images and video chunks of a micro-batch are one packed THD sequence; attention is
block-diagonal per item (``cu_seqlens`` over ``t*h*w``), so a video chunk attends across its frames
and never to another item. TP, sequence parallelism and activation recompute are megatron's.
The tower is not pipelined (it lives on the first LLM stage) nor context-parallel (CP splits the
merged multimodal sequence), so its megatron config has ``pp = cp = 1``. Under TP it either runs
megatron TP inside (``model.vision.parallel_mode='tp'``) or is replicated and each TP rank encodes
its share of the items (``'split'``, ``parallel/vision_split.py``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.tensor_parallel.mappings import (
    gather_from_sequence_parallel_region,
    scatter_to_sequence_parallel_region,
)
from megatron.core.transformer.attention import SelfAttentionSubmodules
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
from megatron_vlm.models.attention import thd_packed_seq_params
from megatron_vlm.models.specs import KernelChoice, resolve_kernels, vit_modules
from megatron_vlm.models.vision.merger import tpool_patch_merger
from megatron_vlm.models.vision.pos_embed import VisionPositionEmbedding
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

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def gelu_tanh(x: Tensor) -> Tensor:
    """GELU, tanh approximation (HF ``gelu_pytorch_tanh``); a named function so configs pickle."""
    return F.gelu(x, approximate="tanh")


def build_vision_transformer_config(
    vision: VisionConfig, parallel: ParallelConfig, params_dtype: str = "fp32",
    choice: KernelChoice | None = None,
) -> TransformerConfig:
    """Map our vision config onto megatron-core's ``TransformerConfig``, field by field;
    ``choice`` (the model's kernel choice) supplies gradient-accumulation fusion (None: off)."""
    if vision.num_attention_heads % parallel.tp:
        raise ValueError(
            f"parallel.tp={parallel.tp} does not divide model.vision.num_attention_heads="
            f"{vision.num_attention_heads}; choose tp dividing it"
        )
    dtype = _DTYPES[params_dtype]
    recompute = {
        "none": {"recompute_granularity": None},
        "full": {"recompute_granularity": "full", "recompute_method": "uniform",
                 "recompute_num_layers": vision.recompute_num_layers},
        "core_attn": {"recompute_granularity": "selective", "recompute_modules": ["core_attn"]},
    }[vision.recompute]
    return TransformerConfig(
        # --- shape
        num_layers=vision.num_layers,
        hidden_size=vision.hidden_size,
        num_attention_heads=vision.num_attention_heads,
        num_query_groups=vision.num_attention_heads,
        kv_channels=vision.head_dim,
        ffn_hidden_size=vision.ffn_hidden_size,
        # --- block structure: pre-LN, biases everywhere, GELU-tanh MLP
        normalization="LayerNorm",
        layernorm_epsilon=vision.norm_epsilon,
        layernorm_zero_centered_gamma=False,
        add_bias_linear=True,
        add_qkv_bias=True,
        gated_linear_unit=False,
        activation_func=gelu_tanh,
        apply_residual_connection_post_layernorm=False,
        hidden_dropout=vision.hidden_dropout,
        attention_dropout=vision.attention_dropout,
        init_method_std=vision.init_method_std,
        softmax_scale=None,  # 1/sqrt(head_dim)
        qk_layernorm=False,
        qk_clip=vision.qk_clip,  # tau: model.llm.qk_clip_threshold, applied in optim/qk_clip.py
        log_max_attention_logit=vision.log_max_attention_logit,
        # --- parallelism (see module docstring: no PP, no CP for the tower)
        tensor_model_parallel_size=parallel.tp,
        pipeline_model_parallel_size=1,
        context_parallel_size=1,
        sequence_parallel=parallel.sequence_parallel,
        # --- numerics / kernels
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=False,
        use_cpu_initialization=not torch.cuda.is_available(),
        perform_initialization=True,
        # Of model.kernels' fusions (models/gpu_settings.py) only gradient accumulation applies
        # to the tower: megatron fuses gelu/swiglu/quick_geglu, not GELU-tanh (it refuses
        # bias_activation_fusion here); RoPE is our own 2D rotation (rope2d.py); our attention
        # kernels never use megatron's fused softmax.
        gradient_accumulation_fusion=choice is not None and choice.gradient_accumulation_fusion,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        cuda_graph_scope=[],
        **recompute,
    )


def vit_kernel_choice(vision: VisionConfig, params_dtype: str = "fp32",
                      kernels: KernelConfig | None = None) -> KernelChoice:
    """The layer implementations of a tower built alone from ``kernels`` (``model.kernels``;
    None = all ``auto``) on this machine: what :func:`build_moonvit` and :class:`MoonViT` use
    when no ``choice`` is given (a VLM passes its one ``models.vlm.kernel_choice``)."""
    return resolve_kernels(kernels, params_dtype=params_dtype,
                           attention_dropout=vision.attention_dropout,
                           head_dims=(vision.head_dim,))


def moonvit_layer_spec(choice: KernelChoice) -> ModuleSpec:
    """One MoonViT layer: megatron's TransformerLayer with 2D-RoPE self-attention and packed
    bidirectional core attention; module classes (local or Transformer Engine, attention kernel)
    from ``models/specs.py`` for ``choice`` (:func:`vit_kernel_choice`)."""
    m = vit_modules(choice)
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=m.input_layernorm,
            self_attention=ModuleSpec(
                module=Rope2DSelfAttention,
                params={"attn_mask_type": AttnMaskType.no_mask},
                submodules=SelfAttentionSubmodules(
                    linear_qkv=m.linear_qkv,
                    core_attention=m.core_attention,
                    linear_proj=m.linear_proj,
                    q_layernorm=IdentityOp,
                    k_layernorm=IdentityOp,
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


def check_grid(grid_thw: Tensor, num_patches: int, max_frames: int) -> None:
    """Raise ``ValueError`` when ``grid_thw [M, 3]`` cannot describe ``num_patches`` patches."""
    if grid_thw.dim() != 2 or grid_thw.shape[1] != 3 or grid_thw.shape[0] == 0:
        raise ValueError(f"grid_thw must be [M >= 1, 3] (t, h, w); got {tuple(grid_thw.shape)}")
    if bool((grid_thw < 1).any()):
        raise ValueError(f"grid_thw entries must be >= 1; got {grid_thw.tolist()}")
    if int(grid_thw[:, 0].max()) > max_frames:
        raise ValueError(
            f"an item has t={int(grid_thw[:, 0].max())} frames; video chunks hold at most "
            f"temporal_patch_size={max_frames}"
        )
    total = int(grid_thw.prod(dim=1).sum())
    if total != num_patches:
        raise ValueError(
            f"grid_thw describes {total} patches (sum of t*h*w) but pixel_values has {num_patches}"
        )


def packed_seq_params(lengths: Tensor, pad: int, device: torch.device) -> PackedSeqParams:
    """THD parameters: one document per item (``t*h*w`` patches, bidirectional); ``pad`` tail
    tokens become one empty document (real length 0, padded length ``pad``)."""
    cu = F.pad(lengths.cumsum(0), (1, 0))
    return thd_packed_seq_params(cu, cu, int(cu[-1]) + pad, device)


class MoonViT(MegatronModule):
    """MoonViT / MoonViT-3D vision tower.

    Parameter names: ``patch_embed`` (Conv2d), ``pos_embed.weight`` ``[H, W, D]``,
    ``encoder.layers.{i}.{input_layernorm, self_attention.linear_qkv, self_attention.linear_proj,
    pre_mlp_layernorm, mlp.linear_fc1, mlp.linear_fc2}``, ``encoder.final_layernorm``.
    ``linear_qkv`` rows are megatron's per-head ``[q_h; k_h; v_h]`` with q/k in the interleaved
    2D-RoPE layout of the released checkpoint (see ``hf_weights``).
    """

    def __init__(
        self, config: TransformerConfig, vision: VisionConfig, pg_collection=None,
        choice: KernelChoice | None = None, split_group=None, split_reduce_group=None,
        replica_group=None,
    ) -> None:
        super().__init__(config=config)
        self.split_group = split_group
        """The ranks sharing this micro-batch's items, each encoding its share: split mode the TP
        group (TP x CP under context parallelism; the tower is replicated there, built with
        ``replica_process_groups``), ``tp`` mode under CP the CP group. None: encode every
        item."""
        self.split_reduce_group = split_reduce_group
        """The CP group under context parallelism: the item gather's backward sums over it."""
        self.replica_group = replica_group
        """Split mode under TP: the TP group the tower is replicated over (checkpoint shards get
        one main replica per TP group). None: megatron's own replica ids."""
        self.num_encoded_items = 0
        """Items this rank has run through :meth:`encode` (activation recompute not counted)."""
        self.encoded_item_log: list[tuple[int, int, int, float]] | None = None
        """Test-only: when set to a list, :meth:`encode` appends ``(t, h, w, pixel sum)`` of
        every item it encodes."""
        if choice is None:
            choice = vit_kernel_choice(vision, "bf16" if config.bf16 else "fp32")
        self.vision = vision
        self.patch_embed = torch.nn.Conv2d(
            vision.in_channels, vision.hidden_size, kernel_size=vision.patch_size,
            stride=vision.patch_size, dtype=config.params_dtype,
        )
        self.pos_embed = VisionPositionEmbedding(
            vision.pos_emb_height, vision.pos_emb_width, vision.temporal_patch_size,
            vision.hidden_size, dtype=config.params_dtype,
        )
        self.encoder = TransformerBlock(
            config=config,
            spec=TransformerBlockSubmodules(
                layer_specs=[moonvit_layer_spec(choice)] * vision.num_layers,
                layer_norm=vit_modules(choice).final_norm,
            ),
            post_layer_norm=True,
            pre_process=True,
            post_process=True,
            pg_collection=groups_or_default(pg_collection, required=True),
        )
        self.tp_group = self.encoder.tp_group

    def encode(self, pixel_values: Tensor, grid_thw: Tensor) -> Tensor:
        """Pre-merge features ``[N, D]`` (after the final LayerNorm) for ``pixel_values
        [N, C, p, p]`` in raster order (item, frame, row, col) and ``grid_thw [M, 3]``.

        With sequence parallelism the result is gathered to every TP rank, and its backward
        *splits* the gradient: consumers must run replicated over TP (the merger and
        :class:`~megatron_vlm.models.projector.KimiProjector` do).
        """
        grid = grid_thw.detach().cpu().long()
        num_patches = pixel_values.shape[0]
        check_grid(grid, num_patches, self.vision.temporal_patch_size)
        self.num_encoded_items += grid.shape[0]
        if self.encoded_item_log is not None:
            sums = pixel_values.detach().double().split(grid.prod(dim=1).tolist())
            self.encoded_item_log.extend(
                (*map(int, g), float(x.sum())) for g, x in zip(grid.tolist(), sums))
        device = pixel_values.device
        x = self.patch_embed(pixel_values.to(self.patch_embed.weight.dtype)).flatten(1)  # [N, D]
        x = self.pos_embed(x, grid).unsqueeze(1)  # [N, 1, D]: megatron's [s, b, h]
        angles = (rope_2d_angles(grid, self.vision.head_dim, self.vision.rope_theta).to(device)
                  if self.vision.rope else None)
        # SP shards the sequence evenly over TP ranks: pad to a multiple of tp with one empty
        # document (real length 0) that attends nothing real; it is cut off again below.
        pad = (-num_patches) % self.config.tensor_model_parallel_size
        pad = pad if self.config.sequence_parallel else 0
        x = F.pad(x, (0, 0, 0, 0, 0, pad))
        angles = F.pad(angles, (0, 0, 0, pad)) if angles is not None else None
        params = packed_seq_params(grid.prod(dim=1), pad, device)
        if self.config.sequence_parallel:
            x = scatter_to_sequence_parallel_region(x, group=self.tp_group)
        x = self.encoder(
            hidden_states=x, attention_mask=None, rotary_pos_emb=angles, packed_seq_params=params
        )
        if self.config.sequence_parallel:
            # Merger and projector run replicated on every TP rank, so each rank's gradient of
            # the gathered tensor is already complete: backward splits, it does not reduce.
            x = gather_from_sequence_parallel_region(
                x, tensor_parallel_output_grad=False, group=self.tp_group
            )
        return x[:num_patches, 0]

    def forward(self, pixel_values: Tensor, grid_thw: Tensor) -> Tensor:
        """Merged features ``[sum(h*w) / (kh*kw), kh*kw, D]``: one row per LLM placeholder token
        (item order), frames mean-pooled; the projector normalises each of the ``kh*kw``
        sub-tokens, then concatenates them."""
        grid = grid_thw.detach().cpu().long()  # one host copy for every index built below
        if self.split_group is not None and self.split_group.size() > 1:
            return self._forward_split(pixel_values, grid)
        x = self.encode(pixel_values, grid)
        return tpool_patch_merger(
            x, grid, self.vision.merge_kernel_height, self.vision.merge_kernel_width
        )

    def _forward_split(self, pixel_values: Tensor, grid: Tensor) -> Tensor:
        """Split mode: encode this rank's share of the items, gather all in item order."""
        check_grid(grid, pixel_values.shape[0], self.vision.temporal_patch_size)
        vis, group = self.vision, self.split_group
        owners = assign_items(item_costs(grid, vis.hidden_size, vis.ffn_hidden_size),
                              group.size())
        mine = [m for m, owner in enumerate(owners) if owner == group.rank()]
        if mine:
            bounds = F.pad(grid.prod(dim=1).cumsum(0), (1, 0)).tolist()
            index = torch.cat([torch.arange(bounds[m], bounds[m + 1]) for m in mine])
            local_grid = grid[mine]
            x = self.encode(pixel_values.index_select(0, index.to(pixel_values.device)),
                            local_grid)
            local = tpool_patch_merger(x, local_grid, vis.merge_kernel_height,
                                       vis.merge_kernel_width)
        else:
            local = pixel_values.new_zeros(0, vis.merge_size, vis.hidden_size,
                                           dtype=self.patch_embed.weight.dtype)
        rows = (grid[:, 1] * grid[:, 2] // vis.merge_size).tolist()
        return gather_items(local, self.patch_embed.weight, rows, owners, group,
                            self.split_reduce_group)

    def sharded_state_dict(self, prefix: str = "", sharded_offsets: tuple = (),
                           metadata: dict | None = None) -> dict:
        """megatron's, with one main replica per TP group in split mode (``set_replica_ids``)."""
        state = super().sharded_state_dict(prefix, sharded_offsets, metadata)
        if self.replica_group is not None:
            set_replica_ids(state, self.replica_group.rank())
        return state


def build_moonvit(
    vision: VisionConfig,
    parallel: ParallelConfig,
    params_dtype: str = "fp32",
    *,
    pg_collection=None,
    kernels: KernelConfig | None = None,
    choice: KernelChoice | None = None,
) -> MoonViT:
    """Build the vision tower on ``pg_collection`` (training: the runtime's; None:
    :func:`~megatron_vlm.parallel.runtime.groups_or_default`'s); layer implementations from
    ``choice``, else resolved from ``kernels`` (``model.kernels``, default auto)."""
    if choice is None:
        choice = vit_kernel_choice(vision, params_dtype, kernels)
    groups = groups_or_default(pg_collection, required=True)
    tower_groups = groups
    split_group = replica_group = None
    if vision.parallel_mode == "split" and parallel.tp > 1:
        if not parallel.sequence_parallel:
            raise ValueError(
                "model.vision.parallel_mode=split needs parallel.sequence_parallel=true: megatron "
                "sums the replicated tower's per-rank gradients over TP only then "
                "(finalize_model_grads); or set model.vision.parallel_mode=tp")
        # Replicated over TP: an unsharded tower on TP/CP groups of this rank alone.
        split_group = replica_group = groups.tp
        parallel_tower = ParallelConfig(tp=1, sequence_parallel=False)
        tower_groups = replica_process_groups(groups)
    else:
        parallel_tower = parallel
    reduce_group = None
    if parallel.cp > 1:
        # Context parallelism: items split over TP x CP (split mode) or CP (tp mode), never
        # encoded on two CP ranks; the gather's backward sums over CP (vision_split.py).
        reduce_group = groups.cp
        split_group = groups.tp_cp if vision.parallel_mode == "split" else reduce_group
    config = build_vision_transformer_config(vision, parallel_tower, params_dtype, choice)
    model = MoonViT(config, vision, pg_collection=tower_groups, choice=choice,
                    split_group=split_group, split_reduce_group=reduce_group,
                    replica_group=replica_group)
    if replica_group is not None:
        mark_replicated(model)
    return model
