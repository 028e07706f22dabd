"""The LLM: a megatron-core ``GPTModel`` from ``LLMConfig``: MLA (Kimi K2 / DeepSeek-V3) or
grouped-query attention (Qwen3, GLM, GPT-OSS's sinks and sliding window), dense or MoE FFNs
(DeepSeek-V3 style, Qwen3-MoE, GPT-OSS's biased experts and clamped SwiGLU), 1D RoPE, YaRN or
our M-RoPE.

Layer implementations (Transformer Engine or local, attention kernel, grouped GEMM) are chosen
in ``models/specs.py``.

``build_transformer_config`` is the one place our config becomes megatron's
``MLATransformerConfig`` (MLA) or ``TransformerConfig`` (GQA); every field that matters is set
explicitly, because some megatron defaults are traps for these families
(``rotary_scaling_factor=40``, ``mscale_all_dim=0.0``, ``moe_router_load_balancing_type=
'aux_loss'``, ``add_bias_linear=True``, ``kv_channels = hidden / heads``...).

Position embeddings: MLA rotates inside its attention (``GPTModel`` gets
``position_embedding_type='none'``); GQA with 1D RoPE uses megatron's ``RotaryEmbedding``
(``'rope'``, NeoX halves, ``rotary_base = rope_theta``) or, with ``yarn.factor > 1`` (GPT-OSS),
its ``YarnRotaryEmbedding`` (``'yarn'``); GQA with M-RoPE is
:class:`~megatron_vlm.models.mrope.MRopeGPTModel` (megatron's ``'none'`` plus our per-token
3-axis frequencies, see ``models/mrope.py``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.fusions.fused_bias_geglu import quick_gelu
from megatron.core.models.gpt import GPTModel
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules
from megatron.core.transformer.transformer_config import MLATransformerConfig, TransformerConfig

from megatron_vlm.config.model import KernelConfig, LLMConfig
from megatron_vlm.config.parallel import ParallelConfig
from megatron_vlm.models.mrope import MRopeGPTModel
from megatron_vlm.models.mtp import MtpGPTModel, MtpMRopeGPTModel
from megatron_vlm.models.specs import (
    KernelChoice,
    llm_decoder_block_spec,
    llm_mtp_block_spec,
    resolve_kernels,
)
from megatron_vlm.parallel.runtime import groups_or_default

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def padded_vocab_size(vocab_size: int, tp: int, multiple: int = 128) -> int:
    """Vocab padded to a multiple of ``lcm(multiple, tp)``: the same size for every TP <= 128 that
    is a power of two, so a checkpoint reshards across TP sizes (its embedding and output shapes do
    not change). Megatron-LM pads to ``multiple * tp`` instead, which makes the checkpoint's
    vocabulary shape depend on the layout; the padded rows never matter because their logits are
    masked (``mask_padded_vocab``).
    """
    step = math.lcm(multiple, tp)
    return ((vocab_size + step - 1) // step) * step


def mask_padded_vocab(model: GPTModel, vocab_size: int) -> None:
    """Keep the padded vocabulary rows out of the softmax (logits -> -inf).

    megatron-core's output layer and cross entropy treat the padded rows like real tokens, so with
    Megatron-LM's ``128 * tp`` padding the loss of the same weights depended on the TP size (tiny
    recipe: vocab 1152 -> 1280 at TP=2, loss 7.154 vs 7.050 at TP=1). With the padded columns at
    -inf every layout computes the softmax over the real vocabulary only, as transformers does.
    A forward hook on megatron's output ``ColumnParallelLinear`` (public module API); its logits
    are this TP rank's vocab slice unless gathered.
    """
    layer = getattr(model, "output_layer", None)
    if layer is None:
        return

    def hook(module, args, output):
        logits, bias = output
        width = logits.shape[-1]
        start = 0
        if width * module.tp_group.size() == module.output_size:  # this rank's slice
            start = width * module.tp_group.rank()
        if start + width <= vocab_size:
            return output
        cols = torch.arange(start, start + width, device=logits.device)
        return logits.masked_fill(cols >= vocab_size, float("-inf")), bias

    layer.register_forward_hook(hook)


def llm_head_dims(llm: LLMConfig) -> tuple[int, int]:
    """(q/k head dim, v head dim) of the LLM's attention (MLA: 192, 128; Qwen3: 128, 128)."""
    if llm.attention == "gqa":
        return (llm.head_dim, llm.head_dim)
    return (llm.qk_head_dim, llm.v_head_dim)


