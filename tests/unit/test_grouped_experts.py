"""torch ``grouped_mm`` experts as ``GroupedExperts`` (models/experts.py): the same numbers as the
plain-autograd grouped path it replaced, bit for bit, without keeping a stacked copy of the expert
weights for backward; gradients reach each expert's own parameters (vs megatron's per-expert
loop); and what it keeps per routed token is the planner's ``expert_in + expert_fc1``.

CPU, bf16 (torch 2.13 runs ``grouped_mm`` on CPU in bf16 only, as ``test_specs_kernels.py``).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from megatron_vlm.models.experts import GroupedExperts, GroupedMMSequentialMLP
from megatron_vlm.models.specs import grouped_mm_fn

COUNTS = [5, 0, 9, 3, 0, 7, 1, 6]  # tokens per expert, two experts without tokens


def plain_autograd_experts(x, probs, offs, w1, w2):
    """The grouped path before ``GroupedExperts`` (its forward verbatim): autograd saves the
    stacked weights."""
    mm = grouped_mm_fn()
    s1 = torch.stack(w1).transpose(1, 2)
    s2 = torch.stack(w2).transpose(1, 2)
    fc1 = mm(x, s1, offs=offs)
    gate, up = torch.chunk(fc1, 2, dim=-1)
    act = F.silu(gate) * up
    act = (act * probs.unsqueeze(-1)).to(x.dtype)
    return mm(act, s2, offs=offs)


def grouped_function(x, probs, offs, w1, w2):
    return GroupedExperts.apply(x, probs, offs, len(w1), *w1, *w2)


def _inputs(counts, hidden, ffn, seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = int(sum(counts))
    w1 = [(0.05 * torch.randn(2 * ffn, hidden, generator=g)).bfloat16().requires_grad_()
          for _ in counts]
    w2 = [(0.05 * torch.randn(hidden, ffn, generator=g)).bfloat16().requires_grad_()
          for _ in counts]
    x = torch.randn(tokens, hidden, generator=g).bfloat16()
    probs = torch.rand(tokens, generator=g)
    upstream = torch.randn(tokens, hidden, generator=g).bfloat16()
    offs = torch.cumsum(torch.tensor(counts), dim=0).to(torch.int32)
    return x, probs, offs, w1, w2, upstream


def _run(forward, x, probs, offs, w1, w2, upstream):
    for w in w1 + w2:
        w.grad = None
    xi, pi = x.clone().requires_grad_(True), probs.clone().requires_grad_(True)
    out = forward(xi, pi, offs, w1, w2)
    out.backward(upstream)
    return [out, xi.grad, pi.grad] + [w.grad.clone() for w in w1 + w2]


def _saved_storages(fn) -> dict[int, torch.Tensor]:
    """One tensor per distinct storage that autograd saves while ``fn`` runs."""
    saved: dict[int, torch.Tensor] = {}

    def pack(t):
        saved.setdefault(t.untyped_storage().data_ptr(), t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return saved


@pytest.mark.parametrize("counts,hidden,ffn", [(COUNTS, 64, 48),
                                               ([60, 0, 250, 131, 97, 3], 256, 192)])
def test_grouped_experts_equal_plain_autograd_bit_for_bit(counts, hidden, ffn) -> None:
    """Output, input, probability and every weight gradient equal the plain-autograd grouped
    path exactly: the same kernels on the same operands (the GEMM gradients are torch's own
    ``_grouped_mm`` derivative formulas)."""
    args = _inputs(counts, hidden, ffn)
    ref = _run(plain_autograd_experts, *args)
    got = _run(grouped_function, *args)
    assert len(got) == len(ref) == 3 + 2 * len(counts)
    for i, (a, b) in enumerate(zip(got, ref)):
        assert a.dtype == b.dtype and a.shape == b.shape and a.stride() == b.stride(), i
        assert torch.equal(a, b), i
    for e, n in enumerate(counts):  # an expert without tokens gets an exact zero gradient
        assert (got[3 + e].abs().max() == 0) == (n == 0)


def test_frozen_weights_and_inputs_without_grad() -> None:
    """Only what requires a gradient gets one (frozen experts: no weight gradient, the input's
    still exact); a forward under no_grad runs."""
    x, probs, offs, w1, w2, upstream = _inputs(COUNTS, 64, 48)
    ref = _run(plain_autograd_experts, x, probs, offs, w1, w2, upstream)
    for w in w1 + w2:
        w.requires_grad_(False)
        w.grad = None
    xi = x.clone().requires_grad_(True)
    grouped_function(xi, probs, offs, w1, w2).backward(upstream)
    assert torch.equal(xi.grad, ref[1])
    assert all(w.grad is None for w in w1 + w2)
    with torch.no_grad():
        assert torch.equal(grouped_function(x, probs, offs, w1, w2), ref[0].detach())


def test_saved_tensors_exclude_stacked_weights() -> None:
    """What autograd keeps for backward: the plain path keeps both stacked weight copies (so the
    check can fail); ``GroupedExperts`` keeps no storage of either stack's size, only x, the
    probabilities, the offsets, the fc1 output and the parameters themselves."""
    x, probs, offs, w1, w2, _ = _inputs(COUNTS, 64, 48)
    xi, pi = x.clone().requires_grad_(True), probs.clone().requires_grad_(True)
    stacks = {len(COUNTS) * 2 * 48 * 64 * 2, len(COUNTS) * 64 * 48 * 2}  # bytes, bf16
    params = {w.untyped_storage().data_ptr() for w in w1 + w2}

    def nbytes(saved):
        return {t.untyped_storage().nbytes() for p, t in saved.items() if p not in params}

    old = _saved_storages(lambda: plain_autograd_experts(xi, pi, offs, w1, w2))
    assert stacks <= nbytes(old)
    new = _saved_storages(lambda: grouped_function(xi, pi, offs, w1, w2))
    assert not stacks & nbytes(new)
    tokens = sum(COUNTS)
    assert sorted(nbytes(new)) == sorted({tokens * 64 * 2, tokens * 4, len(COUNTS) * 4,
                                          tokens * 2 * 48 * 2})  # x, probs, offs, fc1
    assert params <= set(new)


@pytest.fixture(scope="module")
def tiny_grouped_llm(megatron_groups):
    """The tiny MoE LLM in bf16 with torch grouped_mm experts."""
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from megatron_vlm.config import KernelConfig, ParallelConfig
    from megatron_vlm.models.llm import build_llm
    from megatron_vlm.models.specs import Capabilities, choose_kernels
    from megatron_vlm.recipes.tiny import tiny_llm

    caps = Capabilities(cuda=False, transformer_engine=False, varlen=False, flex=True,
                        grouped_gemm=False, torch_grouped_mm=True)  # torch 2.13 runs it on CPU
    choice = choose_kernels(KernelConfig(), caps, params_dtype="bf16")
    assert choice.experts == "torch_grouped_mm"
    torch.manual_seed(0)
    model_parallel_cuda_manual_seed(0)
    return build_llm(tiny_llm(vocab_size=128), ParallelConfig(), "bf16", choice=choice)


def test_one_moe_layer_saves_no_stacked_weights(tiny_grouped_llm) -> None:
    """The tensors a whole MoE decoder layer saves for backward (attention, router, dispatcher,
    shared and routed experts; deduplicated by storage) include none of the stacked weights'
    size; with the plain-autograd experts forward the same layer does save both stacks. The
    layer's output and every gradient are the same bits either way."""
    layer = tiny_grouped_llm.decoder.layers[1]
    experts = layer.mlp.experts
    assert type(experts) is GroupedMMSequentialMLP
    n = len(experts.local_experts)
    f, h = experts.local_experts[0].linear_fc2.weight.shape[1], experts.config.hidden_size
    stacks = {n * 2 * f * h * 2, n * h * f * 2}
    seq = 37  # no activation of this layer happens to have a stack's size
    g = torch.Generator().manual_seed(4)
    x = torch.randn(seq, 1, h, generator=g).bfloat16()
    upstream = torch.randn(seq, 1, h, generator=g).bfloat16()

    def run():
        layer.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_(True)
        outs = []
        saved = _saved_storages(lambda: outs.append(layer(hidden_states=xi,
                                                          attention_mask=None)[0]))
        outs[0].backward(upstream)
        grads = [outs[0], xi.grad] + [p.grad for p in layer.parameters()]
        return {t.untyped_storage().nbytes() for t in saved.values()}, grads

    saved_new, grads_new = run()
    assert not stacks & saved_new

    def plain(hidden, tokens_per_expert, probs):
        offs = torch.cumsum(torch.as_tensor(tokens_per_expert), 0).to(torch.int32)
        w1 = [e.linear_fc1.weight for e in experts.local_experts]
        w2 = [e.linear_fc2.weight for e in experts.local_experts]
        return plain_autograd_experts(hidden, probs, offs, w1, w2), None

    experts.forward = plain
    try:
        saved_old, grads_old = run()
    finally:
        del experts.forward
    assert stacks <= saved_old
    assert len(grads_new) == len(grads_old) and all(g is not None for g in grads_new)
    for i, (a, b) in enumerate(zip(grads_new, grads_old)):
        assert torch.equal(a, b), i


