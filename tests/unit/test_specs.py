"""Layer-implementation choice (models/specs.py) for every capability combination.

Capabilities are passed in as values (what a machine with or without CUDA / Transformer Engine /
varlen / grouped_gemm would report); the expected choices are written out per case.
"""

from __future__ import annotations

import dataclasses
import sys

import pytest
import torch

from megatron_vlm.config import JobConfig, apply_overrides
from megatron_vlm.config.model import KernelConfig
from megatron_vlm.models.specs import (
    Capabilities,
    choose_kernels,
    core_attention_module,
    detect_capabilities,
)

CPU = Capabilities(cuda=False, transformer_engine=False, varlen=True, flex=True,
                   grouped_gemm=False)
# The lent GPU machine (SPEC §12): an H100 (sm90: torch grouped_mm), torch with varlen and flex,
# no TE, no grouped_gemm package.
LENT_GPU = Capabilities(cuda=True, transformer_engine=False, varlen=True, flex=True,
                        grouped_gemm=False, torch_grouped_mm=True)
NGC = Capabilities(cuda=True, transformer_engine=True, varlen=True, flex=True, grouped_gemm=True,
                   torch_grouped_mm=True)
OLD_TORCH_GPU = Capabilities(cuda=True, transformer_engine=False, varlen=False, flex=True,
                             grouped_gemm=False)  # also: no grouped_mm (or an A100)
MLA_DIMS = (192, 128)


def choose(caps, dtype="bf16", dropout=0.0, head_dims=MLA_DIMS, **kw):
    return choose_kernels(KernelConfig(**kw), caps, params_dtype=dtype,
                          attention_dropout=dropout, head_dims=head_dims)


@pytest.mark.parametrize(
    "caps,dtype,dropout,head_dims,backend,kernel,experts",
    [
        (CPU, "fp32", 0.0, MLA_DIMS, "local", "sdpa_mask", "sequential"),
        (CPU, "bf16", 0.0, MLA_DIMS, "local", "sdpa_mask", "sequential"),
        (LENT_GPU, "bf16", 0.0, MLA_DIMS, "local", "varlen", "torch_grouped_mm"),
        (LENT_GPU, "fp32", 0.0, MLA_DIMS, "local", "flex", "sequential"),  # bf16 kernels only
        (LENT_GPU, "bf16", 0.1, MLA_DIMS, "local", "sdpa_doc", "torch_grouped_mm"),  # dropout
        (LENT_GPU, "bf16", 0.0, (288,), "local", "flex", "torch_grouped_mm"),  # head dim > 256
        (OLD_TORCH_GPU, "bf16", 0.0, MLA_DIMS, "local", "flex", "sequential"),
        (NGC, "bf16", 0.0, MLA_DIMS, "te", "te", "te_grouped"),
        (NGC, "fp32", 0.0, MLA_DIMS, "te", "te", "te_grouped"),
    ],
    ids=["cpu-fp32", "cpu-bf16", "gpu-bf16", "gpu-fp32", "gpu-dropout", "gpu-wide-head",
         "gpu-no-varlen", "te-bf16", "te-fp32"],
)
def test_auto_choice(caps, dtype, dropout, head_dims, backend, kernel, experts):
    c = choose(caps, dtype, dropout, head_dims)
    assert (c.backend, c.attention_kernel, c.experts, c.fp8) == (backend, kernel, experts, False)
    # megatron's own moe_grouped_gemm flag is for TE's / the legacy grouped MLP only.
    assert c.moe_grouped_gemm == (experts in ("te_grouped", "legacy_grouped"))
    assert c.reasons and all(isinstance(r, str) and r for r in c.reasons)


def test_auto_reasons_name_the_cause():
    assert "no CUDA device" in choose(CPU).describe()
    gpu = choose(LENT_GPU).describe()
    assert "Transformer Engine not importable" in gpu
    assert "torch grouped_mm" in gpu
    assert "grouped_gemm package" in choose(OLD_TORCH_GPU).describe()  # why experts are sequential
    assert "bf16" in choose(LENT_GPU, dtype="fp32").describe()  # why not varlen


def test_grouped_gemm_package_without_te():
    gg = Capabilities(cuda=True, transformer_engine=False, varlen=True, flex=True,
                      grouped_gemm=True)  # e.g. an A100: no torch grouped_mm
    assert choose(gg, "bf16").experts == "legacy_grouped"
    assert choose(gg, "bf16").moe_grouped_gemm is True
    assert choose(gg, "fp32").experts == "sequential"  # legacy GroupedMLP asserts bf16
    assert choose(gg, "bf16", moe_grouped_gemm="off").experts == "sequential"
    with pytest.raises(ValueError, match="bf16"):
        choose(gg, "fp32", moe_grouped_gemm="on")
    # torch grouped_mm is preferred: it keeps the per-expert parameter layout.
    both = dataclasses.replace(gg, torch_grouped_mm=True)
    assert choose(both, "bf16").experts == "torch_grouped_mm"
    assert choose(both, "bf16", moe_grouped_gemm="on").moe_grouped_gemm is False


