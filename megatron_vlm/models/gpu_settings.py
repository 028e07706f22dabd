"""GPU settings decided by capability: kernel fusions and communication overlaps.

Each setting is a typed config field, ``None`` = by capability: the fusions are
``model.kernels.*`` (:class:`~megatron_vlm.config.model.KernelConfig`), resolved with the layer
implementations by :func:`~megatron_vlm.models.specs.choose_kernels` (which calls
:func:`choose_fusions`) into the :class:`~megatron_vlm.models.specs.KernelChoice` the model is
built with; the DDP settings are ``parallel.overlap_grad_reduce`` / ``overlap_param_gather`` /
``ddp_bucket_size``, resolved by :func:`choose_ddp` for ``training/model_setup.py``.

The rules follow megatron-core 0.16.1, and the same three outcomes hold for every field:

* ``None``: on when nothing stands in the way, else off with the reason. Without CUDA every
  setting is off, so no CPU result can change.
* ``True``: on, or a ``ValueError`` at start-up naming the field and what stands in the way.
* ``False``: off.

Both functions are pure (capabilities are passed in; tests give them as values).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from megatron_vlm.config.model import KernelConfig, LLMConfig
    from megatron_vlm.config.parallel import ParallelConfig
    from megatron_vlm.models.specs import Capabilities

#: ``model.kernels`` fields resolved here, in the order they are reported; each is the
#: megatron ``TransformerConfig`` field of the same name.
FUSION_FIELDS = ("bias_activation_fusion", "apply_rope_fusion", "masked_softmax_fusion",
                 "gradient_accumulation_fusion", "moe_permute_fusion",
                 "moe_shared_expert_overlap")

_SHORT = {"bias_activation_fusion": "bias_act", "apply_rope_fusion": "rope",
          "masked_softmax_fusion": "softmax", "gradient_accumulation_fusion": "grad_accum",
          "moe_permute_fusion": "permute", "moe_shared_expert_overlap": "shared_expert_overlap"}


def short_names(fields: dict[str, bool]) -> str:
    """The fields that are on, short names joined by commas (``none`` when none)."""
    on = [_SHORT[name] for name in FUSION_FIELDS if fields.get(name)]
    return ",".join(on) or "none"


def _resolve(key: str, requested: bool | None, blocker: str | None, default_on: bool,
             why_on: str, why_off: str = "") -> tuple[bool, str]:
    """One setting: (value, reason line). ``blocker``: why it cannot run here, or None;
    ``default_on``: what ``None`` gives when nothing blocks it (``why_on`` / ``why_off``)."""
    name = key.rsplit(".", 1)[1]
    if requested is False:
        return False, f"{name} off: requested"
    if requested is True:
        if blocker:
            raise ValueError(f"{key}=true: {blocker}; set it to null (by capability) or false")
        return True, f"{name} on: requested"
    if blocker:
        return False, f"{name} off: {blocker}"
    if default_on:
        return True, f"{name} on: {why_on}"
    return False, f"{name} off: {why_off}"


def _first(*checks: tuple[bool, str]) -> str | None:
    """The message of the first failing check (``(ok, message)`` pairs), or None."""
    return next((msg for ok, msg in checks if not ok), None)


def choose_fusions(kernels: KernelConfig, caps: Capabilities, llm: LLMConfig | None,
                   backend: str) -> tuple[dict[str, bool], list[str]]:
    """Resolve the ``model.kernels`` fusion fields for ``llm`` on ``caps``.

    Args:
        kernels: the configured fields (``None`` = by capability).
        caps: what the machine has.
        llm: the LLM the choice builds; None (a vision tower alone): the LLM-only settings
            (MoE, MLA RoPE) are off.
        backend: the chosen layer backend (``te`` or ``local``), for the reasons.

    Returns:
        ``{field: value}`` for every :data:`FUSION_FIELDS` entry, and one reason line each.
    """
    cuda = (caps.cuda, "needs a CUDA device")
    triton = (caps.triton, "needs Triton (not importable)")
    moe = llm is not None and llm.num_experts is not None
    te_state = ("not checked with model.kernels.backend=local" if kernels.backend == "local"
                else "its fused permute is missing" if caps.transformer_engine
                else "not usable here")
    rules = {
        # megatron MLP.forward (mlp.py:171) -> bias_swiglu_impl, a torch.compile'd function
        # (megatron/core/jit.py); our LLM is SwiGLU everywhere.
        "bias_activation_fusion": (
            _first(cuda, triton), True,
            "fused SwiGLU (megatron bias_swiglu_impl) in dense MLPs and shared/routed experts",
            ""),
        # MLASelfAttention (multi_latent_attention.py:553,747) -> fused_mla_yarn_rope_apply
        # (Triton); MLATransformerConfig refuses it without YaRN (transformer_config.py:2068).
        "apply_rope_fusion": (
            _first((llm is not None, "applies to the LLM's MLA only"),
                   (llm is not None and llm.yarn.enabled,
                    "megatron fuses MLA RoPE for YaRN only (model.llm.yarn.factor = 1)"),
                   cuda, triton), False, "",
            "experimental in megatron-core 0.16.1 (it warns so) and its bf16 cos/sin cache is "
            "unverified against the unfused RoPE; set true to use it"),
        # Only megatron's DotProductAttention builds FusedScaleMaskSoftmax
        # (dot_product_attention.py:104); specs.py never picks that class.
        "masked_softmax_fusion": (
            f"our attention kernels and TE's (backend {backend}) never call megatron's "
            "FusedScaleMaskSoftmax, so it would do nothing",
            False, "", ""),
        # TE linears fuse into main_grad themselves; GPTModel's output layer is always
        # megatron's ColumnParallelLinear, which needs Apex (tensor_parallel/layers.py:924).
        "gradient_accumulation_fusion": (
            _first(cuda, (caps.apex_grad_accum,
                          "needs Apex's fused_weight_gradient_mlp_cuda (the output layer is "
                          "megatron's ColumnParallelLinear in every spec, gpt_model.py:241)")),
            True, "weight gradients accumulated into the fp32 main_grad by the GEMM", ""),
        # token_dispatcher.py -> moe_utils.fused_permute* (TE >= 2.1; transformer_config.py:1834)
        "moe_permute_fusion": (
            _first((moe, "dense model (no MoE)"), cuda,
                   (caps.te_fused_permute, f"needs Transformer Engine >= 2.1 ({te_state})")),
            True, "TE fused token permute/unpermute in the dispatcher", ""),
        # shared_experts.py:122 (a side torch.cuda.Stream); transformer_config.py:1090 (alltoall
        # only) and :1233 (not with shared_experts recompute).
        "moe_shared_expert_overlap": (
            _first((moe and llm.num_shared_experts > 0, "no shared experts"),
                   (not moe or llm.moe_token_dispatcher == "alltoall",
                    "megatron overlaps shared experts with the alltoall dispatcher only "
                    "(model.llm.moe_token_dispatcher)"),
                   (not moe or not (llm.recompute == "selective"
                                    and "shared_experts" in llm.recompute_modules),
                    "megatron cannot recompute shared_experts with it "
                    "(model.llm.recompute_modules)"),
                   cuda),
            True, "shared experts on a side CUDA stream during token dispatch", ""),
    }
    values, reasons = {}, []
    for name in FUSION_FIELDS:
        blocker, default_on, why_on, why_off = rules[name]
        values[name], reason = _resolve(f"model.kernels.{name}", getattr(kernels, name),
                                        blocker, default_on, why_on, why_off)
        reasons.append(reason)
    return values, reasons


@dataclass(frozen=True)
class DDPChoice:
    """megatron ``DistributedDataParallelConfig`` settings decided for this run, and why."""

    use_distributed_optimizer: bool
    """Gradients reduce-scattered into megatron's DistributedOptimizer shards (else
    all-reduced whole)."""
    overlap_grad_reduce: bool
    """Bucketed gradient reduce overlapped with backward."""
    overlap_param_gather: bool
    """Parameter all-gather deferred to the next forward."""
    bucket_size: int | None
    """Parameters per bucket; None = megatron's default (or one bucket without overlap)."""
    reasons: tuple[str, ...] = ()
    """One line per setting."""

    def describe(self) -> str:
        onoff = {True: "on", False: "off"}
        return (f"distributed_optimizer={onoff[self.use_distributed_optimizer]} "
                f"overlap_grad_reduce={onoff[self.overlap_grad_reduce]} "
                f"overlap_param_gather={onoff[self.overlap_param_gather]} "
                f"bucket_size={self.bucket_size or 'default'} ({'; '.join(self.reasons)})")