def test_gradients_reach_each_experts_own_weights(tiny_grouped_llm) -> None:
    """``GroupedExperts`` through the module vs megatron's per-expert loop (``SequentialMLP``'s
    forward), bf16: every expert's gradient is nearest to the loop's gradient of that same
    expert (within bf16 rounding of two GEMMs), and zero where the expert got no tokens."""
    from megatron.core.transformer.moe.experts import SequentialMLP

    experts = tiny_grouped_llm.decoder.layers[1].mlp.experts
    counts = torch.tensor(COUNTS)
    x, probs, _, _, _, upstream = _inputs(COUNTS, experts.config.hidden_size, 1)
    runs = {}
    for name, forward in (("grouped", experts.forward),
                          ("loop", lambda *a: SequentialMLP.forward(experts, *a))):
        experts.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_(True)
        out, _ = forward(xi, counts, probs)
        (out.float() * upstream.float()).sum().backward()
        runs[name] = [out.float(), xi.grad.float()], [
            [p.grad.float() for p in (e.linear_fc1.weight, e.linear_fc2.weight)]
            for e in experts.local_experts]
    for got, ref in zip(runs["grouped"][0], runs["loop"][0]):
        assert (got - ref).norm() < 1e-2 * ref.norm()
    grouped, loop = runs["grouped"][1], runs["loop"][1]
    for e, n in enumerate(COUNTS):
        for k in range(2):
            if n == 0:
                assert grouped[e][k].abs().max() == 0 and loop[e][k].abs().max() == 0
                continue
            dist = [(grouped[e][k] - loop[j][k]).norm() for j in range(len(COUNTS))]
            assert min(range(len(COUNTS)), key=dist.__getitem__) == e
            assert dist[e] < 1e-2 * loop[e][k].norm(), (e, k)


