"""Muon: the single-matrix step against torch.optim.Muon and Moonlight's formula, the blocks
(HF tensors inside megatron's fused ones), and the Muon/AdamW split on the real tiny model.

Moonlight's step is written out here from ``examples/toy_train.py`` (MoonshotAI/Moonlight):
sum momentum ``B <- mu B + g``, Nesterov ``U = g + mu B``, ``NS5`` on ``X / (||X|| + 1e-7)``,
``W <- W (1 - lr wd) - lr 0.2 sqrt(max(A, B)) NS5(U)``. Ours keeps ``(1 - mu)`` times that
momentum (torch's ``lerp``), so the two agree exactly in exact arithmetic and to bf16 precision
in bf16 (see ``megatron_vlm/optim/muon.py``).
"""

from __future__ import annotations

import dataclasses
import math
import types

import pytest
import torch

from megatron_vlm.optim.muon import WHOLE, BlockLayout, Muon, block_matrix, newton_schulz
from megatron_vlm.optim.param_groups import (
    build_param_groups,
    muon_layout,
    orthogonal_blocks,
    prefix_lr_mult,
)

MU, LR, WD = 0.95, 0.02, 0.1
SHAPES = [(96, 48), (48, 64), (64, 64), (384, 64), (16, 200)]
# Relative Frobenius error of one step's parameter change with the bf16 Newton-Schulz, measured
# 0.9-1.4% against the float64 iteration and 2.1-3.0% against Moonlight's bf16 form.
BF16_VS_EXACT = 0.03
BF16_VS_MOONLIGHT_BF16 = 0.06


# --------------------------------------------------------------------------- Moonlight


def moonlight_ns(g: torch.Tensor, steps: int = 5, dtype=torch.bfloat16) -> torch.Tensor:
    a, b, c = (3.4445, -4.7750, 2.0315)
    x = g.to(dtype)
    if g.size(0) > g.size(1):
        x = x.T
    x = x / (x.norm() + 1e-7)
    for _ in range(steps):
        m = x @ x.T
        bm = b * m + c * m @ m
        x = a * x + bm @ x
    return x.T if g.size(0) > g.size(1) else x


class MoonlightMuon:
    """Moonlight's Muon step for plain tensors (``nesterov`` and the NS dtype selectable)."""

    def __init__(self, params, nesterov=True, ns_dtype=torch.bfloat16, scale="moonlight"):
        self.params, self.bufs = params, [torch.zeros_like(p) for p in params]
        self.nesterov, self.ns_dtype, self.scale = nesterov, ns_dtype, scale

    @torch.no_grad()
    def step(self, grads):
        for p, g, buf in zip(self.params, grads, self.bufs):
            buf.mul_(MU).add_(g)
            u = g.add(buf, alpha=MU) if self.nesterov else buf
            o = moonlight_ns(u, dtype=self.ns_dtype)
            a, b = p.shape
            ratio = 0.2 * math.sqrt(max(a, b)) if self.scale == "moonlight" else 1.0
            p.mul_(1 - LR * WD)
            p.add_(o.to(p.dtype), alpha=-LR * ratio)


