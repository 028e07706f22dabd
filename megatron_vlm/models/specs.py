"""Layer implementations chosen by capability, in one place (LLM and vision tower).

Three questions are answered here, from ``model.kernels`` (:class:`KernelConfig`) and what the
machine has (:class:`Capabilities`):

1. **Backend** -- ``te``: Transformer Engine modules (fused LayerNorm + linear, TE attention with
   THD packing, context parallelism and max-logit recording, optional FP8), megatron's
   ``get_gpt_decoder_block_spec(use_transformer_engine=True)``; ``local``: megatron's local modules
   with our SP-capable norms, TP-duplicated MLA down-projections and packed core attention.
2. **Attention kernel** of the local backend for packed sequences: ``sdpa_mask`` (dense mask, the
   reference), ``sdpa_doc``, ``flex`` or ``varlen`` (``models/packed_kernels.py``).
3. **Routed experts**: ``te_grouped`` (TE's ``TEGroupedMLP``, megatron ``moe_grouped_gemm``),
   ``torch_grouped_mm`` (our ``GroupedMMSequentialMLP``: torch's ``grouped_mm``, same parameters
   as the per-expert MLPs; CUDA sm90+, bf16), ``legacy_grouped`` (megatron's ``GroupedMLP`` with the
   ``grouped_gemm`` package, bf16) or ``sequential`` (megatron's ``SequentialMLP``).
4. **Kernel fusions** (``model.kernels.bias_activation_fusion`` ... ``moe_shared_expert_overlap``),
   by the rules of ``models/gpu_settings.py`` (all off on CPU).

:func:`choose_kernels` is a pure function of the config and the capabilities (tests pass
capabilities in); :func:`detect_capabilities` looks at the machine and never imports Transformer
Engine unless CUDA is present and the config allows TE (``backend`` ``auto`` or ``te``).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
from dataclasses import dataclass

import torch
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

from megatron_vlm.config.model import KernelConfig, LLMConfig
from megatron_vlm.models.gpu_settings import FUSION_FIELDS, choose_fusions, short_names

logger = logging.getLogger(__name__)

LOCAL_KERNELS = ("sdpa_mask", "sdpa_doc", "flex", "varlen")
_FLASH_MAX_HEAD_DIM = 256  # flash attention's largest head dim


@dataclass(frozen=True)
class Capabilities:
    """What this machine offers (all False on the CPU path)."""

    cuda: bool
    """A CUDA device is visible."""
    transformer_engine: bool
    """``transformer_engine.pytorch`` imports (checked only with CUDA and a TE-allowing config)."""
    varlen: bool
    """``torch.nn.attention.varlen`` exists (flash varlen; CUDA only)."""
    flex: bool
    """``torch.nn.attention.flex_attention`` exists."""
    grouped_gemm: bool
    """The ``grouped_gemm`` package (megatron's legacy ``GroupedMLP``) is installed."""
    torch_grouped_mm: bool = False
    """torch's ``grouped_mm`` runs here in bf16 (CUDA compute capability >= 9.0)."""
    triton: bool = False
    """Triton is installed with CUDA (``torch.compile``'d fusions, megatron's MLA RoPE kernels)."""
    apex_grad_accum: bool = False
    """Apex's ``fused_weight_gradient_mlp_cuda`` is installed with CUDA (gradient-accumulation
    fusion in megatron's own linears)."""
    te_fused_permute: bool = False
    """megatron's MoE fused permute functions are available (Transformer Engine >= 2.1; checked
    only when TE is)."""


@dataclass(frozen=True)
class KernelChoice:
    """The implementations a model is built with, and why."""

    backend: str
    """``te`` or ``local``."""
    attention_kernel: str
    """``te`` on the TE backend, else one of :data:`LOCAL_KERNELS`."""
    moe_grouped_gemm: bool
    """megatron ``moe_grouped_gemm`` (TE's or the legacy grouped MLP)."""
    fp8: bool
    """FP8 (TE only)."""
    reasons: tuple[str, ...] = ()
    """One line per decision, for the log."""
    experts: str = "sequential"
    """Routed-expert implementation: te_grouped, torch_grouped_mm, legacy_grouped, sequential."""
    # Resolved ``model.kernels`` fusions (models/gpu_settings.py), megatron field names.
    bias_activation_fusion: bool = False
    """megatron's fused SwiGLU."""
    apply_rope_fusion: bool = False
    """megatron's fused MLA YaRN RoPE."""
    masked_softmax_fusion: bool = False
    """megatron's fused softmax (never used by our attention: always off)."""
    gradient_accumulation_fusion: bool = False
    """Weight gradients accumulated into ``main_grad`` inside the GEMM."""
    moe_permute_fusion: bool = False
    """TE's fused MoE token permutation."""
    moe_shared_expert_overlap: bool = False
    """Shared experts overlapped with the alltoall token dispatch."""

    @property
    def fusions(self) -> dict[str, bool]:
        """``{megatron field: value}`` of the resolved fusions."""
        return {name: getattr(self, name) for name in FUSION_FIELDS}

    def describe(self) -> str:
        return (f"backend={self.backend} attention={self.attention_kernel} "
                f"experts={self.experts} fp8={self.fp8} fused={short_names(self.fusions)} "
                f"({'; '.join(self.reasons)})")


def _has_module(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False


def grouped_mm_fn():
    """torch's grouped GEMM (``F.grouped_mm`` in recent torch, ``torch._grouped_mm`` in 2.8+), or
    None."""
    import torch.nn.functional as F

    return getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def detect_capabilities(kernels: KernelConfig) -> Capabilities:
    """Capabilities of this machine. Transformer Engine is imported (to prove it loads) only when
    CUDA is present and ``kernels.backend`` is ``auto`` or ``te``."""
    cuda = torch.cuda.is_available()
    te = False
    if cuda and kernels.backend in ("auto", "te") and _has_module("transformer_engine"):
        try:
            import transformer_engine.pytorch  # noqa: F401 - proves the CUDA extension loads

            te = True
        except Exception as exc:  # noqa: BLE001 - a broken install means "no TE", with a reason
            logger.warning("transformer_engine is installed but does not import: %s", exc)
    te_permute = False
    if te:
        from megatron.core.transformer.moe import moe_utils

        # The functions megatron's config checks for moe_permute_fusion (None below TE 2.1).
        te_permute = all(getattr(moe_utils, name, None) is not None for name in (
            "fused_permute", "fused_permute_with_probs", "fused_sort_chunks_by_index",
            "fused_sort_chunks_by_index_with_probs", "fused_unpermute"))
    sm90 = False
    if cuda and grouped_mm_fn() is not None:
        try:
            sm90 = torch.cuda.get_device_capability()[0] >= 9
        except (RuntimeError, AssertionError):  # a CUDA build that cannot query the device
            sm90 = False
    return Capabilities(
        cuda=cuda,
        transformer_engine=te,
        varlen=_has_module("torch.nn.attention.varlen"),
        flex=_has_module("torch.nn.attention.flex_attention"),
        grouped_gemm=cuda and _has_module("grouped_gemm"),
        torch_grouped_mm=sm90,
        triton=cuda and _has_module("triton"),
        apex_grad_accum=cuda and _has_module("fused_weight_gradient_mlp_cuda"),
        te_fused_permute=te_permute,
    )


def choose_kernels(
    kernels: KernelConfig,
    caps: Capabilities,
    *,
    params_dtype: str,
    attention_dropout: float = 0.0,
    head_dims: tuple[int, ...] = (),
    context_parallel: bool = False,
    llm: LLMConfig | None = None,
) -> KernelChoice:
    """Resolve ``kernels`` against ``caps``; explicit requests the machine cannot honour raise.

    Args:
        kernels: the configured choice (``auto`` fields are decided here).
        caps: what the machine has (:func:`detect_capabilities`, or given by tests).
        params_dtype: ``fp32`` or ``bf16`` (flash kernels and grouped GEMM need bf16).
        attention_dropout: the largest attention dropout of the model (flex/varlen have none).
        head_dims: every q/k/v head dim of the model (flash takes at most 256).
        context_parallel: the LLM runs with ``parallel.cp > 1`` (``varlen`` has no CP path).
        llm: the LLM built with this choice (MoE and RoPE fusions depend on it); None: a
            vision tower alone, those are off.
    """
    reasons: list[str] = []
    # --- backend
    if kernels.backend == "te":
        if not caps.transformer_engine:
            raise ValueError(
                "model.kernels.backend=te but Transformer Engine is not usable here ("
                + ("no CUDA device" if not caps.cuda else "transformer_engine does not import")
                + "); use backend=auto or local")
        backend = "te"
        reasons.append("backend te: requested")
    elif kernels.backend == "local":
        backend = "local"
        reasons.append("backend local: requested")
    elif caps.transformer_engine:
        backend = "te"
        reasons.append("backend te: CUDA and Transformer Engine present")
    else:
        backend = "local"
        reasons.append("backend local: " + ("no CUDA device" if not caps.cuda
                                            else "Transformer Engine not importable"))
    # --- fp8
    if kernels.fp8 and backend != "te":
        raise ValueError("model.kernels.fp8=true needs the Transformer Engine backend, which is "
                         "not available here; set fp8=false")
    # --- attention kernel
    if backend == "te":
        if kernels.attention_kernel != "auto":
            raise ValueError(
                f"model.kernels.attention_kernel={kernels.attention_kernel} applies to the local "
                "backend only; with Transformer Engine leave it at auto (TE picks its kernel)")
        kernel = "te"
    else:
        extras = llm is not None and (llm.attention_sinks or llm.sliding_window is not None)
        kernel = _choose_local_kernel(kernels.attention_kernel, caps, params_dtype,
                                      attention_dropout, head_dims, reasons, context_parallel,
                                      extras)
    # --- routed experts
    experts = _choose_experts(kernels.moe_grouped_gemm, backend, caps, params_dtype, reasons)
    # --- fusions and overlaps
    fusions, fusion_reasons = choose_fusions(kernels, caps, llm, backend)
    return KernelChoice(backend=backend, attention_kernel=kernel,
                        moe_grouped_gemm=experts in ("te_grouped", "legacy_grouped"),
                        fp8=kernels.fp8, reasons=tuple(reasons + fusion_reasons),
                        experts=experts, **fusions)


def _local_kernel_problem(kernel: str, caps: Capabilities, params_dtype: str, dropout: float,
                          head_dims: tuple[int, ...], context_parallel: bool = False,
                          sinks_or_window: bool = False) -> str | None:
    """Why ``kernel`` cannot run here, or None when it can."""
    if kernel in ("sdpa_mask", "sdpa_doc"):
        return None
    if kernel == "varlen" and sinks_or_window:
        return "varlen has no attention sinks or sliding window (model.llm GPT-OSS options)"
    if kernel == "varlen" and context_parallel:
        return "varlen has no context-parallel path (parallel.cp > 1)"
    if kernel in ("flex", "varlen") and dropout > 0.0:
        return f"{kernel} has no attention dropout (attention_dropout={dropout})"
    if kernel == "flex":
        return None if caps.flex else "torch.nn.attention.flex_attention is missing"
    # varlen
    if not caps.cuda:
        return "varlen needs a CUDA device"
    if not caps.varlen:
        return f"torch {torch.__version__} has no torch.nn.attention.varlen"
    if params_dtype != "bf16":
        return "varlen (flash) needs bf16 parameters"
    if head_dims and max(head_dims) > _FLASH_MAX_HEAD_DIM:
        return f"varlen (flash) takes head dims <= {_FLASH_MAX_HEAD_DIM}, got {max(head_dims)}"
    return None


def _choose_local_kernel(requested: str, caps: Capabilities, params_dtype: str, dropout: float,
                         head_dims: tuple[int, ...], reasons: list[str],
                         context_parallel: bool = False, sinks_or_window: bool = False) -> str:
    if requested != "auto":
        problem = _local_kernel_problem(requested, caps, params_dtype, dropout, head_dims,
                                        context_parallel, sinks_or_window)
        if problem:
            raise ValueError(f"model.kernels.attention_kernel={requested}: {problem}; "
                             "choose another kernel or auto")
        reasons.append(f"attention {requested}: requested")
        return requested
    if not caps.cuda:
        reasons.append("attention sdpa_mask: CPU (dense block-diagonal mask, the reference)")
        return "sdpa_mask"
    skipped = []
    for kernel in ("varlen", "flex"):
        problem = _local_kernel_problem(kernel, caps, params_dtype, dropout, head_dims,
                                        context_parallel, sinks_or_window)
        if problem is None:
            reasons.append(f"attention {kernel}: fastest available"
                           + (f" ({'; '.join(skipped)})" if skipped else ""))
            return kernel
        skipped.append(problem)
    reasons.append(f"attention sdpa_doc: {'; '.join(skipped)}")
    return "sdpa_doc"


def _choose_experts(requested: str, backend: str, caps: Capabilities, params_dtype: str,
                    reasons: list[str]) -> str:
    if requested == "off":
        reasons.append("experts sequential: grouped GEMM off (requested)")
        return "sequential"
    if backend == "te":
        reasons.append("experts te_grouped: TEGroupedMLP")
        return "te_grouped"
    problems = []
    if params_dtype != "bf16":
        problems.append("grouped GEMMs run bf16 only")
    else:
        if caps.torch_grouped_mm:
            reasons.append("experts torch_grouped_mm: torch grouped_mm (no TE)")
            return "torch_grouped_mm"
        problems.append("torch grouped_mm needs CUDA compute capability >= 9.0")
        if caps.grouped_gemm:
            reasons.append("experts legacy_grouped: megatron GroupedMLP (grouped_gemm package)")
            return "legacy_grouped"
        problems.append("no Transformer Engine or grouped_gemm package")
    if requested == "on":
        raise ValueError(f"model.kernels.moe_grouped_gemm=on: {'; '.join(problems)}; set it to "
                         "auto or off")
    reasons.append(f"experts sequential: {'; '.join(problems)}")
    return "sequential"


_LOGGED: set[str] = set()


def resolve_kernels(kernels: KernelConfig | None, *, params_dtype: str,
                    attention_dropout: float = 0.0, head_dims: tuple[int, ...] = (),
                    caps: Capabilities | None = None,
                    context_parallel: bool = False,
                    llm: LLMConfig | None = None) -> KernelChoice:
    """:func:`choose_kernels` on this machine's capabilities; logs the choice once."""
    kernels = kernels or KernelConfig()
    caps = caps or detect_capabilities(kernels)
    choice = choose_kernels(kernels, caps, params_dtype=params_dtype,
                            attention_dropout=attention_dropout, head_dims=head_dims,
                            context_parallel=context_parallel, llm=llm)
    line = choice.describe()
    if line not in _LOGGED:
        _LOGGED.add(line)
        logger.info("layer implementations: %s", line)
    return choice


# --------------------------------------------------------------------------- module classes


def core_attention_module(choice: KernelChoice) -> type:
    """The ``core_attention`` class for ``choice``."""
    if choice.backend == "te":
        from megatron.core.extensions.transformer_engine import TEDotProductAttention

        return TEDotProductAttention
    from megatron_vlm.models.attention import PackedSelfAttention
    from megatron_vlm.models.packed_kernels import (
        DocumentSDPAAttention,
        FlexPackedAttention,
        VarlenPackedAttention,
    )

    return {"sdpa_mask": PackedSelfAttention, "sdpa_doc": DocumentSDPAAttention,
            "flex": FlexPackedAttention, "varlen": VarlenPackedAttention}[choice.attention_kernel]


def _local_llm_layer(layer_spec: ModuleSpec, core_attention: type,
                     latent_norm_eps: float) -> ModuleSpec:
    """megatron's local MLA/MoE layer with our core attention, TP-duplicated MLA down-projections,
    SP-capable norms (the latent ones at ``latent_norm_eps``) and padding-free router."""
    from megatron_vlm.models.linear import DuplicatedLinear
    from megatron_vlm.models.norm import LatentNorm, SequenceParallelNorm

    latent_norm = ModuleSpec(module=LatentNorm, params={"latent_eps": latent_norm_eps})
    sub = layer_spec.submodules
    attn = dataclasses.replace(
        sub.self_attention,
        submodules=dataclasses.replace(
            sub.self_attention.submodules,
            core_attention=core_attention,
            linear_q_down_proj=DuplicatedLinear,
            linear_kv_down_proj=DuplicatedLinear,
            q_layernorm=latent_norm,
            kv_layernorm=latent_norm,
        ),
    )
    new_sub = dataclasses.replace(
        sub, self_attention=attn, mlp=_padding_free_router(sub.mlp),
        input_layernorm=SequenceParallelNorm, pre_mlp_layernorm=SequenceParallelNorm,
    )
    return dataclasses.replace(layer_spec, submodules=new_sub)


def _te_llm_layer(layer_spec: ModuleSpec, latent_norm_eps: float) -> ModuleSpec:
    """megatron's TE MLA/MoE layer as is (TELinear down-projections, TEDotProductAttention) but
    for the latent norms -- fused into the up-projections -- at ``latent_norm_eps``, and the
    padding-free router."""
    from megatron.core.extensions.transformer_engine import TELayerNormColumnParallelLinear

    from megatron_vlm.models.norm import TELatentNormColumnParallelLinear

    sub = layer_spec.submodules
    attn = sub.self_attention.submodules
    for name in ("linear_q_up_proj", "linear_kv_up_proj"):
        if getattr(attn, name) is not TELayerNormColumnParallelLinear:
            raise RuntimeError(f"megatron's TE MLA spec has {name}={getattr(attn, name)!r}, "
                               "expected TELayerNormColumnParallelLinear (latent norm fused)")
    up_proj = ModuleSpec(module=TELatentNormColumnParallelLinear,
                         params={"latent_eps": latent_norm_eps})
    attn = dataclasses.replace(sub.self_attention, submodules=dataclasses.replace(
        attn, linear_q_up_proj=up_proj, linear_kv_up_proj=up_proj))
    return dataclasses.replace(layer_spec, submodules=dataclasses.replace(
        sub, self_attention=attn, mlp=_padding_free_router(sub.mlp)))


def _local_gqa_layer(layer_spec: ModuleSpec, core_attention: type) -> ModuleSpec:
    """megatron's local GQA layer (``SelfAttention``: fused ``linear_qkv`` interleaved per query
    group, optional per-head q/k norms) with our core attention, SP-capable norms (the q/k norms
    too: megatron's ``WrappedTorchNorm`` refuses sequence parallelism; their gradients are
    summed over TP by ``finalize_model_grads`` by name) and the padding-free router."""
    from megatron.core.transformer.identity_op import IdentityOp

    from megatron_vlm.models.norm import SequenceParallelNorm

    sub = layer_spec.submodules
    attn_sub = sub.self_attention.submodules
    qk_norm = {name: (IdentityOp if getattr(attn_sub, name) in (None, IdentityOp)
                      else SequenceParallelNorm) for name in ("q_layernorm", "k_layernorm")}
    attn = dataclasses.replace(sub.self_attention, submodules=dataclasses.replace(
        attn_sub, core_attention=core_attention, **qk_norm))
    new_sub = dataclasses.replace(
        sub, self_attention=attn, mlp=_padding_free_router(sub.mlp),
        input_layernorm=SequenceParallelNorm, pre_mlp_layernorm=SequenceParallelNorm,
    )
    return dataclasses.replace(layer_spec, submodules=new_sub)


def _padding_free_router(mlp):
    from megatron_vlm.models.router import PaddingFreeTopKRouter

    if hasattr(mlp, "submodules") and hasattr(mlp.submodules, "router"):
        return dataclasses.replace(
            mlp, submodules=dataclasses.replace(mlp.submodules, router=PaddingFreeTopKRouter))
    return mlp


def _te_gqa_layer(layer_spec: ModuleSpec) -> ModuleSpec:
    """megatron's TE GQA layer as is (input norm fused into ``linear_qkv``, ``TENorm`` q/k
    norms, ``TEDotProductAttention``) with the padding-free router."""
    sub = layer_spec.submodules
    return dataclasses.replace(layer_spec, submodules=dataclasses.replace(
        sub, mlp=_padding_free_router(sub.mlp)))


def _torch_grouped_experts(layer_spec: ModuleSpec) -> ModuleSpec:
    """Routed experts as :class:`~megatron_vlm.models.experts.GroupedMMSequentialMLP` (same
    parameters as megatron's ``SequentialMLP``)."""
    from megatron.core.transformer.moe.experts import SequentialMLP

    from megatron_vlm.models.experts import GroupedMMSequentialMLP

    mlp = layer_spec.submodules.mlp
    experts = getattr(getattr(mlp, "submodules", None), "experts", None)
    if experts is None or experts.module is not SequentialMLP:
        return layer_spec
    mlp = dataclasses.replace(mlp, submodules=dataclasses.replace(
        mlp.submodules, experts=dataclasses.replace(experts, module=GroupedMMSequentialMLP)))
    return dataclasses.replace(
        layer_spec, submodules=dataclasses.replace(layer_spec.submodules, mlp=mlp))


def _expert_bias_fc2(layer_spec: ModuleSpec) -> ModuleSpec:
    """Routed experts with biases (GPT-OSS): ``linear_fc2`` as
    :class:`~megatron_vlm.models.experts.ExpertBiasRowParallelLinear` (megatron adds the bias in
    place to an output autograd may not modify at TP = EP = 1)."""
    from megatron.core.transformer.moe.experts import SequentialMLP

    from megatron_vlm.models.experts import ExpertBiasRowParallelLinear

    mlp = layer_spec.submodules.mlp
    experts = getattr(getattr(mlp, "submodules", None), "experts", None)
    if experts is None or experts.module is not SequentialMLP or experts.submodules is None:
        return layer_spec
    experts = dataclasses.replace(experts, submodules=dataclasses.replace(
        experts.submodules, linear_fc2=ExpertBiasRowParallelLinear))
    mlp = dataclasses.replace(mlp, submodules=dataclasses.replace(mlp.submodules,
                                                                 experts=experts))
    return dataclasses.replace(
        layer_spec, submodules=dataclasses.replace(layer_spec.submodules, mlp=mlp))


def _require_mla_duplicated_linear() -> None:
    """The local spec's MLA down-projections are ``DuplicatedLinear``, which megatron-core 0.16.1
    MLA accepts only once the start-up shims rebound its ``Linear`` name
    (``parallel/cpu_shims.py``, installed by ``init_distributed`` without Transformer Engine)."""
    from megatron.core.transformer import multi_latent_attention as mla

    from megatron_vlm.models.linear import DuplicatedLinear

    if mla.Linear is not DuplicatedLinear:
        raise RuntimeError(
            "the local MLA spec needs the start-up shims (megatron's MLA must accept "
            "DuplicatedLinear): call megatron_vlm.parallel.init.init_distributed (or "
            "megatron_vlm.parallel.cpu_shims.apply_cpu_shims) before building the model; with "
            "Transformer Engine installed use model.kernels.backend=te")


def _norm_module(choice: KernelChoice) -> type:
    """The LLM's standalone norm class for ``choice`` (TE's ``TENorm`` or our SP-aware norm)."""
    if choice.backend == "te":
        from megatron.core.extensions.transformer_engine import TENorm

        return TENorm
    from megatron_vlm.models.norm import SequenceParallelNorm

    return SequenceParallelNorm


def llm_decoder_block_spec(config, choice: KernelChoice, vp_stage: int | None = None,
                           pp_rank: int | None = None, *, latent_norm_eps: float,
                           sandwich_norms: bool = False) -> TransformerBlockSubmodules:
    """The LLM decoder block spec of this pipeline stage for ``choice``; MLA's latent norms at
    ``latent_norm_eps`` (``model.llm.mla_latent_norm_epsilon``), every other norm at
    ``config.layernorm_epsilon``. ``config.multi_latent_attention`` picks MLA or GQA layers
    (megatron's ``SelfAttention``: TE's fused norm + ``linear_qkv`` and ``TENorm`` q/k norms,
    or the local modules with our packed core attention). ``sandwich_norms``
    (``model.llm.sandwich_norms``): every layer gets GLM-4.1V's post-attention and post-MLP norms
    (``models/sandwich.py``)."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    te = choice.backend == "te"
    mla = config.multi_latent_attention
    block = get_gpt_decoder_block_spec(config, use_transformer_engine=te,
                                       normalization="RMSNorm", vp_stage=vp_stage,
                                       pp_rank=pp_rank)
    if te:
        if mla:
            block.layer_specs = [_te_llm_layer(s, latent_norm_eps) for s in block.layer_specs]
        else:
            block.layer_specs = [_te_gqa_layer(s) for s in block.layer_specs]
    else:
        attention = core_attention_module(choice)
        if mla:
            _require_mla_duplicated_linear()
            block.layer_specs = [_local_llm_layer(s, attention, latent_norm_eps)
                                 for s in block.layer_specs]
        else:
            block.layer_specs = [_local_gqa_layer(s, attention) for s in block.layer_specs]
        if config.add_bias_linear:
            block.layer_specs = [_expert_bias_fc2(s) for s in block.layer_specs]
        if choice.experts == "torch_grouped_mm":
            block.layer_specs = [_torch_grouped_experts(s) for s in block.layer_specs]
        block.layer_norm = _norm_module(choice)
    if sandwich_norms:
        from megatron_vlm.models.sandwich import with_sandwich_norms

        block.layer_specs = [with_sandwich_norms(s, _norm_module(choice))
                             for s in block.layer_specs]
    return block


def llm_mtp_block_spec(config, block: TransformerBlockSubmodules, choice: KernelChoice,
                       vp_stage: int | None = None, pp_rank: int | None = None):
    """megatron's multi-token-prediction block spec (``config.mtp_num_layers`` layers, each a
    copy of ``block``'s last layer spec with megatron's ``enorm``/``hnorm``/``eh_proj`` and final
    norm), or None without MTP or when this stage holds none. Local backend: the MTP norms are
    our SP-aware norms (megatron's local ``WrappedTorchNorm`` refuses sequence parallelism)."""
    if not config.mtp_num_layers:
        return None
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_mtp_block_spec

    te = choice.backend == "te"
    spec = get_gpt_mtp_block_spec(config, block, use_transformer_engine=te,
                                  vp_stage=vp_stage, pp_rank=pp_rank)
    if spec is None or te:
        return spec
    norm = _norm_module(choice)
    spec.layer_specs = [
        dataclasses.replace(layer, submodules=dataclasses.replace(
            layer.submodules, enorm=norm, hnorm=norm, layer_norm=norm))
        for layer in spec.layer_specs]
    return spec


@dataclass(frozen=True)
class VitModules:
    """Module classes of one ViT layer (pre-LN, biased linears, MLP) and the final norm."""

    input_layernorm: type
    linear_qkv: type
    core_attention: type
    linear_proj: type
    pre_mlp_layernorm: type
    linear_fc1: type
    linear_fc2: type
    final_norm: type


def vit_modules(choice: KernelChoice) -> VitModules:
    """ViT layer modules for ``choice``.

    TE: megatron's standard TE ViT layer -- both LayerNorms fused into the next linear
    (``linear_qkv.layer_norm_*``, ``linear_fc1.layer_norm_*``; the names the conversion tables
    give for TE, ``convert/tables.py``), TE attention, ``TENorm`` as the final norm. Local:
    SP-capable norms, megatron's parallel linears, our packed attention kernel.
    """
    from megatron.core.transformer.identity_op import IdentityOp

    if choice.backend == "te":
        from megatron.core.extensions.transformer_engine import (
            TELayerNormColumnParallelLinear,
            TENorm,
            TERowParallelLinear,
        )

        return VitModules(input_layernorm=IdentityOp, linear_qkv=TELayerNormColumnParallelLinear,
                          core_attention=core_attention_module(choice),
                          linear_proj=TERowParallelLinear, pre_mlp_layernorm=IdentityOp,
                          linear_fc1=TELayerNormColumnParallelLinear,
                          linear_fc2=TERowParallelLinear, final_norm=TENorm)
    from megatron.core.tensor_parallel.layers import ColumnParallelLinear, RowParallelLinear

    from megatron_vlm.models.norm import SequenceParallelNorm

    return VitModules(input_layernorm=SequenceParallelNorm, linear_qkv=ColumnParallelLinear,
                      core_attention=core_attention_module(choice), linear_proj=RowParallelLinear,
                      pre_mlp_layernorm=SequenceParallelNorm, linear_fc1=ColumnParallelLinear,
                      linear_fc2=RowParallelLinear, final_norm=SequenceParallelNorm)