def llm_kernel_choice(llm: LLMConfig, parallel: ParallelConfig, params_dtype: str = "fp32",
                      kernels: KernelConfig | None = None) -> KernelChoice:
    """The layer implementations and fusions of an LLM built alone from ``kernels``
    (``model.kernels``; None = all ``auto``) on this machine: what :func:`build_llm` and
    :func:`build_transformer_config` use when no ``choice`` is given (a VLM passes the one
    choice ``models.vlm.kernel_choice`` makes for LLM and tower together)."""
    return resolve_kernels(kernels, params_dtype=params_dtype,
                           attention_dropout=llm.attention_dropout, head_dims=llm_head_dims(llm),
                           context_parallel=parallel.cp > 1, llm=llm)


def recompute_kwargs(recompute: str, num_layers: int, modules: list[str],
                     choice: KernelChoice) -> dict:
    """megatron ``TransformerConfig`` activation-recompute fields for ``none|full|selective``.

    ``moe_act`` (the routed experts' SwiGLU) is recomputed by megatron only inside its
    grouped-GEMM experts, and megatron-core 0.16.1 refuses it without ``moe_grouped_gemm``
    (``transformer_config.py:1213``). ``choice`` (the experts the model is built with) decides:
    kept for TE's / the legacy grouped MLP, dropped for our torch ``grouped_mm`` experts (which
    already recompute the SwiGLU in backward), refused otherwise.
    """
    if recompute == "none":
        return {"recompute_granularity": None}
    if recompute == "full":
        return {"recompute_granularity": "full", "recompute_method": "uniform",
                "recompute_num_layers": num_layers}
    modules = list(modules)
    if "moe_act" in modules and not choice.moe_grouped_gemm:
        if choice.experts == "torch_grouped_mm":
            # GroupedExperts (models/experts.py) saves only the fc1 output and recomputes the
            # SwiGLU from it in backward: what moe_act would drop is never kept. (Its fallback
            # to SequentialMLP's forward, e.g. under expert TP, keeps the SwiGLU outputs.)
            modules.remove("moe_act")
        else:
            raise ValueError(
                "model.llm.recompute_modules has moe_act, which megatron recomputes only in "
                f"grouped-GEMM experts; the routed experts here are {choice.experts} (see "
                "model.kernels.moe_grouped_gemm): remove moe_act or use grouped GEMM experts")
    return {"recompute_granularity": "selective", "recompute_modules": modules}


def _mla_kwargs(llm: LLMConfig) -> dict:
    """``MLATransformerConfig`` attention fields (MLA, its latent norms, its own RoPE/YaRN)."""
    yarn = llm.yarn
    # YaRN mscale values pass through as given: megatron applies the published formula literally
    # (mscale(s, 0) == 1, so cos/sin get mscale(s, m) / 1). transformers 5.23 instead drops *both*
    # values when either is 0 (cos/sin get mscale(s, 1)); tests/reference/test_yarn_hf.py pins the
    # difference, and HF export must write rope_parameters["attention_factor"] in that case.
    return dict(
        qk_layernorm=True,  # MLA's q_a_layernorm / kv_a_layernorm
        add_qkv_bias=False,
        multi_latent_attention=True,
        q_lora_rank=llm.q_lora_rank,
        kv_lora_rank=llm.kv_lora_rank,
        qk_head_dim=llm.qk_nope_head_dim,
        qk_pos_emb_head_dim=llm.qk_rope_head_dim,
        v_head_dim=llm.v_head_dim,
        rope_type="yarn" if yarn.enabled else "rope",
        rotary_base=llm.rope_theta,
        rotary_percent=1.0,
        rotary_scaling_factor=yarn.factor,
        original_max_position_embeddings=yarn.original_max_position_embeddings,
        beta_fast=yarn.beta_fast,
        beta_slow=yarn.beta_slow,
        mscale=yarn.mscale,
        mscale_all_dim=yarn.mscale_all_dim,
        qk_clip=llm.qk_clip,
        qk_clip_threshold=llm.qk_clip_threshold,
        log_max_attention_logit=llm.log_max_attention_logit,
    )


