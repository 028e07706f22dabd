"""GPU settings from config (models/gpu_settings.py): kernel fusions and DDP overlaps.

Capabilities are given as values (what a machine with or without CUDA / Triton / Transformer
Engine / Apex would report); the expected settings are written out per case from megatron-core
0.16.1's rules. Nothing here runs a GPU kernel: the built megatron configs are checked field by
field, and on this CPU machine the real resolution must leave everything off.
"""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch

from megatron_vlm.config import ParallelConfig
from megatron_vlm.config.model import KernelConfig
from megatron_vlm.models.gpu_settings import FUSION_FIELDS, choose_ddp
from megatron_vlm.models.specs import Capabilities, KernelChoice, choose_kernels
from megatron_vlm.recipes import get_recipe
from megatron_vlm.recipes.kimi import SELECTIVE, kimi_k25_llm
from megatron_vlm.recipes.tiny import tiny_llm

CPU = Capabilities(cuda=False, transformer_engine=False, varlen=True, flex=True,
                   grouped_gemm=False)
# An H100 with torch (Triton included) but neither Transformer Engine nor Apex.
GPU_NO_TE = Capabilities(cuda=True, transformer_engine=False, varlen=True, flex=True,
                         grouped_gemm=False, torch_grouped_mm=True, triton=True)
GPU_NO_TRITON = dataclasses.replace(GPU_NO_TE, triton=False)
GPU_APEX = dataclasses.replace(GPU_NO_TE, apex_grad_accum=True)
TE_NO_APEX = dataclasses.replace(GPU_NO_TE, transformer_engine=True, te_fused_permute=True)
NGC = dataclasses.replace(TE_NO_APEX, grouped_gemm=True, apex_grad_accum=True)

K25 = kimi_k25_llm()  # MoE, 1 shared expert, alltoall, YaRN x64
OFF = dict.fromkeys(FUSION_FIELDS, False)


def fusions(caps, llm=K25, **kernels):
    return choose_kernels(KernelConfig(**kernels), caps, params_dtype="bf16", llm=llm)


# --------------------------------------------------------------------------- kernel fusions


@pytest.mark.parametrize("caps,on", [
    (CPU, set()),
    (GPU_NO_TE, {"bias_activation_fusion", "moe_shared_expert_overlap"}),
    (GPU_NO_TRITON, {"moe_shared_expert_overlap"}),
    (GPU_APEX, {"bias_activation_fusion", "gradient_accumulation_fusion",
                "moe_shared_expert_overlap"}),
    # TE without Apex: the output layer (megatron's ColumnParallelLinear) would refuse the flag.
    (TE_NO_APEX, {"bias_activation_fusion", "moe_permute_fusion", "moe_shared_expert_overlap"}),
    (NGC, {"bias_activation_fusion", "gradient_accumulation_fusion", "moe_permute_fusion",
           "moe_shared_expert_overlap"}),
], ids=["cpu", "cuda-no-te", "cuda-no-triton", "cuda-apex", "te-no-apex", "te-apex"])
def test_fusions_by_capability(caps, on):
    choice = fusions(caps)
    assert choice.fusions == {name: name in on for name in FUSION_FIELDS}
    # one reason line per fusion, in order, saying on/off and why
    lines = choice.reasons[-len(FUSION_FIELDS):]
    assert [line.split()[:2] for line in lines] == [
        [name, "on:" if name in on else "off:"] for name in FUSION_FIELDS]


def test_describe_lists_the_fusions_that_are_on():
    assert " fused=none " in fusions(CPU).describe()
    assert " fused=bias_act,grad_accum,permute,shared_expert_overlap " in fusions(NGC).describe()
    assert "no CUDA device" in fusions(CPU).describe()  # the layer reasons are still there


def test_off_by_default_even_where_possible():
    """RoPE fusion (experimental in megatron) and masked softmax (unused) stay off on NGC."""
    choice = fusions(NGC)
    assert not choice.apply_rope_fusion and not choice.masked_softmax_fusion
    assert any(r.startswith("apply_rope_fusion off: experimental") for r in choice.reasons)
    assert any(r.startswith("masked_softmax_fusion off:") and "FusedScaleMaskSoftmax" in r
               for r in choice.reasons)


@pytest.mark.parametrize("llm,off,why", [
    (dataclasses.replace(K25, num_experts=None), {"moe_permute_fusion",
                                                  "moe_shared_expert_overlap"}, "dense model"),
    (dataclasses.replace(K25, num_shared_experts=0), {"moe_shared_expert_overlap"},
     "no shared experts"),
    (dataclasses.replace(K25, moe_token_dispatcher="allgather"), {"moe_shared_expert_overlap"},
     "alltoall"),
    (dataclasses.replace(K25, recompute="selective", recompute_modules=["shared_experts"]),
     {"moe_shared_expert_overlap"}, "recompute shared_experts"),
    (None, {"moe_permute_fusion", "moe_shared_expert_overlap"}, "dense model"),
], ids=["dense", "no-shared", "allgather", "shared-recompute", "tower-only"])
def test_model_structure_turns_moe_settings_off(llm, off, why):
    choice = fusions(NGC, llm)
    expected = fusions(NGC).fusions | dict.fromkeys(off, False)
    assert choice.fusions == expected
    assert any(why in r for r in choice.reasons if r.split()[0] in off)


