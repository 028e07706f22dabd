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
its share of the items (``'split'``, ``parallel/vision_split.py``). The encode path, split mode
and group set-up are :class:`~.packed_vit.PackedViT`'s, shared with Keye's SigLIP tower.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
from megatron.core.transformer.attention import SelfAttentionSubmodules
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mlp import MLP, MLPSubmodules
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules
from torch import Tensor

from megatron_vlm.config.model import KernelConfig
from megatron_vlm.config.parallel import ParallelConfig
from megatron_vlm.config.vision import VisionConfig
from megatron_vlm.models.specs import KernelChoice, resolve_kernels, vit_modules
from megatron_vlm.models.vision.packed_vit import PackedViT, tower_groups
from megatron_vlm.models.vision.pos_embed import VisionPositionEmbedding
from megatron_vlm.models.vision.rope2d import Rope2DSelfAttention, rope_2d_angles

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
    when no ``choice`` is given (a VLM passes its one ``models.vlm.kernel_choice``). Reads only
    ``attention_dropout`` and ``head_dim``: a family's tower config serves as ``vision`` too."""
    return resolve_kernels(kernels, params_dtype=params_dtype,
                           attention_dropout=vision.attention_dropout,
                           head_dims=(vision.head_dim,))


def moonvit_layer_spec(choice: KernelChoice,
                       attention: type[Rope2DSelfAttention] = Rope2DSelfAttention) -> ModuleSpec:
    """One MoonViT layer: megatron's TransformerLayer with 2D-RoPE self-attention and packed
    bidirectional core attention; module classes (local or Transformer Engine, attention kernel)
    from ``models/specs.py`` for ``choice`` (:func:`vit_kernel_choice`). ``attention``: the
    self-attention class (a family's RoPE layout, e.g. Keye's rotate-half)."""
    m = vit_modules(choice)
    return ModuleSpec(
        module=TransformerLayer,
        submodules=TransformerLayerSubmodules(
            input_layernorm=m.input_layernorm,
            self_attention=ModuleSpec(
                module=attention,
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


class MoonViT(PackedViT):
    """MoonViT / MoonViT-3D vision tower: a :class:`PackedViT` whose segments are the items
    (a video chunk of ``t`` frames attends across its frames), with MoonViT's position tables,
    interleaved 2D RoPE (``model.vision.rope``) and up to ``temporal_patch_size`` frames.

    Parameter names: ``patch_embed`` (Conv2d), ``pos_embed.weight`` ``[H, W, D]``,
    ``encoder.layers.{i}.{input_layernorm, self_attention.linear_qkv, self_attention.linear_proj,
    pre_mlp_layernorm, mlp.linear_fc1, mlp.linear_fc2}``, ``encoder.final_layernorm``.
    ``linear_qkv`` rows are megatron's per-head ``[q_h; k_h; v_h]`` with q/k in the interleaved
    2D-RoPE layout of the released checkpoint (see ``hf_weights``).

    ``forward`` returns ``[sum(h*w) / (kh*kw), kh*kw, D]``: one row per LLM placeholder token
    (item order), frames mean-pooled; the projector normalises each of the ``kh*kw`` sub-tokens,
    then concatenates them.
    """

    layer_spec = staticmethod(moonvit_layer_spec)
    kernel_choice = staticmethod(vit_kernel_choice)

    @property
    def max_frames(self) -> int:
        """A video chunk holds at most ``model.vision.temporal_patch_size`` frames."""
        return self.vision.temporal_patch_size

    def position_table(self) -> VisionPositionEmbedding:
        """The learned 2D table plus the sin-cos temporal one."""
        vis = self.vision
        return VisionPositionEmbedding(
            vis.pos_emb_height, vis.pos_emb_width, vis.temporal_patch_size, vis.hidden_size,
            dtype=self.config.params_dtype,
        )

    def rope_angles(self, segments: Tensor) -> Tensor | None:
        """Interleaved 2D-RoPE angles of every patch (None when ``model.vision.rope`` is off)."""
        if not self.vision.rope:
            return None
        return rope_2d_angles(segments, self.vision.head_dim, self.vision.rope_theta)


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
    ``choice``, else resolved from ``kernels`` (``model.kernels``, default auto); groups for
    ``model.vision.parallel_mode`` and CP from :func:`~.packed_vit.tower_groups`."""
    if choice is None:
        choice = vit_kernel_choice(vision, params_dtype, kernels)
    groups = tower_groups(vision.parallel_mode, parallel, pg_collection)
    config = build_vision_transformer_config(vision, groups.parallel, params_dtype, choice)
    return MoonViT(config, vision, choice=choice, **groups.tower_kwargs())
