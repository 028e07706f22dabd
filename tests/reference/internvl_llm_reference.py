"""Shared helpers of ``test_qwen3_moe_llm.py`` and ``test_gpt_oss_llm.py``: perturbing a tiny HF
model so that a wrong mapping shows, and building our LLM with its weights through a family's
name rules (``families/internvl/hf_llm_names.py``): every tensor of ours is produced by exactly
one rule and every HF tensor is used."""

from __future__ import annotations

import torch


def perturb(model: torch.nn.Module, seed: int, std: float = 0.2,
            bias_std: float | None = None) -> None:
    """Every parameter away from its init: norms uniform in [0.5, 1.5], the rest normal with
    ``std`` (biases and sinks with ``bias_std``, default ``std``)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(torch.empty(p.shape).uniform_(0.5, 1.5, generator=gen))
            elif name.endswith(("bias", "sinks")) and bias_std is not None:
                p.copy_(bias_std * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(std * torch.randn(p.shape, generator=gen))


def build_ours(llm, hf_state: dict[str, torch.Tensor], rules, kernels=None):
    """Our LLM (eval) from ``llm`` with the LLM-relative HF tensors ``hf_state`` (``lm_head``
    top-level) mapped by ``rules``."""
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from megatron_vlm.config import ParallelConfig
    from megatron_vlm.convert.rules import ConvertContext, Table
    from megatron_vlm.models.llm import build_llm, padded_vocab_size

    torch.manual_seed(0)
    model_parallel_cuda_manual_seed(0)
    model = build_llm(llm, ParallelConfig(), kernels=kernels).eval()
    ctx = ConvertContext(num_heads=llm.num_attention_heads, num_query_groups=llm.query_groups,
                         vocab_size=llm.vocab_size,
                         padded_vocab_size=padded_vocab_size(llm.vocab_size, 1),
                         num_dense_layers=llm.num_dense_layers)
    table = Table(rules, ctx)
    used, state = set(), {}
    for name, ours in model.state_dict().items():
        if name.endswith("._extra_state"):  # megatron's (empty) per-module extra state
            continue
        rule, binding = table.lookup(name)
        names = rule.hf_names(binding)
        used.update(names)
        state[name] = rule.transform.to_ours([hf_state[n] for n in names], ctx)
        assert state[name].shape == ours.shape, (name, state[name].shape, ours.shape)
    assert used == set(hf_state), sorted(set(hf_state) - used)
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all(k.endswith("._extra_state") for k in missing), missing
    return model


def packed_params(lengths: list[int], spans: list[int]):
    """THD parameters of documents of real ``lengths`` in padded ``spans``."""
    from megatron_vlm.models.attention import thd_packed_seq_params

    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    cu_pad = torch.tensor([0, *torch.tensor(spans).cumsum(0).tolist()], dtype=torch.int32)
    return thd_packed_seq_params(cu, cu_pad, sum(spans), torch.device("cpu"))


def tokens(n: int, seed: int, vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (1, n), generator=torch.Generator().manual_seed(seed))


def planned_and_built_tensors(llm) -> tuple[list, list]:
    """``planning.tensors.chunk_tensors`` of ``llm`` (bf16, one stage) and the parameters of the
    model ``build_llm`` makes on the meta device: (name, shape, dtype) lists in module order."""
    from megatron_vlm.config import ParallelConfig
    from megatron_vlm.config.model import ModelConfig
    from megatron_vlm.models.llm import build_llm
    from megatron_vlm.parallel.init import ensure_single_process_groups
    from megatron_vlm.planning.tensors import chunk_tensors

    groups = ensure_single_process_groups(seed=1234).pg_collection
    with torch.device("meta"):
        model = build_llm(llm, ParallelConfig(), "bf16", pg_collection=groups)
    planned = chunk_tensors(ModelConfig(llm=llm, params_dtype="bf16"), range(llm.num_layers),
                            first=True, last=True)
    dtypes = {torch.bfloat16: "bf16", torch.float32: "fp32"}
    built = [(n, tuple(p.shape), dtypes[p.dtype]) for n, p in model.named_parameters()]
    return [(t.name, t.shape, t.dtype) for t in planned], built