def _gqa_kwargs(llm: LLMConfig) -> dict:
    """``TransformerConfig`` attention fields of grouped-query attention (Qwen3). RoPE's base
    and percent are ``GPTModel`` arguments (:func:`build_llm`); megatron's ``TransformerConfig``
    has no field for them."""
    return dict(
        multi_latent_attention=False,
        num_query_groups=llm.query_groups,
        kv_channels=llm.head_dim,  # megatron's default hidden / heads is wrong for Qwen3
        qk_layernorm=llm.qk_layernorm,  # per-head RMSNorm at layernorm_epsilon (HF q/k_norm)
        add_qkv_bias=llm.add_qkv_bias,
        softmax_scale=None,  # 1 / sqrt(kv_channels), as HF's head_dim ** -0.5
        # NeoX rotate_half (HF Qwen, GLM-4.5V) unless M-RoPE pairs adjacent channels (GLM-4.1V)
        rotary_interleaved=llm.position_embedding == "mrope" and llm.mrope_style == "interleaved",
        mrope_section=(list(llm.mrope_section) if llm.position_embedding == "mrope"
                       else None),
        qk_clip=False,  # refused by LLMConfig for gqa (optim/qk_clip.py is MLA's)
        log_max_attention_logit=llm.log_max_attention_logit,
        # GPT-OSS: per-head learned sinks; sliding window (megatron's window counts the keys
        # before the query, HF's sliding_window includes the query) on every layer but each
        # window_attn_skip_freq-th (1-based)
        softmax_type="learnable" if llm.attention_sinks else "vanilla",
        window_size=(llm.sliding_window - 1, 0) if llm.sliding_window else None,
        window_attn_skip_freq=llm.window_attn_skip_freq,
    )


def _activation_kwargs(llm: LLMConfig) -> dict:
    """Gated MLP activation: SwiGLU, or GPT-OSS's clamped SwiGLU ``quick_gelu(min(g, l)) *
    (clamp(u, -l, l) + 1)`` through megatron's own options (FAMILIES.md §5)."""
    if llm.mlp_activation == "clamped_swiglu":
        return dict(gated_linear_unit=True, activation_func=quick_gelu, glu_linear_offset=1.0,
                    activation_func_clamp_value=llm.swiglu_limit)
    return dict(gated_linear_unit=True, activation_func=F.silu)


def _set_gqa_yarn(config: TransformerConfig, llm: LLMConfig) -> None:
    """YaRN for GQA: megatron-core 0.16.1's ``GPTModel(position_embedding_type='yarn')`` and its
    attention read these ``yarn_*`` attributes off the config (``gpt_model.py:172``,
    ``yarn_rotary_pos_embedding.py:274``); ``TransformerConfig`` declares none of them. HF's
    default attention factor (GPT-OSS: no mscale keys) is ``0.1 ln s + 1`` = megatron's
    mscale(s, 1) / mscale(s, 0)."""
    yarn = llm.yarn
    config.yarn_rotary_scaling_factor = yarn.factor
    config.yarn_original_max_position_embeddings = yarn.original_max_position_embeddings
    config.yarn_beta_fast = yarn.beta_fast
    config.yarn_beta_slow = yarn.beta_slow
    config.yarn_mscale = yarn.mscale
    config.yarn_mscale_all_dim = yarn.mscale_all_dim
    config.yarn_correction_range_round_to_int = yarn.truncate


