"""Transformer Engine spec: a checkpoint moves between the local and TE specs through the
conversion name table, and both specs give the same logits (runs only where CUDA and TE exist,
e.g. the NGC container; skipped elsewhere)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="Transformer Engine needs CUDA"),
]


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