def test_explicit_values_are_honoured():
    yarn = fusions(NGC, apply_rope_fusion=True)
    assert yarn.apply_rope_fusion and "apply_rope_fusion on: requested" in yarn.reasons
    none = fusions(NGC, **dict.fromkeys(FUSION_FIELDS, False))
    assert none.fusions == OFF
    assert fusions(CPU, **dict.fromkeys(FUSION_FIELDS, False)).fusions == OFF
    assert fusions(GPU_NO_TE, bias_activation_fusion=True).bias_activation_fusion


@pytest.mark.parametrize("caps,llm,field,why", [
    (CPU, K25, "bias_activation_fusion", "needs a CUDA device"),
    (GPU_NO_TRITON, K25, "bias_activation_fusion", "needs Triton"),
    (CPU, K25, "apply_rope_fusion", "needs a CUDA device"),
    (GPU_NO_TRITON, K25, "apply_rope_fusion", "needs Triton"),
    (NGC, tiny_llm(), "apply_rope_fusion", "YaRN only"),  # plain RoPE
    (NGC, K25, "masked_softmax_fusion", "would do nothing"),
    (CPU, K25, "gradient_accumulation_fusion", "needs a CUDA device"),
    (TE_NO_APEX, K25, "gradient_accumulation_fusion", "fused_weight_gradient_mlp_cuda"),
    (GPU_NO_TE, K25, "moe_permute_fusion", "Transformer Engine >= 2.1"),
    (NGC, dataclasses.replace(K25, num_experts=None), "moe_permute_fusion", "dense model"),
    (CPU, K25, "moe_shared_expert_overlap", "needs a CUDA device"),
    (NGC, dataclasses.replace(K25, moe_token_dispatcher="allgather"),
     "moe_shared_expert_overlap", "alltoall dispatcher only"),
])
def test_explicit_true_that_cannot_run_is_refused(caps, llm, field, why):
    with pytest.raises(ValueError, match=f"model.kernels.{field}=true: .*{why}"):
        fusions(caps, llm, **{field: True})


# --------------------------------------------------------------------------- DDP settings


def ddp(caps, muon=False, tower=False, **par):
    return choose_ddp(ParallelConfig(**par), caps, muon=muon, tower_trainable=tower)


@pytest.mark.parametrize("caps,muon,tower,distopt,expected", [
    (CPU, False, False, True, (True, False, False)),
    (NGC, False, False, True, (True, True, False)),
    (NGC, False, False, False, (False, True, False)),
    (NGC, True, False, True, (False, True, False)),   # Muon: DDP all-reduces whole gradients
    (NGC, True, True, True, (False, False, False)),   # VLM with a trainable tower
], ids=["cpu", "cuda-adamw-distopt", "cuda-adamw", "cuda-muon", "cuda-vlm"])
def test_ddp_by_capability(caps, muon, tower, distopt, expected):
    c = ddp(caps, muon, tower, use_distributed_optimizer=distopt)
    assert (c.use_distributed_optimizer, c.overlap_grad_reduce, c.overlap_param_gather) == expected
    assert c.bucket_size is None
    assert [r.split()[0] for r in c.reasons if r.startswith("overlap")] == [
        "overlap_grad_reduce", "overlap_param_gather"]
    if tower and caps.cuda:
        assert any("text-only micro-batch" in r for r in c.reasons)
    if distopt and not muon and caps.cuda:
        assert any("stale parameter slices" in r for r in c.reasons)


def test_ddp_bucket_size():
    assert ddp(NGC, ddp_bucket_size=1234).bucket_size == 1234
    off = ddp(CPU, ddp_bucket_size=1234)
    assert off.bucket_size is None and any("unused" in r for r in off.reasons)
    assert ddp(NGC, overlap_grad_reduce=False, ddp_bucket_size=1234).bucket_size is None
    with pytest.raises(ValueError, match="parallel.ddp_bucket_size=0 must be >= 1"):
        ParallelConfig(ddp_bucket_size=0)


@pytest.mark.parametrize("caps,tower,par,why", [
    (CPU, False, {"overlap_grad_reduce": True}, "overlap_grad_reduce=true: needs a CUDA"),
    (NGC, True, {"overlap_grad_reduce": True}, "overlap_grad_reduce=true: .*text-only"),
    (NGC, False, {"overlap_param_gather": True}, "overlap_param_gather=true: .*Distributed"),
    (NGC, False, {"overlap_param_gather": True, "use_distributed_optimizer": True},
     "overlap_param_gather=true: .*stale"),
])
def test_ddp_explicit_true_that_cannot_run_is_refused(caps, tower, par, why):
    with pytest.raises(ValueError, match=f"parallel.{why}"):
        ddp(caps, tower=tower, **par)


