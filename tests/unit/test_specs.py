"""Layer-implementation choice (models/specs.py) for every capability combination.

Capabilities are passed in as values (what a machine with or without CUDA / Transformer Engine /
varlen / grouped_gemm would report); the expected choices are written out per case.
"""

from __future__ import annotations

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
# The lent GPU machine (SPEC §12): CUDA, torch with varlen and flex, no TE, no grouped_gemm.
LENT_GPU = Capabilities(cuda=True, transformer_engine=False, varlen=True, flex=True,
                        grouped_gemm=False)
NGC = Capabilities(cuda=True, transformer_engine=True, varlen=True, flex=True, grouped_gemm=True)
OLD_TORCH_GPU = Capabilities(cuda=True, transformer_engine=False, varlen=False, flex=True,
                             grouped_gemm=False)
MLA_DIMS = (192, 128)


def choose(caps, dtype="bf16", dropout=0.0, head_dims=MLA_DIMS, **kw):
    return choose_kernels(KernelConfig(**kw), caps, params_dtype=dtype,
                          attention_dropout=dropout, head_dims=head_dims)


@pytest.mark.parametrize(
    "caps,dtype,dropout,head_dims,backend,kernel,grouped",
    [
        (CPU, "fp32", 0.0, MLA_DIMS, "local", "sdpa_mask", False),
        (CPU, "bf16", 0.0, MLA_DIMS, "local", "sdpa_mask", False),
        (LENT_GPU, "bf16", 0.0, MLA_DIMS, "local", "varlen", False),
        (LENT_GPU, "fp32", 0.0, MLA_DIMS, "local", "flex", False),  # flash needs bf16
        (LENT_GPU, "bf16", 0.1, MLA_DIMS, "local", "sdpa_doc", False),  # dropout
        (LENT_GPU, "bf16", 0.0, (288,), "local", "flex", False),  # head dim > 256
        (OLD_TORCH_GPU, "bf16", 0.0, MLA_DIMS, "local", "flex", False),
        (NGC, "bf16", 0.0, MLA_DIMS, "te", "te", True),
        (NGC, "fp32", 0.0, MLA_DIMS, "te", "te", True),
    ],
    ids=["cpu-fp32", "cpu-bf16", "gpu-bf16", "gpu-fp32", "gpu-dropout", "gpu-wide-head",
         "gpu-no-varlen", "te-bf16", "te-fp32"],
)
def test_auto_choice(caps, dtype, dropout, head_dims, backend, kernel, grouped):
    c = choose(caps, dtype, dropout, head_dims)
    assert (c.backend, c.attention_kernel, c.moe_grouped_gemm, c.fp8) == (
        backend, kernel, grouped, False)
    assert c.reasons and all(isinstance(r, str) and r for r in c.reasons)


def test_auto_reasons_name_the_cause():
    assert "no CUDA device" in choose(CPU).describe()
    gpu = choose(LENT_GPU).describe()
    assert "Transformer Engine not importable" in gpu
    assert "grouped_gemm" in gpu  # why grouped GEMM is off
    assert "bf16" in choose(LENT_GPU, dtype="fp32").describe()  # why not varlen


def test_grouped_gemm_package_without_te():
    gg = Capabilities(cuda=True, transformer_engine=False, varlen=True, flex=True,
                      grouped_gemm=True)
    assert choose(gg, "bf16").moe_grouped_gemm is True
    assert choose(gg, "fp32").moe_grouped_gemm is False  # legacy GroupedMLP asserts bf16
    assert choose(gg, "bf16", moe_grouped_gemm="off").moe_grouped_gemm is False
    with pytest.raises(ValueError, match="bf16"):
        choose(gg, "fp32", moe_grouped_gemm="on")


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
        (LENT_GPU, {"moe_grouped_gemm": "on"}, "bf16", 0.0, "grouped_gemm"),
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
