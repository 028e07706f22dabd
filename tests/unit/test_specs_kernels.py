"""The packed attention kernels (models/packed_kernels.py) against textbook attention.

Reference: per document, in float64, ``softmax(q k^T * scale + mask) v`` over the document's real
tokens. Padding slots hold huge values, so any leak into a real token is a large error. Checked
on CPU: ``sdpa_doc`` (values, gradients, max logits), ``flex`` (values, max logits; torch has no
CPU backward for flex) and the ``varlen`` plumbing (v padding, gathering real tokens, scale,
boundaries) with a stand-in kernel that implements ``varlen_attn``'s documented contract per
document; torch's flash kernel itself runs only on CUDA (the ``gpu`` test at the end).
Then through the model: the tiny MLA/MoE LLM built with each kernel equals the reference kernel's
model (loss and every gradient), and activation recompute changes no gradient.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F
from megatron.core.packed_seq_params import PackedSeqParams
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_vlm.models.attention import PackedSelfAttention
from megatron_vlm.models.packed_kernels import (
    DocumentSDPAAttention,
    FlexPackedAttention,
    VarlenPackedAttention,
    document_layout,
)

REAL, SPANS, TAIL = [5, 1, 9, 16], [8, 4, 12, 16], 3  # real lengths, padded spans, tail padding


def thd_params(real, spans, tail) -> PackedSeqParams:
    cu = torch.tensor([0, *torch.tensor(real).cumsum(0).tolist()], dtype=torch.int32)
    cu_pad = torch.tensor([0, *torch.tensor(spans).cumsum(0).tolist()], dtype=torch.int32)
    return PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                           cu_seqlens_q_padded=cu_pad, cu_seqlens_kv_padded=cu_pad,
                           max_seqlen_q=max(spans), max_seqlen_kv=max(spans))


def starts_of(spans):
    return [0, *torch.tensor(spans).cumsum(0).tolist()[:-1]]


def make_inputs(heads=3, dk=12, dv=8, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    t = sum(SPANS) + TAIL
    q, k = torch.randn(t, heads, dk, generator=g), torch.randn(t, heads, dk, generator=g)
    v = torch.randn(t, heads, dv, generator=g)
    is_real = torch.zeros(t, dtype=torch.bool)
    for s, n in zip(starts_of(SPANS), REAL):
        is_real[s : s + n] = True
    for x in (q, k, v):
        x[~is_real] = 1e4 * torch.randn(int((~is_real).sum()), heads, x.shape[2], generator=g)
    return q.to(dtype), k.to(dtype), v.to(dtype), is_real


def reference(q, k, v, scale, causal):
    """[t, h, dv] float64 on real rows (padding rows left 0) and per-head max logits."""
    out = torch.zeros(q.shape[0], q.shape[1], v.shape[2], dtype=torch.float64)
    best = torch.full((q.shape[1],), float("-inf"), dtype=torch.float64)
    for s, n in zip(starts_of(SPANS), REAL):
        sl = slice(s, s + n)
        logits = torch.einsum("qhd,khd->hqk", q[sl].double(), k[sl].double()) * scale
        if causal:
            logits = logits.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), -math.inf)
        best = torch.maximum(best, logits.amax(dim=(1, 2)))
        out[sl] = torch.einsum("hqk,khd->qhd", torch.softmax(logits, -1), v[sl].double())
    return out, best


def per_document_varlen(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *,
                        is_causal=False):
    """``varlen_attn`` as documented for torch 2.9 (no ``scale``: 1/sqrt(head dim)), written with
    one SDPA per document; like flash it refuses unequal q/k and v head dims."""
    if not (query.shape[-1] == key.shape[-1] == value.shape[-1]):
        raise RuntimeError("flash attention needs equal head dims for q, k and v")
    assert max_q == int((cu_seq_q[1:] - cu_seq_q[:-1]).max()) and torch.equal(cu_seq_q, cu_seq_k)
    assert cu_seq_q[-1] == query.shape[0]
    outs = []
    for a, b in zip(cu_seq_q[:-1].tolist(), cu_seq_q[1:].tolist()):
        x = [t[a:b].transpose(0, 1) for t in (query, key, value)]
        outs.append(F.scaled_dot_product_attention(*x, is_causal=is_causal).transpose(0, 1))
    return torch.cat(outs)


def per_document_varlen_new(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *,
                            return_aux=None, scale=None, window_size=(-1, -1)):
    """The torch 2.13 signature (``window_size``, ``scale``)."""
    out = per_document_varlen(query * (scale * math.sqrt(query.shape[-1])), key, value,
                              cu_seq_q, cu_seq_k, max_q, max_k, is_causal=window_size == (-1, 0))
    return out


class StandInVarlen(VarlenPackedAttention):
    varlen_fn = staticmethod(per_document_varlen)


class StandInVarlenNew(VarlenPackedAttention):
    varlen_fn = staticmethod(per_document_varlen_new)


KERNELS = {"sdpa_doc": DocumentSDPAAttention, "varlen-2.9-api": StandInVarlen,
           "varlen-2.13-api": StandInVarlenNew, "flex": FlexPackedAttention}


def build(cls, heads, dk, dv, causal, scale=None, record=True):
    config = TransformerConfig(num_layers=1, hidden_size=heads * dv, num_attention_heads=heads,
                               kv_channels=dv, attention_dropout=0.0,
                               log_max_attention_logit=record)
    mask = AttnMaskType.causal if causal else AttnMaskType.no_mask
    return cls(config, layer_number=1, attn_mask_type=mask, softmax_scale=scale, k_channels=dk,
               v_channels=dv)


@pytest.mark.parametrize("kernel", list(KERNELS))
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_kernel_values_and_max_logits(kernel, causal):
    q, k, v, is_real = make_inputs()
    scale = 0.37  # MLA passes its own (YaRN) scale
    attn = build(KERNELS[kernel], 3, 12, 8, causal, scale)
    with torch.no_grad():
        out = attn(q, k, v, None, packed_seq_params=thd_params(REAL, SPANS, TAIL))
    ref, best = reference(q, k, v, scale, causal)
    assert out.shape == (q.shape[0], 3, 8) and torch.isfinite(out).all()
    torch.testing.assert_close(out[is_real].double(), ref[is_real], atol=2e-6, rtol=0)
    torch.testing.assert_close(attn.current_max_attn_logits.double(), best, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kernel", ["sdpa_doc", "varlen-2.9-api", "varlen-2.13-api"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_kernel_gradients_equal_reference_kernel(kernel, causal):
    """d(loss)/d(q, k, v) with loss = <out, g> over real rows equals the dense-mask reference."""
    q, k, v, is_real = make_inputs(seed=3)
    q[~is_real], k[~is_real], v[~is_real] = 0.5, -0.5, 0.25  # finite: padding grads are compared
    g = torch.randn(q.shape[0], 3, 8, generator=torch.Generator().manual_seed(4))
    params = thd_params(REAL, SPANS, TAIL)
    grads = {}
    for name, cls in (("ref", PackedSelfAttention), ("kernel", KERNELS[kernel])):
        xs = [x.clone().requires_grad_(True) for x in (q, k, v)]
        out = build(cls, 3, 12, 8, causal, record=False)(*xs, None, packed_seq_params=params)
        (out[is_real] * g[is_real]).sum().backward()
        grads[name] = [x.grad for x in xs]
    for ref, got in zip(grads["ref"], grads["kernel"]):
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)
    # Padding keys/values get no gradient from real rows in either implementation.
    assert grads["kernel"][1][~is_real].abs().max() == 0


def test_layout_cached_per_micro_batch():
    params = thd_params(REAL, SPANS, TAIL)
    t = sum(SPANS) + TAIL
    a, b = document_layout(params, t, torch.device("cpu")), document_layout(
        params, t, torch.device("cpu"))
    assert a is b
    assert a.real == [*REAL, 0] and a.padded == [*SPANS, TAIL]
    assert a.cu_real.tolist() == [0, 5, 6, 15, 31, 31]
    assert a.real_index.numel() == sum(REAL)
    other = thd_params(REAL, SPANS, TAIL)  # an equal but distinct micro-batch
    assert document_layout(other, t, torch.device("cpu")) is not a
    with pytest.raises(ValueError, match="sequence has"):
        document_layout(thd_params(REAL, SPANS, 0), sum(SPANS) - 1, torch.device("cpu"))


def test_flex_and_varlen_refuse_dropout():
    for cls in (FlexPackedAttention, StandInVarlen):
        config = TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=1,
                                   attention_dropout=0.1)
        with pytest.raises(ValueError, match="dropout"):
            cls(config, layer_number=1, attn_mask_type=AttnMaskType.causal)


# --------------------------------------------------------------------------- through the model


def tiny_model(kernel: str, **llm_overrides):
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from megatron_vlm.config import KernelConfig, ParallelConfig
    from megatron_vlm.models.llm import build_llm
    from megatron_vlm.recipes.tiny import tiny_llm

    torch.manual_seed(0)
    model_parallel_cuda_manual_seed(0)
    llm = dataclasses.replace(tiny_llm(vocab_size=128), init_method_std=0.2, qk_clip=True,
                              **llm_overrides)
    return build_llm(llm, ParallelConfig(), kernels=KernelConfig(attention_kernel=kernel)).train()


def loss_and_grads(model, with_grad=True):
    real, spans = [10, 6, 17], [12, 8, 20]
    ids = torch.randint(0, 128, (1, sum(spans)), generator=torch.Generator().manual_seed(1))
    labels = torch.roll(ids, -1, dims=1)
    params = thd_params(real, spans, 0)
    with torch.set_grad_enabled(with_grad):
        loss = model(ids, None, None, labels=labels, packed_seq_params=params)
        mask = torch.zeros_like(loss)
        for s, n in zip(starts_of(spans), real):
            mask[0, s : s + n - 1] = 1
        total = (loss * mask).sum()
    grads = {}
    if with_grad:
        total.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    maxes = [layer.self_attention.core_attention.current_max_attn_logits.clone()
             for layer in model.decoder.layers]
    return total.detach(), grads, maxes


def test_model_with_each_kernel_equals_reference(megatron_groups):
    ref_loss, ref_grads, ref_max = loss_and_grads(tiny_model("sdpa_mask"))
    assert len(ref_grads) > 20
    for kernel, with_grad in (("sdpa_doc", True), ("flex", False)):
        model = tiny_model(kernel)
        assert type(model.decoder.layers[0].self_attention.core_attention).__name__ == {
            "sdpa_doc": "DocumentSDPAAttention", "flex": "FlexPackedAttention"}[kernel]
        loss, grads, maxes = loss_and_grads(model, with_grad)
        torch.testing.assert_close(loss, ref_loss, atol=1e-4, rtol=1e-6)
        for got, ref in zip(maxes, ref_max):
            torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-6)
        for name, g in grads.items():
            torch.testing.assert_close(g, ref_grads[name], atol=1e-5, rtol=1e-4, msg=name)


@pytest.mark.parametrize("recompute,modules", [("full", ["core_attn"]),
                                               ("selective", ["core_attn", "mla_up_proj"])])
def test_recompute_changes_no_gradient(megatron_groups, recompute, modules):
    ref_loss, ref_grads, _ = loss_and_grads(tiny_model("sdpa_mask"))
    model = tiny_model("sdpa_mask", recompute=recompute, recompute_modules=modules)
    assert model.config.recompute_granularity == recompute
    loss, grads, _ = loss_and_grads(model)
    torch.testing.assert_close(loss, ref_loss, atol=0, rtol=0)
    assert grads.keys() == ref_grads.keys()
    for name, g in grads.items():
        torch.testing.assert_close(g, ref_grads[name], atol=1e-6, rtol=1e-6, msg=name)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (flash varlen, flex bwd)")
@pytest.mark.parametrize("cls", [VarlenPackedAttention, FlexPackedAttention, DocumentSDPAAttention])
def test_gpu_kernels_bf16_match_reference(cls):
    """torch's real kernels on CUDA in bf16 (MLA dims 192/128): values and gradients vs the
    dense-mask reference in fp32."""
    q, k, v, is_real = make_inputs(heads=4, dk=192, dv=128, seed=5)
    q[~is_real], k[~is_real], v[~is_real] = 0.5, -0.5, 0.25
    g = torch.randn(q.shape[0], 4, 128)
    params = thd_params(REAL, SPANS, TAIL)
    res = {}
    for name, c, dtype in (("ref", PackedSelfAttention, torch.float32),
                           ("gpu", cls, torch.bfloat16)):
        xs = [x.cuda().to(dtype).requires_grad_(True) for x in (q, k, v)]
        out = build(c, 4, 192, 128, True, record=False)(*xs, None, packed_seq_params=params)
        (out[is_real.cuda()].float() * g.cuda()[is_real.cuda()]).sum().backward()
        res[name] = [out.float()] + [x.grad.float() for x in xs]
    torch.testing.assert_close(res["gpu"][0][is_real.cuda()], res["ref"][0][is_real.cuda()],
                               atol=3e-2, rtol=3e-2)
    for got, ref in zip(res["gpu"][1:], res["ref"][1:]):
        torch.testing.assert_close(got, ref, atol=5e-2, rtol=5e-2)


# --------------------------------------------------------------------------- grouped experts


def _grouped_choice():
    from megatron_vlm.config import KernelConfig
    from megatron_vlm.models.specs import Capabilities, choose_kernels

    caps = Capabilities(cuda=False, transformer_engine=False, varlen=False, flex=True,
                        grouped_gemm=False, torch_grouped_mm=True)  # torch 2.13 runs it on CPU
    return choose_kernels(KernelConfig(), caps, params_dtype="bf16")


def test_grouped_mm_experts_equal_sequential_experts(megatron_groups):
    """The same experts module, grouped forward vs megatron's per-expert loop (its parent's
    forward), bf16, with experts that receive no tokens: outputs and all gradients."""
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed
    from megatron.core.transformer.moe.experts import SequentialMLP

    from megatron_vlm.config import ParallelConfig
    from megatron_vlm.models.experts import GroupedMMSequentialMLP
    from megatron_vlm.models.llm import build_llm
    from megatron_vlm.recipes.tiny import tiny_llm

    choice = _grouped_choice()
    assert choice.experts == "torch_grouped_mm" and choice.moe_grouped_gemm is False
    torch.manual_seed(0)
    model_parallel_cuda_manual_seed(0)
    model = build_llm(tiny_llm(vocab_size=128), ParallelConfig(), "bf16", choice=choice)
    experts = model.decoder.layers[1].mlp.experts
    assert type(experts) is GroupedMMSequentialMLP
    assert [n for n, _ in experts.named_parameters()][:2] == [
        "local_experts.0.linear_fc1.weight", "local_experts.0.linear_fc2.weight"]
    counts = torch.tensor([5, 0, 9, 3, 0, 7, 1, 6])  # 8 experts, two without tokens
    g = torch.Generator().manual_seed(2)
    x = torch.randn(int(counts.sum()), 64, generator=g).to(torch.bfloat16)
    probs = torch.rand(int(counts.sum()), generator=g)
    upstream = torch.randn(int(counts.sum()), 64, generator=g).to(torch.bfloat16)
    runs = {}
    for name, forward in (("grouped", experts.forward),
                          ("sequential", lambda *a: SequentialMLP.forward(experts, *a))):
        experts.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_(True)
        out, bias = forward(xi, counts, probs)
        assert bias is None
        (out.float() * upstream.float()).sum().backward()
        runs[name] = [out.float(), xi.grad.float()] + [
            p.grad.float() for p in experts.parameters()]
    for got, ref in zip(runs["grouped"], runs["sequential"]):
        assert got.shape == ref.shape
        err = (got - ref).norm() / ref.norm().clamp(min=1e-6)
        assert err < 1e-2, float(err)  # bf16 rounding of two GEMMs
    # Experts without tokens get exactly zero gradient in both.
    for e in (1, 4):
        assert experts.local_experts[e].linear_fc1.weight.grad.abs().max() == 0


def test_grouped_mm_experts_through_the_model(megatron_groups):
    """The tiny LLM (bf16) with grouped experts vs sequential experts from the same init: loss
    within bf16 rounding, and the expert weights receive gradients."""
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from megatron_vlm.config import KernelConfig, ParallelConfig
    from megatron_vlm.models.llm import build_llm
    from megatron_vlm.recipes.tiny import tiny_llm

    losses = {}
    for name, kw in (("grouped", {"choice": _grouped_choice()}),
                     ("sequential", {"kernels": KernelConfig(moe_grouped_gemm="off")})):
        torch.manual_seed(0)
        model_parallel_cuda_manual_seed(0)
        model = build_llm(tiny_llm(vocab_size=128), ParallelConfig(), "bf16", **kw).train()
        real, spans = [10, 6, 17], [12, 8, 20]
        ids = torch.randint(0, 128, (1, sum(spans)), generator=torch.Generator().manual_seed(1))
        out = model(ids, None, None, labels=torch.roll(ids, -1, dims=1),
                    packed_seq_params=thd_params(real, spans, 0))
        out.float().mean().backward()
        losses[name] = out.float().mean().item()
        w = model.decoder.layers[1].mlp.experts.local_experts[0].linear_fc1.weight
        assert w.grad is not None and w.grad.abs().max() > 0
    assert losses["grouped"] == pytest.approx(losses["sequential"], rel=1e-2)


@pytest.mark.parametrize("recompute", ["full", "core_attn"])
def test_vit_recompute_changes_no_gradient(megatron_groups, recompute):
    """ViT-only recompute (model.vision.recompute, LLM left at none): same features and grads."""
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from megatron_vlm.config import ParallelConfig
    from megatron_vlm.models.vision.moonvit import build_moonvit
    from megatron_vlm.recipes.tiny import tiny_moonvit

    grid = torch.tensor([[1, 4, 6], [4, 2, 2]])
    pixels = torch.randn(int(grid.prod(dim=1).sum()), 3, 14, 14,
                         generator=torch.Generator().manual_seed(3))
    runs = {}
    for mode in ("none", recompute):
        torch.manual_seed(0)
        model_parallel_cuda_manual_seed(0)
        vit = build_moonvit(dataclasses.replace(tiny_moonvit(), recompute=mode),
                            ParallelConfig()).train()
        assert vit.config.recompute_granularity == {"none": None, "full": "full",
                                                    "core_attn": "selective"}[mode]
        out = vit(pixels, grid)
        out.square().mean().backward()
        runs[mode] = (out.detach(), {n: p.grad.clone() for n, p in vit.named_parameters()})
    torch.testing.assert_close(runs[recompute][0], runs["none"][0], atol=0, rtol=0)
    for name, g in runs["none"][1].items():
        torch.testing.assert_close(runs[recompute][1][name], g, atol=1e-7, rtol=1e-6, msg=name)
