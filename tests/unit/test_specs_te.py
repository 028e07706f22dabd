"""Transformer Engine spec: a checkpoint moves between the local and TE specs through the
conversion name table, and both specs give the same logits; MLA's latent norms (fused into TE's
up-projections) take ``model.llm.mla_latent_norm_epsilon``, not ``layernorm_epsilon``. The
module tests run only where CUDA and TE exist (e.g. the NGC container; skipped elsewhere); the
spec itself is inspected on CPU too.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

gpu_with_te = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="Transformer Engine needs CUDA"),
]


def _gpu(test):
    for mark in gpu_with_te:
        test = mark(test)
    return test


@pytest.fixture
def te_block_spec(monkeypatch):
    """``build(llm, latent_norm_eps)``: our TE decoder block spec through megatron's own
    ``get_gpt_decoder_block_spec`` (dense layers; the MLA spec is the same in MoE layers).
    Without TE, megatron's ``gpt_layer_specs`` skips importing ``TENorm``/``TESpecProvider``
    (their classes exist, with TE's base a placeholder): the test supplies those two names."""
    from megatron.core.extensions.transformer_engine import TENorm
    from megatron.core.extensions.transformer_engine_spec_provider import TESpecProvider
    from megatron.core.models.gpt import gpt_layer_specs

    from megatron_vlm.config import ParallelConfig
    from megatron_vlm.models.llm import build_transformer_config
    from megatron_vlm.models.specs import KernelChoice, llm_decoder_block_spec

    monkeypatch.setattr(gpt_layer_specs, "TENorm", TENorm, raising=False)
    monkeypatch.setattr(gpt_layer_specs, "TESpecProvider", TESpecProvider, raising=False)
    choice = KernelChoice(backend="te", attention_kernel="te", moe_grouped_gemm=False, fp8=False)

    def build(llm, latent_norm_eps):
        config = build_transformer_config(llm, ParallelConfig(), "fp32", choice)
        return config, llm_decoder_block_spec(config, choice, latent_norm_eps=latent_norm_eps)

    return build


def test_te_spec_latent_norms_take_their_own_eps(megatron_groups, te_block_spec):
    from megatron.core.extensions.transformer_engine import TELinear

    from megatron_vlm.models.norm import TELatentNormColumnParallelLinear
    from megatron_vlm.recipes.tiny import tiny_llm

    llm = dataclasses.replace(tiny_llm(vocab_size=128), num_experts=None, norm_epsilon=1e-5)
    config, block = te_block_spec(llm, 1e-6)
    assert config.layernorm_epsilon == 1e-5  # every other norm
    assert len(block.layer_specs) == llm.num_layers
    for layer in block.layer_specs:
        attn = layer.submodules.self_attention.submodules
        for up_proj in (attn.linear_q_up_proj, attn.linear_kv_up_proj):
            assert up_proj.module is TELatentNormColumnParallelLinear
            assert up_proj.params == {"latent_eps": 1e-6}
        # the rest is megatron's TE MLA spec
        assert attn.linear_q_down_proj is TELinear and attn.linear_kv_down_proj is TELinear


def test_latent_norm_config_changes_only_the_eps(megatron_groups):
    from megatron_vlm.config import ParallelConfig
    from megatron_vlm.models.llm import build_transformer_config
    from megatron_vlm.models.norm import latent_norm_config
    from megatron_vlm.models.specs import KernelChoice
    from megatron_vlm.recipes.tiny import tiny_llm

    choice = KernelChoice(backend="local", attention_kernel="sdpa_mask", moe_grouped_gemm=False,
                          fp8=False)
    llm = dataclasses.replace(tiny_llm(vocab_size=128), norm_epsilon=1e-5)
    config = build_transformer_config(llm, ParallelConfig(), "fp32", choice)
    latent = latent_norm_config(config, 1e-6)
    assert latent.layernorm_epsilon == 1e-6 and config.layernorm_epsilon == 1e-5
    fields = [f.name for f in dataclasses.fields(config) if f.name != "layernorm_epsilon"]
    assert all(getattr(latent, f) is getattr(config, f) for f in fields)


@_gpu
def test_te_latent_norm_modules_use_latent_eps():
    """The built TE modules: latent norms (fused into the up-projections) at 1e-6, every other
    norm at ``norm_epsilon`` 1e-5; the up-projections keep the model's shared config."""
    pytest.importorskip("transformer_engine.pytorch")
    from megatron.core import parallel_state
    from megatron.core.extensions.transformer_engine import TELayerNormColumnParallelLinear

    from megatron_vlm.config import KernelConfig, ParallelConfig
    from megatron_vlm.models.llm import build_llm
    from megatron_vlm.parallel.init import init_distributed
    from megatron_vlm.recipes.tiny import tiny_llm

    if not parallel_state.model_parallel_is_initialized():
        init_distributed(ParallelConfig(), seed=1234)
    llm = dataclasses.replace(tiny_llm(vocab_size=128), norm_epsilon=1e-5)
    model = build_llm(llm, ParallelConfig(), "bf16", kernels=KernelConfig(backend="te"))
    normed = {n: m for n, m in model.named_modules() if hasattr(m, "eps")}
    ups = {n: m for n, m in normed.items()
           if n.endswith(("linear_q_up_proj", "linear_kv_up_proj"))}
    assert len(ups) == 2 * llm.num_layers  # q_lora: both up-projections carry a latent norm
    for name, module in ups.items():
        assert type(module) is TELayerNormColumnParallelLinear, name
        assert module.eps == 1e-6 and module.config is model.config, name
    others = {n: m.eps for n, m in normed.items() if n not in ups}
    assert others and all(eps == 1e-5 for eps in others.values()), others


@_gpu
def test_local_checkpoint_loads_into_te_spec_and_matches():
    pytest.importorskip("transformer_engine.pytorch")
    from megatron.core import parallel_state
    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from megatron_vlm.config import KernelConfig, ModelConfig, ParallelConfig
    from megatron_vlm.convert.importer import context_for, table_for
    from megatron_vlm.convert.tables import FAMILIES
    from megatron_vlm.models.llm import build_llm
    from megatron_vlm.parallel.init import init_distributed
    from megatron_vlm.recipes.tiny import tiny_llm

    if not parallel_state.model_parallel_is_initialized():
        init_distributed(ParallelConfig(), seed=1234)
    llm = dataclasses.replace(tiny_llm(vocab_size=128), init_method_std=0.2)
    models = {}
    for backend in ("local", "te"):
        torch.manual_seed(0)
        model_parallel_cuda_manual_seed(0)
        models[backend] = build_llm(llm, ParallelConfig(), "bf16",
                                    kernels=KernelConfig(backend=backend)).cuda().eval()
    core = models["te"].decoder.layers[0].self_attention.core_attention
    assert type(core).__name__ == "TEDotProductAttention"

    model_cfg = ModelConfig(llm=llm)
    table = table_for(FAMILIES["deepseek_v3"], model_cfg, context_for(model_cfg))
    local_state = {k: v for k, v in models["local"].state_dict().items()
                   if "_extra_state" not in k}
    te_state = {table.to_te_name(k): v for k, v in local_state.items()}
    result = models["te"].load_state_dict(te_state, strict=False)
    assert not result.unexpected_keys
    assert all("_extra_state" in k for k in result.missing_keys), result.missing_keys
    # ... and back: every TE tensor has a local name holding the same values.
    for te_name, value in models["te"].state_dict().items():
        if "_extra_state" not in te_name:
            assert torch.equal(local_state[table.to_local_name(te_name)], value), te_name

    real, spans = [10, 6, 17], [16, 8, 24]
    cu = torch.tensor([0, 10, 16, 33], dtype=torch.int32, device="cuda")
    cu_pad = torch.tensor([0, 16, 24, 48], dtype=torch.int32, device="cuda")
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                             cu_seqlens_q_padded=cu_pad, cu_seqlens_kv_padded=cu_pad,
                             max_seqlen_q=24, max_seqlen_kv=24)
    ids = torch.randint(0, 128, (1, sum(spans)), device="cuda",
                        generator=torch.Generator(device="cuda").manual_seed(1))
    with torch.no_grad():
        out = {b: m(ids, None, None, packed_seq_params=params).float() for b, m in models.items()}
    starts = [0, 16, 24]
    for s, n in zip(starts, real):
        torch.testing.assert_close(out["te"][:, s : s + n], out["local"][:, s : s + n],
                                   atol=5e-2, rtol=5e-2)