def grads_for(shapes, steps, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [[torch.randn(*s, generator=g) for s in shapes] for _ in range(steps)]


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# --------------------------------------------------------------------------- single matrix


@pytest.mark.parametrize("shape", SHAPES + [(1, 7)])
def test_newton_schulz_is_torchs_bit_for_bit(shape):
    from torch.optim._muon import _zeropower_via_newtonschulz

    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    ours = newton_schulz(x)
    theirs = _zeropower_via_newtonschulz(x.clone(), (3.4445, -4.7750, 2.0315), 5, 1e-7)
    assert ours.dtype == torch.bfloat16
    assert torch.equal(ours, theirs)


def test_whole_matrix_step_is_torch_muon_bit_for_bit():
    torch.manual_seed(0)
    ours_p = [torch.nn.Parameter(torch.randn(*s)) for s in SHAPES]
    ref_p = [torch.nn.Parameter(p.detach().clone()) for p in ours_p]
    ours = Muon(ours_p, lr=LR, weight_decay=WD, momentum=MU)
    ref = torch.optim.Muon(ref_p, lr=LR, weight_decay=WD, momentum=MU,
                           adjust_lr_fn="match_rms_adamw")
    for grads in grads_for(SHAPES, steps=3):
        for p, q, g in zip(ours_p, ref_p, grads):
            p.grad, q.grad = g.clone(), g.clone()
        ours.step()
        ref.step()
    for p, q in zip(ours_p, ref_p):
        assert torch.equal(p, q)
        assert torch.equal(ours.state[p]["momentum_buffer"], ref.state[q]["momentum_buffer"])


def _run_ours_and_moonlight(ns_dtype, moonlight_ns_dtype, steps=3, **moonlight_kw):
    torch.manual_seed(0)
    start = [torch.randn(*s) for s in SHAPES]
    ours_p = [torch.nn.Parameter(p.clone()) for p in start]
    ml_p = [p.clone() for p in start]
    ours = Muon(ours_p, lr=LR, weight_decay=WD, momentum=MU, ns_dtype=ns_dtype)
    ml = MoonlightMuon(ml_p, ns_dtype=moonlight_ns_dtype, **moonlight_kw)
    errors = []
    for grads in grads_for(SHAPES, steps):
        before = [p.detach().clone() for p in ours_p]
        for p, g in zip(ours_p, grads):
            p.grad = g.clone()
        ours.step()
        ml_before = [p.clone() for p in ml_p]
        ml.step(grads)
        for p, b, q, qb in zip(ours_p, before, ml_p, ml_before):
            errors.append(rel(p.detach() - b, q - qb))
        # Next step starts from the same parameters, so errors do not compound.
        with torch.no_grad():
            for p, q in zip(ours_p, ml_p):
                p.copy_(q)
    return ours, ours_p, ml, errors


def test_momentum_is_one_minus_mu_times_moonlights():
    ours, ours_p, ml, _ = _run_ours_and_moonlight(torch.float64, torch.float64)
    for p, buf in zip(ours_p, ml.bufs):
        torch.testing.assert_close(ours.state[p]["momentum_buffer"], (1 - MU) * buf,
                                   rtol=1e-5, atol=1e-7)


def test_exact_arithmetic_equals_moonlight():
    """With the iteration in float64 on both sides, the remaining differences are fp32 rounding:
    the (1 - mu) momentum scale is invisible after the Frobenius normalisation."""
    _, _, _, errors = _run_ours_and_moonlight(torch.float64, torch.float64)
    assert max(errors) < 1e-5


def test_bf16_step_within_stated_tolerance_of_moonlight():
    _, _, _, vs_exact = _run_ours_and_moonlight(torch.bfloat16, torch.float64)
    _, _, _, vs_bf16 = _run_ours_and_moonlight(torch.bfloat16, torch.bfloat16)
    assert max(vs_exact) < BF16_VS_EXACT, vs_exact
    assert max(vs_bf16) < BF16_VS_MOONLIGHT_BF16, vs_bf16
    assert min(vs_exact) > 1e-3  # bf16 is really in play (the tolerance is not vacuous)
    # Controls: plain momentum or a missing RMS scale are far outside the tolerance.
    _, _, _, no_nesterov = _run_ours_and_moonlight(torch.bfloat16, torch.float64,
                                                   nesterov=False)
    _, _, _, no_scale = _run_ours_and_moonlight(torch.bfloat16, torch.float64, scale="none")
    assert max(no_nesterov) > 5 * BF16_VS_EXACT
    assert min(no_scale) > 5 * BF16_VS_EXACT


def test_bf16_params_without_nesterov_keep_the_momentum_buffer():
    """``x.to(bf16)`` is ``x`` for a bf16 buffer: an in-place normalisation would overwrite it."""
    p = torch.nn.Parameter(torch.randn(32, 16).bfloat16())
    g = torch.randn(32, 16).bfloat16()
    opt = Muon([p], lr=LR, momentum=MU, nesterov=False)
    p.grad = g.clone()
    opt.step()
    torch.testing.assert_close(opt.state[p]["momentum_buffer"], torch.lerp(torch.zeros_like(g),
                               g, 1 - MU))


# --------------------------------------------------------------------------- blocks


def test_blocks_step_like_separate_matrices():
    """A [gate; up] parameter and a per-group stacked qkv parameter step exactly like torch's
    Muon on the separate HF matrices."""
    torch.manual_seed(3)
    gate_up = torch.randn(2 * 24, 40)
    groups, q, hd = 2, 16, 8  # two query groups of two q heads (head dim 8), k and v 8 each
    qkv = torch.randn(groups * (q + 2 * hd), 40)
    fused = [torch.nn.Parameter(gate_up.clone()), torch.nn.Parameter(qkv.clone())]
    layout_gu = BlockLayout(split_sizes=(24, 24))
    layout_qkv = BlockLayout(num_groups=groups, group_shape=(q + 2 * hd, 40),
                             split_sizes=(q, hd, hd), per_group=False)
    ours = Muon([{"params": [fused[0]], "muon_layout": layout_gu.to_tuple()},
                 {"params": [fused[1]], "muon_layout": layout_qkv.to_tuple()}],
                lr=LR, weight_decay=WD, momentum=MU)

    def qkv_parts(t):  # written out: rows of group g are [q_g; k_g; v_g]
        per = t.view(groups, q + 2 * hd, -1)
        return [per[:, :q].reshape(-1, t.shape[1]), per[:, q:q + hd].reshape(-1, t.shape[1]),
                per[:, q + hd:].reshape(-1, t.shape[1])]

    separate = [torch.nn.Parameter(x.clone()) for x in
                [gate_up[:24], gate_up[24:], *qkv_parts(qkv)]]
    ref = torch.optim.Muon(separate, lr=LR, weight_decay=WD, momentum=MU,
                           adjust_lr_fn="match_rms_adamw")
    for _step in range(2):
        g_gu, g_qkv = torch.randn_like(gate_up), torch.randn_like(qkv)
        fused[0].grad, fused[1].grad = g_gu, g_qkv
        for p, g in zip(separate, [g_gu[:24], g_gu[24:], *qkv_parts(g_qkv)]):
            p.grad = g.clone()
        ours.step()
        ref.step()
    assert torch.equal(fused[0].detach(), torch.cat([separate[0], separate[1]]).detach())
    for got, want in zip(qkv_parts(fused[1].detach()), separate[2:]):
        assert torch.equal(got, want.detach())
    # And not like one Muon step on the fused matrix.
    whole = torch.nn.Parameter(gate_up.clone())
    one = Muon([whole], lr=LR, weight_decay=WD, momentum=MU)
    whole.grad = g_gu
    one.step()
    assert not torch.allclose(whole, fused[0], atol=1e-3)


def test_layout_rejects_a_tensor_it_does_not_tile():
    with pytest.raises(ValueError, match="does not tile"):
        BlockLayout(num_groups=3, group_shape=(4, 4)).views(torch.zeros(8, 4))
    with pytest.raises(ValueError, match="split_sizes"):
        BlockLayout(split_sizes=(3, 3)).views(torch.zeros(8, 4))
    with pytest.raises(ValueError, match="does not tile"):
        Muon([{"params": [torch.nn.Parameter(torch.zeros(8, 4))],
                   "muon_layout": BlockLayout(num_groups=3, group_shape=(4, 4)).to_tuple()}])


def test_state_dict_loads_with_weights_only(tmp_path):
    p = torch.nn.Parameter(torch.randn(16, 8))
    opt = Muon([{"params": [p], "muon_layout": BlockLayout(split_sizes=(8, 8)).to_tuple()}])
    p.grad = torch.randn(16, 8)
    opt.step()
    torch.save(opt.state_dict(), tmp_path / "opt.pt")
    state = torch.load(tmp_path / "opt.pt", weights_only=True)
    assert BlockLayout.from_tuple(state["param_groups"][0]["muon_layout"]) == BlockLayout(
        split_sizes=(8, 8))
    fresh = Muon([{"params": [p], "muon_layout": BlockLayout(split_sizes=(8, 8)).to_tuple()}])
    fresh.load_state_dict(state)
    assert torch.equal(fresh.state[p]["momentum_buffer"], opt.state[p]["momentum_buffer"])


# --------------------------------------------------------------------------- megatron names


def test_grouped_mlp_layouts_are_hf_experts():
    """Legacy GroupedMLP: ``weight1 [H, E*2F]`` viewed (E, H, 2F), ``weight2 [E*F, H]`` viewed
    (E, F, H) (megatron ``experts.py`` GroupedMLP.forward); built here from HF per-expert
    gate/up/down, the blocks are each expert's gate^T, up^T and down^T."""
    experts, hidden, ffn = 3, 8, 5
    g = torch.Generator().manual_seed(4)
    gate = torch.randn(experts, ffn, hidden, generator=g)  # HF [F, H] per expert
    up = torch.randn(experts, ffn, hidden, generator=g)
    down = torch.randn(experts, hidden, ffn, generator=g)
    w1 = torch.cat([gate.transpose(1, 2), up.transpose(1, 2)], dim=2).reshape(hidden, -1)
    w2 = down.transpose(1, 2).reshape(experts * ffn, hidden)
    cfg = types.SimpleNamespace(moe_ffn_hidden_size=ffn, gated_linear_unit=True)
    b1 = orthogonal_blocks("decoder.layers.1.mlp.experts.weight1", w1, cfg)
    b2 = orthogonal_blocks("decoder.layers.1.mlp.experts.weight2", w2, cfg)
    assert len(b1) == 2 * experts and len(b2) == experts
    for e in range(experts):
        assert torch.equal(b1[2 * e], gate[e].T) and torch.equal(b1[2 * e + 1], up[e].T)
        assert torch.equal(b2[e], down[e].T)
    # TEGroupedMLP keeps one weight per expert: weight{e} is [2F, H] = [gate; up].
    te = torch.cat([gate[1], up[1]])
    blocks = orthogonal_blocks("decoder.layers.1.mlp.experts.linear_fc1.weight1", te, cfg)
    assert [torch.equal(b, w) for b, w in zip(blocks, [gate[1], up[1]])] == [True, True]
    assert muon_layout("decoder.layers.1.mlp.experts.linear_fc2.weight1", down[1], cfg) == WHOLE


def test_tensor_parallel_shards_are_refused():
    w = torch.nn.Parameter(torch.zeros(8, 4))
    w.tensor_model_parallel = True
    cfg = types.SimpleNamespace(tensor_model_parallel_size=2, expert_tensor_parallel_size=1,
                                gated_linear_unit=True)
    with pytest.raises(NotImplementedError, match="tensor-parallel shard"):
        muon_layout("decoder.layers.0.mlp.linear_fc1.weight", w, cfg)
    # Routed experts follow the expert TP size.
    assert len(orthogonal_blocks("decoder.layers.1.mlp.experts.local_experts.0.linear_fc1.weight",
                                 w, cfg)) == 2


def test_fused_qkv_layout_matches_megatron_attention(megatron_groups):
    """GQA ``linear_qkv`` (4 heads, 2 query groups): x @ block^T equals megatron's own q, k, v
    from ``get_query_key_value_tensors``."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
    from megatron.core.transformer.spec_utils import build_module
    from megatron.core.transformer.transformer_config import TransformerConfig

    from megatron_vlm.models.attention import PackedSelfAttention

    cfg = TransformerConfig(num_layers=1, hidden_size=32, num_attention_heads=4,
                            num_query_groups=2, kv_channels=8, use_cpu_initialization=True,
                            add_bias_linear=False, add_qkv_bias=False)
    spec = get_gpt_layer_local_spec().submodules.self_attention
    spec = dataclasses.replace(spec, submodules=dataclasses.replace(
        spec.submodules, core_attention=PackedSelfAttention))
    attn = build_module(spec, config=cfg, layer_number=1)
    w = attn.linear_qkv.weight
    q_blk, k_blk, v_blk = (block_matrix(b) for b in orthogonal_blocks(
        "vision_model.decoder.layers.0.self_attention.linear_qkv.weight", w, cfg))
    assert (q_blk.shape, k_blk.shape, v_blk.shape) == ((32, 32), (16, 32), (16, 32))
    x = torch.randn(5, 1, 32)
    with torch.no_grad():
        q, k, v = attn.get_query_key_value_tensors(x)
    for got, blk in ((q, q_blk), (k, k_blk), (v, v_blk)):
        torch.testing.assert_close(got.reshape(5, 1, -1), x @ blk.T, atol=1e-5, rtol=0)


@pytest.fixture(scope="module")
def tiny_model(megatron_groups):
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from megatron_vlm.config import ParallelConfig
    from megatron_vlm.models.llm import build_llm
    from megatron_vlm.recipes.tiny import tiny_llm

    torch.manual_seed(0)
    model_parallel_cuda_manual_seed(0)
    return build_llm(tiny_llm(vocab_size=128), ParallelConfig())


def expected_assignment(name: str, shape: tuple[int, ...]):
    """(optimizer, weight decay?, block shapes) for the tiny recipe, written out by hand."""
    if name in ("embedding.word_embeddings.weight", "output_layer.weight"):
        return "adamw", True, None
    if len(shape) == 1:  # RMSNorm weights (no biases in this model)
        return "adamw", False, None
    if name.endswith("linear_fc1.weight"):
        half = shape[0] // 2
        return "muon", True, [(half, shape[1])] * 2
    return "muon", True, [shape]  # MLA projections, linear_proj, fc2, router


def test_tiny_model_groups(tiny_model):
    groups = build_param_groups(tiny_model, lr=1e-3, min_lr=1e-4, weight_decay=WD)
    seen = {}
    for kind, gs in (("muon", groups.muon), ("adamw", groups.adamw)):
        for g in gs:
            for name, p in zip(g["param_names"], g["params"]):
                assert name not in seen
                seen[name] = (kind, g["wd_mult"] == 1.0,
                              [tuple(block_matrix(b).shape) for b in BlockLayout.from_tuple(
                                  g["muon_layout"]).views(p)] if kind == "muon" else None)
    params = dict(tiny_model.named_parameters())
    assert set(seen) == set(params)
    for name, p in params.items():
        assert seen[name] == expected_assignment(name, tuple(p.shape)), name
    names = set(params)
    assert {"decoder.layers.1.mlp.router.weight", "decoder.layers.0.mlp.linear_fc1.weight",
            "decoder.layers.1.mlp.experts.local_experts.7.linear_fc1.weight",
            "decoder.layers.1.mlp.shared_experts.linear_fc1.weight"} <= names
    # The expert bias is a buffer: in no optimizer group.
    assert "decoder.layers.1.mlp.router.expert_bias" in dict(tiny_model.named_buffers())
    assert not any("expert_bias" in n for n in seen)
    for g in groups.muon + groups.adamw:
        assert g["max_lr"] == g["lr"] == 1e-3 and g["min_lr"] == 1e-4
        assert g["weight_decay"] == WD * g["wd_mult"]


def test_fc1_blocks_are_gate_then_up(tiny_model):
    """The [gate; up] split is the one megatron's MLP computes with: silu(x gate^T) * (x up^T)."""
    mlp = tiny_model.decoder.layers[0].mlp
    gate, up = orthogonal_blocks("decoder.layers.0.mlp.linear_fc1.weight",
                                 mlp.linear_fc1.weight, tiny_model.config)
    assert gate.data_ptr() == mlp.linear_fc1.weight.data_ptr()  # views, not copies
    x = torch.randn(3, 1, 64)
    with torch.no_grad():
        out, _ = mlp(x)
        ref = (torch.nn.functional.silu(x @ gate.T) * (x @ up.T)) @ mlp.linear_fc2.weight.T
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=0)