def build_transformer_config(
    llm: LLMConfig, parallel: ParallelConfig, params_dtype: str = "fp32",
    choice: KernelChoice | None = None,
) -> TransformerConfig:
    """Map our LLM config onto megatron-core's ``MLATransformerConfig`` (``attention: mla``) or
    ``TransformerConfig`` (``attention: gqa``), field by field.

    ``choice`` (default: :func:`llm_kernel_choice`, as :func:`build_llm` resolves it) supplies
    the grouped-GEMM and FP8 switches and the kernel fusions.
    """
    dtype = _DTYPES[params_dtype]
    if choice is None:
        choice = llm_kernel_choice(llm, parallel, params_dtype)
    on_gpu = torch.cuda.is_available()
    moe = llm.num_experts is not None
    mla = llm.attention == "mla"
    if not mla and choice.apply_rope_fusion:
        # Fused RoPE kernels rotate by position within each document: with M-RoPE's per-token
        # 3-axis positions (THD) they would be wrong (FAMILIES.md §5); megatron's GQA rope
        # fusion is not verified here either.
        raise ValueError("model.kernels.apply_rope_fusion=true applies to MLA with YaRN only; "
                         "leave it null/false with model.llm.attention=gqa")
    kwargs = dict(
        # --- shape
        num_layers=llm.num_layers,
        hidden_size=llm.hidden_size,
        num_attention_heads=llm.num_attention_heads,
        ffn_hidden_size=llm.ffn_hidden_size,
        # --- block structure
        normalization="RMSNorm",
        layernorm_epsilon=llm.norm_epsilon,  # MLA latent norms: see llm_block_spec
        add_bias_linear=llm.add_bias_linear,
        **_activation_kwargs(llm),
        hidden_dropout=llm.hidden_dropout,
        attention_dropout=llm.attention_dropout,
        init_method_std=llm.init_method_std,
        # --- attention (MLA or GQA) and its RoPE
        **(_mla_kwargs(llm) if mla else _gqa_kwargs(llm)),
        # --- parallelism
        tensor_model_parallel_size=parallel.tp,
        pipeline_model_parallel_size=parallel.pp,
        virtual_pipeline_model_parallel_size=parallel.vpp,
        pipeline_model_parallel_layout=parallel.pipeline_layout,
        context_parallel_size=parallel.cp,
        expert_model_parallel_size=parallel.ep,
        expert_tensor_parallel_size=parallel.etp if parallel.etp is not None else parallel.tp,
        sequence_parallel=parallel.sequence_parallel,
        # --- numerics / kernels
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=False,
        use_cpu_initialization=not on_gpu,
        perform_initialization=True,
        # fusions: resolved by capability with the layer implementations (models/gpu_settings.py;
        # all off on CPU)
        gradient_accumulation_fusion=choice.gradient_accumulation_fusion,
        bias_activation_fusion=choice.bias_activation_fusion,
        bias_dropout_fusion=False,
        masked_softmax_fusion=choice.masked_softmax_fusion,
        apply_rope_fusion=choice.apply_rope_fusion,
        persist_layer_norm=False,
        cuda_graph_scope=[],  # megatron's default "full" is deprecated and warns
        # --- loss: global per-token mean across micro-batches and DP ranks (SPEC §11)
        calculate_per_token_loss=True,
        # --- multi-token prediction (megatron's MTP block after the decoder; GLM-4.5-Air: 1)
        mtp_num_layers=llm.mtp_num_layers or None,
        mtp_loss_scaling_factor=llm.mtp_loss_weight,
        # --- activation recompute (model.llm.recompute)
        **recompute_kwargs(llm.recompute, llm.recompute_num_layers, llm.recompute_modules,
                           choice),
    )
    if choice.fp8:
        # TE's delayed-scaling "hybrid" recipe: e4m3 forward, e5m2 gradients.
        kwargs.update(fp8="hybrid", fp8_recipe="delayed")
    if moe:
        kwargs.update(
            num_moe_experts=llm.num_experts,
            moe_layer_freq=llm.moe_layer_freq,
            moe_ffn_hidden_size=llm.moe_ffn_hidden_size,
            moe_shared_expert_intermediate_size=(
                llm.moe_ffn_hidden_size * llm.num_shared_experts
                if llm.num_shared_experts
                else None
            ),
            moe_shared_expert_overlap=choice.moe_shared_expert_overlap,
            moe_router_topk=llm.moe_router_topk,
            moe_router_score_function=llm.moe_router_score_function,
            moe_router_topk_scaling_factor=llm.moe_router_topk_scaling_factor,
            moe_router_num_groups=llm.moe_router_num_groups,
            moe_router_group_topk=llm.moe_router_group_topk,
            moe_router_enable_expert_bias=llm.moe_router_enable_expert_bias,
            moe_router_bias_update_rate=llm.moe_router_bias_update_rate,
            moe_router_pre_softmax=llm.moe_router_pre_softmax,
            moe_router_dtype="fp32",
            moe_router_load_balancing_type="seq_aux_loss" if llm.moe_aux_loss_coeff else "none",
            moe_aux_loss_coeff=llm.moe_aux_loss_coeff,
            moe_token_dispatcher_type=llm.moe_token_dispatcher,
            moe_grouped_gemm=choice.moe_grouped_gemm,
            moe_expert_capacity_factor=None,  # dropless
            moe_permute_fusion=choice.moe_permute_fusion,
            moe_router_fusion=False,
        )
    if mla:
        return MLATransformerConfig(**kwargs)
    config = TransformerConfig(**kwargs)
    if llm.yarn.enabled:
        _set_gqa_yarn(config, llm)
    return config


