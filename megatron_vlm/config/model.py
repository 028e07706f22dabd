"""Model configuration: the Kimi K2 / DeepSeek-V3 style MoE LLM with MLA (SPEC §2)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from megatron_vlm.config.families import DEFAULT_FAMILY, family_config_types, family_module
from megatron_vlm.config.vision import ProjectorConfig, VisionConfig


@dataclass(kw_only=True)
class YarnConfig:
    """YaRN RoPE extension (SPEC §2). Off when ``factor`` is 1."""

    factor: float = 1.0
    """Context extension factor s (K2.5: 64)."""
    original_max_position_embeddings: int = 4096
    """L0: the context length the base RoPE was trained at."""
    beta_fast: float = 32.0
    """Rotations per window above which dims are extrapolated (high-frequency end)."""
    beta_slow: float = 1.0
    """Rotations per window below which dims are interpolated (low-frequency end)."""
    mscale: float = 1.0
    """m in mscale(s, m) = 0.1 m ln s + 1 for cos/sin."""
    mscale_all_dim: float = 1.0
    """m' dividing the cos/sin scale; softmax scale gets mscale(s, m')^2. mscale(s, 0) = 1 by the
    formula (transformers instead ignores both m and m' when either is 0; see models/llm.py)."""
    truncate: bool = True
    """Round the correction range to whole dims (floor / ceil; DeepSeek-V3, Kimi). False keeps
    it fractional (GPT-OSS: HF ``rope_parameters.truncate: false``; megatron's
    ``yarn_correction_range_round_to_int``). GQA only."""

    def __post_init__(self) -> None:
        if self.factor < 1.0:
            raise ValueError(f"model.llm.yarn.factor={self.factor} must be >= 1 (1 disables YaRN)")
        if self.beta_fast < self.beta_slow:
            raise ValueError(
                f"model.llm.yarn.beta_fast={self.beta_fast} < beta_slow={self.beta_slow}; "
                "beta_fast must be the larger (e.g. 32 and 1)"
            )

    @property
    def enabled(self) -> bool:
        return self.factor > 1.0


QK_CLIP_TAU_DEFAULT = 100.0
"""QK-Clip tau of Kimi K2 (SPEC §2)."""

#: megatron-core 0.16.1 ``TransformerConfig.recompute_modules`` choices that apply to MLA/MoE.
SELECTIVE_RECOMPUTE_MODULES = (
    "core_attn", "mla_up_proj", "moe_act", "mlp", "moe", "shared_experts", "layernorm",
)


@dataclass(kw_only=True)
class KernelConfig:
    """Which implementations build the layers (chosen by capability in ``models/specs.py``)."""

    backend: Literal["auto", "te", "local"] = "auto"
    """``te``: Transformer Engine modules (fused LayerNorm+linear, TE attention with THD and
    context parallelism, optional FP8); ``local``: megatron's local modules with our packed
    attention; ``auto``: ``te`` when CUDA is present and Transformer Engine imports, else
    ``local`` (the choice and its reason are logged)."""
    attention_kernel: Literal["auto", "sdpa_mask", "sdpa_doc", "flex", "varlen"] = "auto"
    """Core attention of the local backend for packed sequences. ``sdpa_mask``: SDPA with a
    dense block-diagonal mask (the reference; CPU default); ``sdpa_doc``: SDPA per document;
    ``flex``: flex attention with a document block mask; ``varlen``:
    ``torch.nn.attention.varlen`` (flash, CUDA, bf16/fp16, no dropout). ``auto`` picks the
    fastest one the device supports."""
    fp8: bool = False
    """FP8 (TE ``hybrid`` recipe, delayed scaling) on the ``te`` backend only."""
    moe_grouped_gemm: Literal["auto", "on", "off"] = "auto"
    """Routed experts as grouped GEMMs (bf16): TE's ``TEGroupedMLP``; without TE torch's
    ``grouped_mm`` (CUDA sm90+, same parameters as per-expert MLPs) or megatron's legacy
    ``GroupedMLP`` (``grouped_gemm`` package). ``auto`` = on when available; ``off`` = megatron's
    per-expert ``SequentialMLP``."""

    # GPU kernel fusions (megatron ``TransformerConfig`` fields of the same names). ``None`` =
    # by capability in ``models/gpu_settings.py`` (every one is off on CPU, so the CPU path never
    # changes); ``true`` that this machine or model cannot honour is refused at start-up with the
    # reason; ``false`` is always honoured.
    bias_activation_fusion: bool | None = None
    """megatron's fused SwiGLU (``bias_swiglu_impl``, compiled with ``torch.compile``: one kernel
    forward, one backward that recomputes from the fc1 output instead of keeping the SiLU output)
    in the dense MLPs, the shared experts and megatron's routed experts (our torch ``grouped_mm``
    experts have their own). Needs CUDA and Triton. None: on when both are there. The vision
    tower's GELU-tanh is not one megatron fuses, so it never applies there."""
    apply_rope_fusion: bool | None = None
    """megatron's fused MLA YaRN RoPE (Triton kernels for q and k/v, THD and context
    parallelism aware). Needs CUDA, Triton and YaRN (``model.llm.yarn.factor > 1``; megatron
    supports no plain-RoPE MLA fusion), training only. None: off -- megatron-core 0.16.1 marks
    it experimental, and its bf16 cos/sin cache is unverified against the unfused RoPE our
    HF-equality tests pin. The vision tower rotates with its own 2D RoPE."""
    masked_softmax_fusion: bool | None = None
    """megatron's ``FusedScaleMaskSoftmax`` in its own ``DotProductAttention``. Our packed
    attention kernels and TE's attention never call it, so ``true`` is refused (it would do
    nothing); None and false: off."""
    gradient_accumulation_fusion: bool | None = None
    """Weight gradients accumulated straight into megatron DDP's fp32 ``main_grad`` buffers by
    the GEMM (TE linears' ``fuse_wgrad_accumulation``; megatron's own linears through Apex's
    ``fused_weight_gradient_mlp_cuda``): saves a bf16 gradient per weight and an add. Needs
    CUDA and Apex's extension in every spec: the LLM's output layer is megatron's
    ``ColumnParallelLinear`` even with TE (``gpt_model.py:241``), which refuses the flag
    without it (``tensor_parallel/layers.py:924``). Needs the model wrapped in megatron DDP
    (training does). None: on when both are there."""
    moe_permute_fusion: bool | None = None
    """Fused token permute/unpermute in megatron's MoE token dispatchers (Transformer Engine
    >= 2.1 kernels). Needs CUDA, an MoE LLM and TE (checked only with ``backend`` auto or
    te). None: on when available."""
    moe_shared_expert_overlap: bool | None = None
    """Shared experts computed on a side CUDA stream while the alltoall dispatcher moves the
    routed tokens (megatron runs them after the router then, so the hidden-state gradient sums
    in another order: bit-level differences). Needs CUDA, shared experts, the alltoall
    dispatcher, and ``shared_experts`` not in selective ``recompute_modules`` (megatron refuses
    the pair). None: on when all hold."""

    def __post_init__(self) -> None:
        if self.fp8 and self.backend == "local":
            raise ValueError("model.kernels.fp8=true needs Transformer Engine: set "
                             "model.kernels.backend=te (or auto on a machine with TE)")


@dataclass(kw_only=True)
class LLMConfig:
    """The language model: RMSNorm, SwiGLU, dense or DeepSeek-V3 style MoE FFNs, and MLA (Kimi
    K2 / DeepSeek-V3, the default) or grouped-query attention (``attention: gqa``: Qwen3, GLM-4).
    GLM options: partial rotary (``rotary_fraction``), the M-RoPE layout (``mrope_style``),
    GLM-4.1V's sandwich norms and GLM-4.5-Air's MTP layer (``mtp_num_layers``). Qwen3-MoE:
    ``moe_layer_pattern``, ``moe_router_pre_softmax``. GPT-OSS: ``attention_sinks``,
    ``sliding_window`` / ``window_attn_skip_freq``, ``mlp_activation: clamped_swiglu``,
    ``add_bias_linear``, YaRN with ``yarn.truncate``."""

    attention: Literal["mla", "gqa"] = "mla"
    """Attention kind. ``mla``: multi-head latent attention (the ``q_lora_rank`` ...
    ``v_head_dim`` fields); ``gqa``: grouped-query attention (``num_query_groups``,
    ``kv_channels``, ``qk_layernorm``, ``add_qkv_bias``; the MLA fields are ignored)."""

    vocab_size: int = 163840
    """Vocabulary size (padded vocab is computed from it and TP)."""
    hidden_size: int = 7168
    """Model width."""
    num_layers: int = 61
    """Transformer layers."""
    num_attention_heads: int = 64
    """Attention heads."""
    q_lora_rank: int | None = 1536
    """Rank of the query down-projection; None = full q_proj (Moonlight / Kimi-VL)."""
    kv_lora_rank: int = 512
    """Rank of the compressed KV latent."""
    qk_nope_head_dim: int = 128
    """Per-head query/key dim without RoPE."""
    qk_rope_head_dim: int = 64
    """Per-head query/key dim with RoPE (the rope key is shared across heads)."""
    v_head_dim: int = 128
    """Per-head value dim."""
    num_query_groups: int | None = None
    """GQA only: key/value heads (Qwen3-8B: 8); None = ``num_attention_heads`` (plain MHA)."""
    kv_channels: int | None = None
    """GQA only: the q/k/v head dim (Qwen3: 128, not ``hidden_size / num_attention_heads``);
    None = ``hidden_size // num_attention_heads``."""
    qk_layernorm: bool = False
    """GQA only: RMSNorm over each query and key head before RoPE (Qwen3: true; HF
    ``q_norm``/``k_norm``), at ``norm_epsilon``. MLA always has its latent norms."""
    add_qkv_bias: bool = False
    """GQA only: biases on the q/k/v projections (Qwen2: true; Qwen3: false)."""
    add_bias_linear: bool = False
    """GQA only: biases on every other linear too: the attention output projection, the MLPs'
    and experts' ``linear_fc1``/``linear_fc2`` and the router (megatron ``add_bias_linear``;
    GPT-OSS: true, with ``add_qkv_bias``)."""
    attention_sinks: bool = False
    """GQA only: one learned logit per head that joins every query's softmax denominator and
    attends to nothing (GPT-OSS HF ``sinks``; megatron ``softmax_type='learnable'``, parameter
    ``core_attention.softmax_offset``)."""
    sliding_window: int | None = None
    """GQA only: sliding-window layers let a query see itself and the ``sliding_window - 1``
    tokens before it in its document (GPT-OSS: 128; megatron ``window_size = (sliding_window -
    1, 0)``). None = full causal attention in every layer."""
    window_attn_skip_freq: int | None = None
    """With ``sliding_window``: every ``N``-th layer (1-based: layers N, 2N, ...) keeps full
    attention, the others slide (GPT-OSS: 2, layer 0 sliding); None = every layer slides.
    megatron's ``window_attn_skip_freq``."""
    mlp_activation: Literal["swiglu", "clamped_swiglu"] = "swiglu"
    """The gated MLPs' and experts' activation on ``linear_fc1 = [gate; up]``. ``swiglu``:
    ``silu(gate) * up``; ``clamped_swiglu`` (GPT-OSS): ``g * sigmoid(1.702 g) * (u + 1)`` with
    ``g = min(gate, swiglu_limit)``, ``u = clamp(up, -swiglu_limit, swiglu_limit)`` (megatron
    ``quick_gelu`` + ``glu_linear_offset=1`` + ``activation_func_clamp_value``)."""
    swiglu_limit: float = 7.0
    """``clamped_swiglu``'s clamp (GPT-OSS HF ``swiglu_limit``: 7)."""
    ffn_hidden_size: int = 18432
    """FFN size of the dense layers."""
    num_dense_layers: int = 1
    """The first layers use a dense FFN (Kimi K2: 1, DeepSeek-V3: 3). With ``moe_layer_pattern``:
    the number of dense layers in it (its 0s), wherever they are."""
    moe_layer_pattern: list[int] | None = None
    """MoE models whose dense layers are not just the first ones: megatron's per-layer
    ``moe_layer_freq`` list, one entry per layer, 1 = MoE, 0 = dense (``ffn_hidden_size``).
    Qwen3-MoE: layer ``i`` is MoE iff ``i`` is not in HF ``mlp_only_layers`` and ``(i + 1) %
    decoder_sparse_step == 0`` (Qwen3-30B-A3B: all 1). None = ``num_dense_layers`` 0s, then 1s."""
    num_experts: int | None = 384
    """Routed experts per MoE layer; None = dense model."""
    moe_router_topk: int = 8
    """Experts per token."""
    num_shared_experts: int = 1
    """Shared experts (their FFN is num_shared_experts * moe_ffn_hidden_size wide)."""
    moe_ffn_hidden_size: int = 2048
    """FFN size of one routed expert."""
    moe_router_score_function: Literal["sigmoid", "softmax"] = "sigmoid"
    """Router score function. ``sigmoid`` (Kimi, GLM): the top-k sigmoid scores renormalised;
    ``softmax`` (Qwen3-MoE, GPT-OSS): see ``moe_router_pre_softmax``."""
    moe_router_pre_softmax: bool = False
    """``softmax`` router only. False: top-k of the router logits, then a softmax over those k
    (equal to softmax over all experts, top-k, renormalised: Qwen3-MoE ``norm_topk_prob: true``;
    GPT-OSS); True: softmax over all experts, then top-k, not renormalised (Qwen3-MoE
    ``norm_topk_prob: false``). megatron's ``moe_router_pre_softmax``."""
    moe_router_topk_scaling_factor: float = 2.827
    """Routed scaling factor applied to the normalised top-k probabilities."""
    moe_router_num_groups: int | None = None
    """Expert groups for group-limited routing (DeepSeek-V3: 8); None = off."""
    moe_router_group_topk: int | None = None
    """Groups selected per token (DeepSeek-V3: 4)."""
    moe_router_enable_expert_bias: bool = True
    """Aux-loss-free balancing with a per-expert routing bias."""
    moe_router_bias_update_rate: float = 1e-3
    """Step of the expert-bias sign rule per global batch."""
    moe_aux_loss_coeff: float = 0.0
    """Sequence-level auxiliary balance loss coefficient (0 = off)."""
    moe_token_dispatcher: Literal["allgather", "alltoall"] = "alltoall"
    """megatron-core token dispatcher."""
    rope_theta: float = 50000.0
    """RoPE base."""
    position_embedding: Literal["rope", "mrope"] = "rope"
    """``rope``: 1D RoPE of each token's position in its document; ``mrope``: multimodal RoPE
    (Qwen2-VL layout, ``models/mrope.py``) from 3-axis (t, h, w) position ids ``[3, S]``; GQA
    only (megatron-core supports it with MLA neither)."""
    mrope_section: list[int] | None = None
    """With ``mrope``: how many of the head dim's ``kv_channels / 2`` rotary frequencies each
    axis (t, h, w) takes, in order; chunk ``i`` uses axis ``i % 3`` (Qwen2.5-VL at head dim 128:
    [16, 24, 24]). Must sum to ``kv_channels / 2``."""
    mrope_style: Literal["neox", "interleaved"] = "neox"
    """With ``mrope``: how the sectioned angles pair up the rotated channels. ``neox``: halves
    ``[f, f]`` rotated with rotate_half (Qwen2-VL, Keye, GLM-4.5V); ``interleaved``: adjacent
    pairs ``[f0, f0, f1, f1, ...]`` (GPT-J; GLM-4.1V), megatron's ``rotary_interleaved``."""
    rotary_fraction: float = 1.0
    """GQA only: the fraction of each q/k head dim RoPE rotates: the first ``rotary_fraction *
    head_dim`` channels, the rest pass unrotated (HF ``partial_rotary_factor``, megatron's
    ``rotary_percent``; GLM-4.5V / 4.1V: 0.5). With ``mrope`` the sections cover those rotated
    channels' frequencies."""
    yarn: YarnConfig = field(default_factory=YarnConfig)
    """YaRN context extension."""
    sandwich_norms: bool = False
    """Extra RMSNorms on the attention output and on the MLP output, each before its residual
    add (GLM-4.1V / GLM-4: HF ``post_self_attn_layernorm`` and ``post_mlp_layernorm``; four
    norms per layer). A layer-spec extension of megatron's ``TransformerLayer``
    (``models/sandwich.py``)."""
    mtp_num_layers: int = 0
    """Multi-token-prediction layers after the decoder, each predicting one token further
    (megatron ``mtp_num_layers``; GLM-4.5-Air: 1, HF ``num_nextn_predict_layers``). 0 = none."""
    mtp_loss_weight: float = 0.0
    """Weight of the MTP losses in the training loss (megatron ``mtp_loss_scaling_factor``, split
    over the MTP layers). 0 (default) builds the MTP layers so that they load and export, but
    trains nothing through them: the LM loss and every gradient outside them are unchanged."""
    norm_epsilon: float = 1e-6
    """RMSNorm epsilon of the layer and final norms (HF ``rms_norm_eps``)."""
    mla_latent_norm_epsilon: float = 1e-6
    """RMSNorm epsilon of MLA's latent norms (HF ``q_a_layernorm``/``kv_a_layernorm``).
    transformers' DeepSeek-V3, like DeepSeek's and Moonlight's own code, builds them at 1e-6
    whatever ``rms_norm_eps`` says (Moonlight / Kimi-VL: 1e-5); HF configs have no field for it,
    so import sets 1e-6 and export writes nothing."""
    init_method_std: float = 0.02
    """Std of the normal weight init."""
    untie_embeddings: bool = True
    """Separate input embedding and output head (Kimi K2: untied)."""
    attention_dropout: float = 0.0
    """Dropout on attention probabilities."""
    hidden_dropout: float = 0.0
    """Dropout on residual branches."""
    max_position_embeddings: int = 131072
    """Longest sequence the model is configured for."""
    qk_clip: bool = False
    """Record per-head max logits for QK-Clip (MuonClip)."""
    qk_clip_threshold: float = QK_CLIP_TAU_DEFAULT
    """QK-Clip tau (SPEC: 100): the one threshold on the max scaled logit per head, for the LLM
    and, with ``model.vision.qk_clip``, the vision tower. ``optim.qk_clip_tau`` and
    ``model.vision.qk_clip_threshold`` are legacy fields folded into it
    (:func:`adopt_legacy_qk_clip_tau`)."""
    log_max_attention_logit: bool = False
    """Record per-head max attention logits for logging only."""
    recompute: Literal["none", "full", "selective"] = "none"
    """LLM activation recompute: ``full`` recomputes whole layers (megatron 'full'/'uniform',
    ``recompute_num_layers`` per chunk), ``selective`` only ``recompute_modules``. Recompute of
    the vision tower alone is ``model.vision.recompute`` with this left at ``none``."""
    recompute_num_layers: int = 1
    """Layers per recomputed chunk when ``recompute='full'``."""
    recompute_modules: list[str] = field(default_factory=lambda: ["core_attn"])
    """megatron's selective-recompute modules when ``recompute='selective'``: any of
    core_attn, mla_up_proj, moe_act, mlp, moe, shared_experts, layernorm."""

    def __post_init__(self) -> None:
        if self.recompute_num_layers < 1:
            raise ValueError(
                f"model.llm.recompute_num_layers={self.recompute_num_layers} must be >= 1")
        bad = sorted(set(self.recompute_modules) - set(SELECTIVE_RECOMPUTE_MODULES))
        if bad:
            raise ValueError(
                f"model.llm.recompute_modules has {bad}; choose from "
                f"{list(SELECTIVE_RECOMPUTE_MODULES)}")
        if self.recompute == "selective" and not self.recompute_modules:
            raise ValueError("model.llm.recompute=selective needs recompute_modules "
                             "(e.g. [core_attn]); or set recompute=none")
        if not self.qk_clip_threshold > 0:
            raise ValueError(
                f"model.llm.qk_clip_threshold={self.qk_clip_threshold} must be > 0 (SPEC: 100)")
        if not (self.norm_epsilon > 0 and self.mla_latent_norm_epsilon > 0):
            raise ValueError(
                f"model.llm.norm_epsilon={self.norm_epsilon} and model.llm."
                f"mla_latent_norm_epsilon={self.mla_latent_norm_epsilon} must both be > 0 "
                "(DeepSeek-V3 / Kimi: 1e-6)")
        if self.mtp_num_layers < 0 or self.mtp_loss_weight < 0:
            raise ValueError(
                f"model.llm.mtp_num_layers={self.mtp_num_layers} and mtp_loss_weight="
                f"{self.mtp_loss_weight} must be >= 0 (GLM-4.5-Air: 1 layer, weight 0 or 0.3)")
        if self.hidden_size <= 0 or self.num_layers <= 0 or self.num_attention_heads <= 0:
            raise ValueError(
                "model.llm hidden_size, num_layers and num_attention_heads must be > 0")
        if self.num_dense_layers > self.num_layers:
            raise ValueError(
                f"model.llm.num_dense_layers={self.num_dense_layers} exceeds "
                f"num_layers={self.num_layers}; set num_dense_layers <= num_layers"
            )
        self._check_attention()
        self._check_moe_pattern()
        self._check_window()
        if self.num_experts is not None:
            if self.moe_router_topk > self.num_experts:
                raise ValueError(
                    f"model.llm.moe_router_topk={self.moe_router_topk} > num_experts="
                    f"{self.num_experts}; choose topk <= num_experts"
                )
            if (self.moe_router_num_groups is None) != (self.moe_router_group_topk is None):
                raise ValueError(
                    "model.llm.moe_router_num_groups and moe_router_group_topk must be set "
                    "together (e.g. 8 and 4) or both left None"
                )
            if self.moe_router_num_groups and self.num_experts % self.moe_router_num_groups:
                raise ValueError(
                    f"model.llm.moe_router_num_groups={self.moe_router_num_groups} does not "
                    f"divide num_experts={self.num_experts}"
                )

    def _check_moe_pattern(self) -> None:
        """``moe_layer_pattern`` and ``moe_router_pre_softmax`` against the layers and router."""
        if self.moe_router_pre_softmax and self.moe_router_score_function != "softmax":
            raise ValueError("model.llm.moe_router_pre_softmax=true applies to "
                             "moe_router_score_function=softmax; set it false with sigmoid")
        pattern = self.moe_layer_pattern
        if pattern is None:
            return
        if self.num_experts is None:
            raise ValueError("model.llm.moe_layer_pattern is set but num_experts is null (a "
                             "dense model); leave moe_layer_pattern null")
        if len(pattern) != self.num_layers or set(pattern) - {0, 1}:
            raise ValueError(
                f"model.llm.moe_layer_pattern={pattern} must have num_layers={self.num_layers} "
                "entries, each 1 (MoE) or 0 (dense)")
        if pattern.count(0) != self.num_dense_layers:
            raise ValueError(
                f"model.llm.moe_layer_pattern has {pattern.count(0)} dense layers (0s) but "
                f"num_dense_layers={self.num_dense_layers}; set num_dense_layers to the number "
                "of 0s")

    def _check_window(self) -> None:
        """``sliding_window``, ``window_attn_skip_freq`` and the clamped SwiGLU."""
        if self.sliding_window is not None and self.sliding_window < 1:
            raise ValueError(f"model.llm.sliding_window={self.sliding_window} must be >= 1 "
                             "tokens (GPT-OSS: 128) or null")
        if self.window_attn_skip_freq is not None:
            if self.sliding_window is None:
                raise ValueError("model.llm.window_attn_skip_freq needs sliding_window; set "
                                 "sliding_window (GPT-OSS: 128) or leave it null")
            if self.window_attn_skip_freq < 1:
                raise ValueError(f"model.llm.window_attn_skip_freq={self.window_attn_skip_freq} "
                                 "must be >= 1 (GPT-OSS: 2)")
        if not self.swiglu_limit > 0:
            raise ValueError(f"model.llm.swiglu_limit={self.swiglu_limit} must be > 0 "
                             "(GPT-OSS: 7)")

    def layer_slides(self, layer: int) -> bool:
        """Whether 0-based decoder layer ``layer`` uses the sliding window (megatron's
        ``is_layer_window_attention`` on 1-based layer numbers)."""
        if self.sliding_window is None:
            return False
        freq = self.window_attn_skip_freq
        return freq is None or (layer + 1) % freq != 0

    def _check_attention(self) -> None:
        """The GQA and M-RoPE fields against the attention kind."""
        if self.attention == "mla":
            gqa_set = [name for name, off in (
                ("num_query_groups", None), ("kv_channels", None), ("qk_layernorm", False),
                ("add_qkv_bias", False), ("attention_sinks", False), ("sliding_window", None),
                ("add_bias_linear", False))
                if getattr(self, name) != off]
            if gqa_set:
                raise ValueError(
                    f"model.llm.{gqa_set[0]} applies to attention=gqa only; with attention=mla "
                    "leave it unset (MLA's heads are q_lora_rank ... v_head_dim)")
            if self.position_embedding != "rope":
                raise ValueError("model.llm.position_embedding=mrope needs attention=gqa "
                                 "(megatron-core has no M-RoPE for MLA)")
            if not self.yarn.truncate:
                raise ValueError("model.llm.yarn.truncate=false applies to attention=gqa; MLA's "
                                 "YaRN always rounds its correction range")
            if self.rotary_fraction != 1.0:
                raise ValueError(
                    f"model.llm.rotary_fraction={self.rotary_fraction} applies to attention=gqa; "
                    "MLA's rotated part is qk_rope_head_dim: leave rotary_fraction at 1")
            return
        groups = self.num_query_groups or self.num_attention_heads
        if groups <= 0 or self.num_attention_heads % groups:
            raise ValueError(
                f"model.llm.num_query_groups={self.num_query_groups} must divide "
                f"num_attention_heads={self.num_attention_heads} (Qwen3-8B: 8 of 32)")
        if self.kv_channels is not None and (self.kv_channels <= 0 or self.kv_channels % 2):
            raise ValueError(f"model.llm.kv_channels={self.kv_channels} must be a positive even "
                             "head dim (Qwen3: 128)")
        if self.yarn.enabled and self.position_embedding != "rope":
            raise ValueError("model.llm.yarn with attention=gqa needs position_embedding=rope "
                             "(megatron has no YaRN M-RoPE); set yarn.factor=1")
        if self.qk_clip:
            raise ValueError("model.llm.qk_clip is implemented for attention=mla only; set "
                             "qk_clip=false with attention=gqa (log_max_attention_logit works)")
        rotary_dim = self.head_dim * self.rotary_fraction
        if not (0 < self.rotary_fraction <= 1) or rotary_dim != int(rotary_dim) or rotary_dim % 2:
            raise ValueError(
                f"model.llm.rotary_fraction={self.rotary_fraction} must be in (0, 1] and rotate "
                f"an even number of the head dim's {self.head_dim} channels (GLM: 0.5)")
        if self.position_embedding == "mrope":
            half = self.rotary_dim // 2
            what = ("head_dim / 2" if self.rotary_fraction == 1
                    else "head_dim * rotary_fraction / 2")
            if (not self.mrope_section or len(self.mrope_section) != 3
                    or min(self.mrope_section) < 0 or sum(self.mrope_section) != half):
                raise ValueError(
                    f"model.llm.mrope_section={self.mrope_section} must be three sizes (t, h, w) "
                    f"summing to {what} = {half} (Qwen2.5-VL, head dim 128: [16, 24, 24]; "
                    "GLM-4.5V, 64 rotated dims: [8, 12, 12])")
        elif self.mrope_section is not None:
            raise ValueError("model.llm.mrope_section is set but position_embedding=rope; set "
                             "position_embedding=mrope or leave mrope_section null")
        elif self.mrope_style != "neox":
            raise ValueError(f"model.llm.mrope_style={self.mrope_style} applies to "
                             "position_embedding=mrope; leave it at neox with 1D rope")

    @property
    def head_dim(self) -> int:
        """GQA: the q/k/v head dim (``kv_channels``, default ``hidden_size // heads``); MLA: the
        q/k head dim including the rope part (:attr:`qk_head_dim`)."""
        if self.attention == "mla":
            return self.qk_head_dim
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    @property
    def rotary_dim(self) -> int:
        """GQA: the q/k channels RoPE rotates, ``head_dim * rotary_fraction`` (GLM-4.5V: 64)."""
        return int(self.head_dim * self.rotary_fraction)

    @property
    def query_groups(self) -> int:
        """Key/value heads: ``num_query_groups`` (default: one per query head; MLA: heads)."""
        if self.attention == "mla":
            return self.num_attention_heads
        return self.num_query_groups or self.num_attention_heads

    @property
    def qk_head_dim(self) -> int:
        """Query/key head dim including the rope part (K2: 192)."""
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def num_moe_layers(self) -> int:
        return 0 if self.num_experts is None else self.num_layers - self.num_dense_layers

    @property
    def moe_layer_freq(self) -> list[int]:
        """megatron's per-layer pattern: 0 = dense FFN, 1 = MoE."""
        if self.num_experts is None:
            return [0] * self.num_layers
        if self.moe_layer_pattern is not None:
            return list(self.moe_layer_pattern)
        return [0] * self.num_dense_layers + [1] * (self.num_layers - self.num_dense_layers)


def adopt_legacy_qk_clip_tau(llm: LLMConfig, tau: float | None, name: str,
                             saved_default: bool = False) -> None:
    """Fold a legacy tau field (``optim.qk_clip_tau``, ``model.vision.qk_clip_threshold``) into
    the one tau ``model.llm.qk_clip_threshold``.

    null: nothing to do. A value becomes the model's tau when that is still the default (100)
    or already equal; otherwise both were given and differ, which is refused (the model's own
    100 is indistinguishable from unset). ``saved_default``: the legacy field's old default was
    100 and every earlier save wrote it (``model.vision.qk_clip_threshold``), so 100 there
    counts as unset.
    """
    if tau is None or tau == llm.qk_clip_threshold:
        return
    if saved_default and tau == QK_CLIP_TAU_DEFAULT:
        return
    if llm.qk_clip_threshold != QK_CLIP_TAU_DEFAULT:
        raise ValueError(
            f"{name}={tau} != model.llm.qk_clip_threshold={llm.qk_clip_threshold}: QK-Clip has "
            f"one tau for the LLM and the vision tower; set model.llm.qk_clip_threshold and "
            f"leave {name} null")
    if not tau > 0:
        raise ValueError(f"{name}={tau} must be > 0 (SPEC: 100)")
    llm.qk_clip_threshold = float(tau)


@dataclass(kw_only=True)
class TokenIdsConfig:
    """Special-token ids the model's HF config carries (HF ``Kimi_K25Config`` names in brackets).

    None = taken from the run's tokenizer at start-up (the filled-in values are what the run's
    ``job.yaml`` and every checkpoint manifest record, so an export writes the ids the model was
    trained with). A value set here must equal the tokenizer's, else start-up refuses the run.
    ``tools/convert_hf.py import`` fills them from the HF config.
    """

    bos: int | None = None
    """Beginning of sequence [``bos_token_id``]."""
    eos: int | None = None
    """End of document [``eos_token_id``]; appended to every document."""
    pad: int | None = None
    """Padding [``pad_token_id``]."""
    image: int | None = None
    """Image placeholder, repeated h*w/4 times per image [``image_token_id``]."""
    video: int | None = None
    """Video placeholder, repeated h*w/4 times per chunk [``video_token_id``]."""
    media_begin: int | None = None
    """Opens a media item [``vision_start_token_id``]."""
    media_content: int | None = None
    """Separates a media item's kind word from its placeholders."""
    media_end: int | None = None
    """Closes a media item [``vision_end_token_id``]."""


TOKEN_ID_NAMES = ("bos", "eos", "pad", "image", "video", "media_begin", "media_content",
                  "media_end")
"""Fields of :class:`TokenIdsConfig`, in order."""


@dataclass(kw_only=True)
class ModelConfig:
    """The whole model: the LLM, and for a VLM the vision tower and projector.

    ``family`` decides what ``vision`` and ``projector`` are (each family declares their
    dataclasses, ``config/families.py``); a YAML or override reads them as that family's types.
    """

    family: str = DEFAULT_FAMILY
    """Model family (``config/families.py``): the vision tower, projector, position ids, media
    rules, chat template and HF table the run uses (``kimi``: Kimi K2.5 / Kimi-VL)."""
    llm: LLMConfig = field(default_factory=LLMConfig)
    """Language model."""
    vision: VisionConfig | None = None
    """Vision tower, of the family's type (Kimi: MoonViT ``VisionConfig``); None = text-only."""
    projector: ProjectorConfig | None = None
    """Vision -> LLM projector, of the family's type; required with ``vision``."""
    params_dtype: Literal["fp32", "bf16"] = "fp32"
    """Parameter/compute dtype (bf16 keeps fp32 main params in the optimizer)."""
    freeze_vision: bool = False
    """Keep the vision tower's weights fixed (no gradient, not in the optimizer)."""
    freeze_projector: bool = False
    """Keep the projector's weights fixed."""
    freeze_llm: bool = False
    """Keep the LLM's weights fixed (e.g. vision-alignment stages)."""
    kernels: KernelConfig = field(default_factory=KernelConfig)
    """Layer implementations (Transformer Engine or local, attention kernel, grouped GEMM)."""
    token_ids: TokenIdsConfig = field(default_factory=TokenIdsConfig)
    """Special-token ids (None = from the tokenizer at start-up; see TokenIdsConfig)."""

    @classmethod
    def section_type(cls, name: str, data: dict) -> type | None:
        """The dataclass of section ``name`` given this config's dict ``data`` (``config/job.py``
        reads YAML and overrides with it): ``vision`` and ``projector`` are the family's types."""
        if name not in ("vision", "projector"):
            return None
        vision, projector = family_config_types(data.get("family") or DEFAULT_FAMILY)
        return vision if name == "vision" else projector

    def __post_init__(self) -> None:
        family_module(self.family)  # a clear error for an unknown family
        if (self.vision is None) != (self.projector is None):
            raise ValueError("model.vision and model.projector must be set together (a VLM) or "
                             "both left null (text-only)")
        if self.vision is not None:
            vision_type, projector_type = family_config_types(self.family)
            for name, value, want in (("vision", self.vision, vision_type),
                                      ("projector", self.projector, projector_type)):
                if not isinstance(value, want):
                    raise ValueError(
                        f"model.{name} is a {type(value).__name__} but model.family="
                        f"{self.family!r} takes a {want.__name__}; set model.family to the "
                        f"family of this tower or build the config from that family's recipe")
            self.projector.check_matches(self.vision, self.llm.hidden_size)
            legacy_tau = getattr(self.vision, "qk_clip_threshold", None)
            adopt_legacy_qk_clip_tau(self.llm, legacy_tau, "model.vision.qk_clip_threshold",
                                     saved_default=True)
            if legacy_tau is not None:
                self.vision.qk_clip_threshold = None
        elif self.freeze_vision or self.freeze_projector:
            raise ValueError("model.freeze_vision/freeze_projector need a vision tower")

    @property
    def is_vlm(self) -> bool:
        return self.vision is not None