def test_ddp_config_carries_the_choice():
    from megatron_vlm.training.model_setup import ddp_config

    c = ddp(NGC, use_distributed_optimizer=True, ddp_bucket_size=5_000_000)
    cfg = ddp_config(c)
    assert (cfg.overlap_grad_reduce, cfg.overlap_param_gather, cfg.use_distributed_optimizer,
            cfg.bucket_size) == (True, False, True, 5_000_000)
    assert cfg.grad_reduce_in_fp32 and not cfg.check_for_nan_in_grad
    muon = ddp_config(ddp(CPU, muon=True, use_distributed_optimizer=True))
    assert (muon.overlap_grad_reduce, muon.use_distributed_optimizer, muon.bucket_size) == (
        False, False, None)


# --------------------------------------------------------------------------- megatron configs


_MEGATRON_FIELDS = ("bias_activation_fusion", "apply_rope_fusion", "masked_softmax_fusion",
                    "gradient_accumulation_fusion", "moe_permute_fusion",
                    "moe_shared_expert_overlap")


def _config(llm, choice):
    from megatron_vlm.models.llm import build_transformer_config

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # megatron: "apply_rope_fusion ... experimental"
        return build_transformer_config(llm, ParallelConfig(), "bf16", choice)


def test_transformer_config_carries_the_fusions():
    choice = fusions(GPU_APEX, apply_rope_fusion=True)
    config = _config(K25, choice)
    assert {f: getattr(config, f) for f in _MEGATRON_FIELDS} == {
        "bias_activation_fusion": True, "apply_rope_fusion": True,
        "masked_softmax_fusion": False, "gradient_accumulation_fusion": True,
        "moe_permute_fusion": False, "moe_shared_expert_overlap": True}
    # moe_permute_fusion reaches megatron too: its config refuses it without TE's kernels
    # (an ImportError of fused_permute without TE at all; a ValueError below TE 2.1).
    with pytest.raises((ImportError, ValueError), match=r"fused[_ ]permut"):
        _config(K25, fusions(NGC))


def test_vision_config_takes_only_gradient_accumulation_fusion():
    from megatron_vlm.config.vision import moonvit_config
    from megatron_vlm.models.vision.moonvit import build_vision_transformer_config

    config = build_vision_transformer_config(moonvit_config(), ParallelConfig(), "bf16",
                                             fusions(NGC))
    assert config.gradient_accumulation_fusion
    assert not (config.bias_activation_fusion or config.apply_rope_fusion
                or config.masked_softmax_fusion)
    assert not build_vision_transformer_config(moonvit_config(), ParallelConfig(),
                                               "bf16").gradient_accumulation_fusion


@pytest.mark.skipif(torch.cuda.is_available(), reason="the CPU path's settings")
@pytest.mark.parametrize("recipe", ["tiny_cpu", "tiny_text_cpu"])
def test_cpu_resolves_every_setting_off(recipe):
    """On this machine the tiny recipes build exactly the configs of before (all False)."""
    from megatron_vlm.models.llm import build_transformer_config
    from megatron_vlm.models.vlm import kernel_choice
    from megatron_vlm.training.model_setup import ddp_choice

    job = get_recipe(recipe)
    choice = kernel_choice(job.model, job.parallel)
    assert choice.fusions == OFF
    config = build_transformer_config(job.model.llm, job.parallel, job.model.params_dtype,
                                      choice)
    assert not any(getattr(config, f) for f in _MEGATRON_FIELDS)
    d = ddp_choice(job)
    assert not (d.overlap_grad_reduce or d.overlap_param_gather) and d.bucket_size is None


# --------------------------------------------------------------------------- moe_act recompute


def test_moe_act_recompute_follows_the_experts():
    """K2.5's selective recompute (mla_up_proj, moe_act, layernorm) builds with torch grouped
    experts (their backward recomputes the SwiGLU: moe_act dropped), keeps moe_act for TE's
    grouped GEMM, and is refused by name for megatron's per-expert loop."""
    llm = get_recipe("kimi_k25").model.llm
    assert llm.recompute == "selective" and llm.recompute_modules == SELECTIVE
    torch_grouped = fusions(GPU_NO_TE, llm)  # a CUDA machine without TE
    assert torch_grouped.experts == "torch_grouped_mm" and not torch_grouped.moe_grouped_gemm
    assert _config(llm, torch_grouped).recompute_modules == ["mla_up_proj", "layernorm"]
    te = KernelChoice(backend="te", attention_kernel="te", moe_grouped_gemm=True, fp8=False,
                      experts="te_grouped")
    assert _config(llm, te).recompute_modules == SELECTIVE
    sequential = fusions(CPU, llm)
    assert sequential.experts == "sequential"
    with pytest.raises(ValueError, match="model.llm.recompute_modules has moe_act.*sequential"):
        _config(llm, sequential)