def test_router_choice_lr_hook_and_frozen(tiny_model):
    mult = prefix_lr_mult({"decoder.layers.0.": 0.5, "decoder.layers.0.mlp.": 0.25})
    frozen = tiny_model.decoder.layers[2].mlp.router.weight
    frozen.requires_grad_(False)
    try:
        groups = build_param_groups(tiny_model, lr=1.0, min_lr=0.1, weight_decay=WD,
                                    lr_mult=mult, router_in_muon=False)
    finally:
        frozen.requires_grad_(True)
    where = {n: (kind, g) for kind, gs in (("muon", groups.muon), ("adamw", groups.adamw))
             for g in gs for n in g["param_names"]}
    kind, g = where["decoder.layers.1.mlp.router.weight"]
    assert kind == "adamw" and g["wd_mult"] == 1.0
    assert "decoder.layers.2.mlp.router.weight" not in where
    assert where["decoder.layers.0.self_attention.linear_proj.weight"][1]["max_lr"] == 0.5
    assert where["decoder.layers.0.mlp.linear_fc2.weight"][1]["max_lr"] == 0.25
    assert where["decoder.layers.0.mlp.linear_fc2.weight"][1]["min_lr"] == 0.025
    assert where["decoder.layers.1.self_attention.linear_proj.weight"][1]["max_lr"] == 1.0


def test_muon_and_adamw_train_the_tiny_model(tiny_model):
    """Both optimizers built from the groups run on megatron's parameters and lower the loss on
    a fixed batch (a smoke test of the wiring, not of convergence)."""
    state = {k: v.clone() for k, v in tiny_model.state_dict().items() if torch.is_tensor(v)}
    groups = build_param_groups(tiny_model, lr=2e-2, min_lr=2e-3, weight_decay=WD)
    muon = Muon(groups.muon, lr=2e-2, weight_decay=WD)
    adamw = torch.optim.AdamW(groups.adamw, lr=2e-2, betas=(0.9, 0.95), eps=1e-8)
    ids = torch.randint(0, 128, (2, 32), generator=torch.Generator().manual_seed(5))
    losses = []
    try:
        for _ in range(4):
            logits = tiny_model(ids, None, None)
            loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 128),
                                                     ids[:, 1:].reshape(-1))
            muon.zero_grad()
            adamw.zero_grad()
            loss.backward()
            muon.step()
            adamw.step()
            losses.append(loss.item())
    finally:
        tiny_model.load_state_dict(state, strict=False)
        tiny_model.zero_grad(set_to_none=True)
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