def test_saved_bytes_per_routed_token_are_the_planners() -> None:
    """The planner's torch-grouped expert terms (``expert_in + expert_fc1``, per local token =
    ``k`` routed tokens at etp=1) are what ``GroupedExperts`` saves per routed token besides the
    parameters, the fp32 probabilities and the offsets; the stacked copy is its ``peak_extra``."""
    import dataclasses

    from megatron_vlm.planning.activations import (
        expert_stack_bytes,
        llm_layer_bytes,
        llm_layer_terms,
    )
    from megatron_vlm.recipes.tiny import tiny_llm

    llm = dataclasses.replace(tiny_llm(), hidden_size=64, moe_ffn_hidden_size=48)
    x, probs, offs, w1, w2, _ = _inputs(COUNTS, 64, 48)
    xi, pi = x.clone().requires_grad_(True), probs.clone().requires_grad_(True)
    params = {w.untyped_storage().data_ptr() for w in w1 + w2}
    saved = _saved_storages(lambda: grouped_function(xi, pi, offs, w1, w2))
    measured = sum(t.untyped_storage().nbytes() for p, t in saved.items()
                   if p not in params and t.dtype == torch.bfloat16) / sum(COUNTS)
    terms = {t.name: t for t in llm_layer_terms(llm, 1, tp=1, etp=1, cp=1, seq_length=64,
                                                torch_grouped_experts=True)}
    assert "expert_swiglu" not in terms
    per_token = sum(terms[n].elements * terms[n].bytes_per_element
                    for n in ("expert_in", "expert_fc1"))
    assert per_token / llm.moe_router_topk == measured == (64 + 2 * 48) * 2
    stack = sum(w.numel() * w.element_size() for w in w1 + w2)
    assert expert_stack_bytes(llm, ep=1, etp=1) == stack
    assert llm_layer_bytes(llm, 1, tp=1, etp=1, cp=1, seq_length=64, ep=2,
                           torch_grouped_experts=True)["peak_extra"] == stack / 2