def choose_ddp(parallel: ParallelConfig, caps: Capabilities, *, muon: bool,
               tower_trainable: bool) -> DDPChoice:
    """Resolve ``parallel``'s DDP settings on ``caps``.

    Args:
        parallel: ``use_distributed_optimizer``, ``overlap_grad_reduce``,
            ``overlap_param_gather`` and ``ddp_bucket_size``.
        caps: what the machine has.
        muon: the optimizer is Muon (``optim.optimizer=muon``): its layer-wise sharding needs
            whole reduced gradients, so DDP all-reduces (SPEC §2, Megatron-LM #2164).
        tower_trainable: a VLM whose vision tower or projector trains: a text-only micro-batch
            gives them no gradient.
    """
    cuda = (caps.cuda, "needs a CUDA device (it hides NCCL communication behind GPU compute)")
    reasons = []
    distopt = parallel.use_distributed_optimizer and not muon
    if parallel.use_distributed_optimizer and muon:
        reasons.append("distributed_optimizer off in DDP: Muon shards whole layers itself and "
                       "needs whole reduced gradients")
    grad_reduce, why = _resolve(
        "parallel.overlap_grad_reduce", parallel.overlap_grad_reduce,
        _first(cuda, (not tower_trainable,
                      "a trainable vision tower/projector gets no gradient in a text-only "
                      "micro-batch, and megatron-core 0.16.1 launches the overlapped reduce "
                      "only when every parameter's gradient arrived as in the first step "
                      "(param_and_grad_buffer.py:559; else it fails at :531); freeze "
                      "them or leave this off")),
        True, "bucketed reduce during the last micro-batch's backward")
    reasons.append(why)
    # megatron's DistributedOptimizer.step skips the gather then (distrib_optimizer.py:2617) and
    # DDP's forward pre-hooks gather lazily; Megatron-LM forces the gather before each save
    # (disable_forward_pre_hook(param_sync=True)); our saver (checkpoint/) does not yet.
    param_gather, why = _resolve(
        "parallel.overlap_param_gather", parallel.overlap_param_gather,
        _first(cuda, (distopt, "needs megatron's DistributedOptimizer "
                               "(parallel.use_distributed_optimizer=true with AdamW)"),
               (False, "checkpoint saves would write other ranks' stale parameter slices: "
                       "the saver does not force the deferred all-gather first")),
        True, "")
    reasons.append(why)
    bucket = parallel.ddp_bucket_size
    if bucket is not None and not grad_reduce:
        reasons.append(f"ddp_bucket_size={bucket} unused: no overlapped reduce (one bucket)")
    return DDPChoice(use_distributed_optimizer=distopt, overlap_grad_reduce=grad_reduce,
                     overlap_param_gather=param_gather,
                     bucket_size=bucket if grad_reduce else None, reasons=tuple(reasons))