def test_explicit_requests():
    assert choose(NGC, backend="local").backend == "local"
    assert choose(NGC, backend="local").attention_kernel == "varlen"
    assert choose(NGC, fp8=True).fp8 is True
    assert choose(LENT_GPU, attention_kernel="sdpa_doc").attention_kernel == "sdpa_doc"
    assert choose(CPU, attention_kernel="flex").attention_kernel == "flex"
    assert choose(CPU, attention_kernel="sdpa_doc").attention_kernel == "sdpa_doc"


@pytest.mark.parametrize(
    "caps,kw,dtype,dropout,match",
    [
        (CPU, {"backend": "te"}, "bf16", 0.0, "no CUDA device"),
        (LENT_GPU, {"backend": "te"}, "bf16", 0.0, "does not import"),
        (LENT_GPU, {"fp8": True, "backend": "auto"}, "bf16", 0.0, "fp8"),
        (CPU, {"attention_kernel": "varlen"}, "bf16", 0.0, "CUDA"),
        (LENT_GPU, {"attention_kernel": "varlen"}, "fp32", 0.0, "bf16"),
        (OLD_TORCH_GPU, {"attention_kernel": "varlen"}, "bf16", 0.0, "varlen"),
        (LENT_GPU, {"attention_kernel": "flex"}, "bf16", 0.1, "dropout"),
        (NGC, {"attention_kernel": "flex"}, "bf16", 0.0, "local backend only"),
        (OLD_TORCH_GPU, {"moe_grouped_gemm": "on"}, "bf16", 0.0, "grouped_gemm"),
    ],
    ids=["te-on-cpu", "te-missing", "fp8-without-te", "varlen-on-cpu", "varlen-fp32",
         "varlen-old-torch", "flex-dropout", "kernel-with-te", "grouped-gemm-missing"],
)
def test_impossible_requests_raise(caps, kw, dtype, dropout, match):
    with pytest.raises(ValueError, match=match):
        choose(caps, dtype, dropout, **kw)


def test_fp8_with_local_backend_rejected_by_config():
    with pytest.raises(ValueError, match="Transformer Engine"):
        KernelConfig(backend="local", fp8=True)


def test_overrides_reach_the_config():
    job = apply_overrides(JobConfig(), [
        "model.kernels.attention_kernel=sdpa_doc", "model.kernels.backend=local",
        "model.llm.recompute=selective", "model.llm.recompute_modules=[core_attn,mla_up_proj]",
    ])
    assert job.model.kernels.attention_kernel == "sdpa_doc"
    assert job.model.llm.recompute_modules == ["core_attn", "mla_up_proj"]
    with pytest.raises(ValueError, match="choose one of"):
        apply_overrides(JobConfig(), ["model.kernels.attention_kernel=flash3"])
    with pytest.raises(ValueError, match="recompute_modules"):
        apply_overrides(JobConfig(), ["model.llm.recompute_modules=[attention]"])


def test_local_kernel_classes():
    from megatron_vlm.models.attention import PackedSelfAttention
    from megatron_vlm.models.packed_kernels import (
        DocumentSDPAAttention,
        FlexPackedAttention,
        VarlenPackedAttention,
    )

    expected = {"sdpa_mask": PackedSelfAttention, "sdpa_doc": DocumentSDPAAttention,
                "flex": FlexPackedAttention, "varlen": VarlenPackedAttention}
    for kernel, cls in expected.items():
        c = choose(LENT_GPU, attention_kernel=kernel)
        assert core_attention_module(c) is cls


@pytest.fixture
def fake_te_package(tmp_path, monkeypatch):
    """An importable top-level ``transformer_engine`` that records being imported (it has no
    ``pytorch`` submodule, like a broken install), to see whether detection imports it."""
    pkg = tmp_path / "transformer_engine"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("IMPORTED = True\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "transformer_engine", raising=False)
    yield
    sys.modules.pop("transformer_engine", None)


def test_detection_never_imports_te_on_cpu_or_local(fake_te_package, monkeypatch):
    caps = detect_capabilities(KernelConfig(backend="auto"))
    if not torch.cuda.is_available():
        assert caps.cuda is False and caps.transformer_engine is False
        assert "transformer_engine" not in sys.modules  # no CUDA: TE never imported
    # A CUDA machine (simulated) with backend=local must not import TE either...
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    caps = detect_capabilities(KernelConfig(backend="local"))
    assert caps.transformer_engine is False
    assert "transformer_engine" not in sys.modules
    # ... while auto does try it, and a package whose CUDA module fails is "no TE".
    caps = detect_capabilities(KernelConfig(backend="auto"))
    assert "transformer_engine" in sys.modules and caps.transformer_engine is False