def llm_block_spec(
    config: TransformerConfig, vp_stage: int | None = None, pp_rank: int | None = None, *,
    choice: KernelChoice, latent_norm_eps: float = LLMConfig.mla_latent_norm_epsilon,
    sandwich_norms: bool = False,
) -> TransformerBlockSubmodules:
    """The decoder block spec for this pipeline stage (implementations from
    ``models/specs.py``: TE modules, or megatron's local MLA or GQA / MoE layers with our packed
    attention kernel, SP norms and padding-free router); MLA's latent norms at
    ``latent_norm_eps`` (``LLMConfig.mla_latent_norm_epsilon``: ``config`` has no field for it);
    ``sandwich_norms`` (``LLMConfig.sandwich_norms``) adds GLM-4.1V's output norms.

    ``choice`` is the one ``config`` was built with (:func:`build_transformer_config`): a
    megatron config alone lacks the LLM fields the choice depends on."""
    return llm_decoder_block_spec(config, choice, vp_stage=vp_stage, pp_rank=pp_rank,
                                  latent_norm_eps=latent_norm_eps, sandwich_norms=sandwich_norms)


def gpt_model_args(llm: LLMConfig, parallel: ParallelConfig, config: TransformerConfig,
                   choice: KernelChoice, vp_stage: int | None = None) -> tuple[type, dict]:
    """The ``GPTModel`` class and its architecture arguments for ``llm`` (everything but the
    stage flags and process groups): :func:`build_llm` and ``param_count.build_llm_on_meta``
    build from the same ones.

    Position embeddings: MLA rotates inside its attention and M-RoPE comes from
    :class:`MRopeGPTModel` (both ``'none'`` to megatron); GQA with 1D RoPE is megatron's
    ``'rope'`` over the first ``rotary_fraction`` of each head.
    """
    gqa = llm.attention == "gqa"
    mrope = gqa and llm.position_embedding == "mrope"
    block = llm_block_spec(config, vp_stage=vp_stage, choice=choice,
                           latent_norm_eps=llm.mla_latent_norm_epsilon,
                           sandwich_norms=llm.sandwich_norms)
    kwargs = dict(
        config=config,
        transformer_layer_spec=block,
        vocab_size=padded_vocab_size(llm.vocab_size, parallel.tp),
        max_sequence_length=llm.max_position_embeddings,
        share_embeddings_and_output_weights=not llm.untie_embeddings,
        position_embedding_type=(("yarn" if llm.yarn.enabled else "rope") if gqa and not mrope
                                 else "none"),
        rotary_percent=llm.rotary_fraction,  # GPTModel's RotaryEmbedding reads the arguments
        rotary_base=llm.rope_theta,
        mtp_block_spec=llm_mtp_block_spec(config, block, choice, vp_stage=vp_stage),
    )
    mtp = llm.mtp_num_layers > 0  # logits without labels need models/mtp.py's mixin
    if not mrope:
        return (MtpGPTModel if mtp else GPTModel), kwargs
    kwargs.update(mrope_theta=llm.rope_theta, mrope_section=llm.mrope_section,
                  mrope_style=llm.mrope_style, rotary_dim=llm.rotary_dim)
    return (MtpMRopeGPTModel if mtp else MRopeGPTModel), kwargs


def scatter_padding_mask(padding_mask: torch.Tensor,
                         tp_group: torch.distributed.ProcessGroup | None = None) -> torch.Tensor:
    """``[b, s]`` -> ``[b, s / tp]``: the padding mask in the sequence-parallel layout of
    ``tp_group`` (the model's TP group; None: :func:`~megatron_vlm.parallel.runtime.
    groups_or_default`'s).

    megatron's ``GPTModel`` does this only on the stage that embeds tokens itself
    (``models/gpt/gpt_model.py:314``); with ``decoder_input`` given, or on later pipeline stages,
    the caller must (the MoE router needs one mask entry per local token).
    """
    seq_first = padding_mask.transpose(0, 1).contiguous()
    if tp_group is None:
        tp_group = groups_or_default(required=True).tp
    return (
        tensor_parallel.scatter_to_sequence_parallel_region(seq_first, group=tp_group)
        .transpose(0, 1)
        .contiguous()
    )


def build_llm(
    llm: LLMConfig,
    parallel: ParallelConfig,
    params_dtype: str = "fp32",
    *,
    pre_process: bool = True,
    post_process: bool = True,
    vp_stage: int | None = None,
    pg_collection=None,
    scatter_embedding_sequence_parallel: bool = True,
    kernels: KernelConfig | None = None,
    choice: KernelChoice | None = None,
) -> GPTModel:
    """Build this rank's part of the LLM on ``pg_collection`` (training: the runtime's; None:
    :func:`~megatron_vlm.parallel.runtime.groups_or_default`'s).

    Layer implementations come from ``choice`` if given (a VLM resolves one for LLM and ViT
    together), else from ``kernels`` (``model.kernels``; default ``auto``) on this machine
    (:func:`llm_kernel_choice`).
    """
    pg_collection = groups_or_default(pg_collection, required=True)
    if choice is None:
        choice = llm_kernel_choice(llm, parallel, params_dtype, kernels)
    config = build_transformer_config(llm, parallel, params_dtype, choice)
    model_class, kwargs = gpt_model_args(llm, parallel, config, choice, vp_stage)
    model = model_class(
        **kwargs,
        pre_process=pre_process,
        post_process=post_process,
        vp_stage=vp_stage,
        pg_collection=pg_collection,
        scatter_embedding_sequence_parallel=scatter_embedding_sequence_parallel,
    )
    if llm.attention == "gqa" and llm.yarn.enabled and hasattr(model, "rotary_pos_emb"):
        # megatron-core 0.16.1's GPTModel builds YarnRotaryEmbedding without its cp_group (it
        # then reads parallel_state's); give it the model's (sbhd CP slicing; THD passes the
        # packed params' group per call).
        model.rotary_pos_emb.cp_group = pg_collection.cp
    if post_process:
        mask_padded_vocab(model, llm.vocab_size)
    return model
