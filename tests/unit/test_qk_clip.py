"""QK-Clip on the tiny MLA model: after the clip, every logit of a clipped head is scaled by
exactly eta = tau / S (so its max is tau), other heads are untouched, and the shared rope key and V
are never modified; against megatron-core's own ``MLASelfAttention.clip_qk``; fp32 master weights.

Logits are recomputed here in float64 from the q and k the attention really used (captured with a
hook on the core attention), with the causal mask written out: independent of the recording code
and of the clip.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch

from megatron_vlm.optim.qk_clip import (
    all_reduce_max_,
    apply_qk_clip,
    clip_mla_,
    mla_attentions,
    qk_clip_eta,
)

TAU = 100.0
BOOST = {1: 30.0, 3: 8.0}  # q rows of head 1 x30 (max logit ~200), head 3 x8 (~60) in layers 1, 2
UNBOOSTED_LAYER = 2  # 0-based: the third layer keeps init-scale logits (~7)


def build_model(q_lora: int | None, **overrides):
    """The tiny recipe's LLM (3 MLA layers, 4 heads, nope 16 / rope 8 / v 16), fp32, with some
    heads' query rows boosted so their max logits exceed tau."""
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from megatron_vlm.config import ParallelConfig
    from megatron_vlm.models.llm import build_llm
    from megatron_vlm.recipes.tiny import tiny_llm

    llm = dataclasses.replace(tiny_llm(vocab_size=128), init_method_std=0.2, q_lora_rank=q_lora,
                              **{"qk_clip": True, **overrides})
    torch.manual_seed(0)
    model_parallel_cuda_manual_seed(0)
    model = build_llm(llm, ParallelConfig()).eval()
    with torch.no_grad():
        for i, attn in enumerate(mla_attentions(model)):
            if i == UNBOOSTED_LAYER:
                continue
            per_head = q_weight(attn).view(llm.num_attention_heads, -1, q_weight(attn).shape[1])
            for head, factor in BOOST.items():
                per_head[head] *= factor
    return model, llm


def q_weight(attn) -> torch.nn.Parameter:
    return (attn.linear_q_proj if attn.config.q_lora_rank is None else attn.linear_q_up_proj).weight


def batches() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randint(0, 128, (2, 24), generator=g) for _ in range(2)]  # two micro-batches


def run_and_capture(model, micro_batches):
    """Forward every micro-batch; per layer, the attention input and the core attention's q, k,
    v of each micro-batch."""
    captured = {}

    def grab(key, what):
        def hook(module, args, kwargs):
            captured.setdefault((key, what), []).append(
                tuple(a.detach().clone() for a in args[:3] if torch.is_tensor(a)))
        return hook

    handles = []
    for i, attn in enumerate(mla_attentions(model)):
        handles.append(attn.register_forward_pre_hook(grab(i, "input"), with_kwargs=True))
        handles.append(attn.core_attention.register_forward_pre_hook(grab(i, "qkv"),
                                                                     with_kwargs=True))
    with torch.no_grad():
        for ids in micro_batches:
            model(ids, None, None)
    for h in handles:
        h.remove()
    return captured


def reference_logits(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """``[b, h, s, s]`` causal logits in float64 (masked entries -inf) from sbhd q, k."""
    logits = torch.einsum("sbhd,tbhd->bhst", q.double(), k.double()) * scale
    s = q.shape[0]
    future = torch.ones(s, s, dtype=torch.bool).triu(1)
    return logits.masked_fill(future, float("-inf"))


def reference_max(qkv_list, scale) -> torch.Tensor:
    return torch.stack([reference_logits(q, k, scale).amax(dim=(0, 2, 3))
                        for q, k, _ in qkv_list]).amax(dim=0)


# --------------------------------------------------------------------------- tests


def test_eta_rule():
    s = torch.tensor([50.0, 100.0, 200.0, 400.0, -3.0, 0.0])
    torch.testing.assert_close(qk_clip_eta(s, TAU), torch.tensor([1, 1, 0.5, 0.25, 1, 1.0]))


@pytest.mark.parametrize("q_lora", [48, None], ids=["q_lora", "q_proj"])
def test_clip_caps_logits_at_tau(megatron_groups, q_lora):
    model, llm = build_model(q_lora)
    attns = mla_attentions(model)
    mbs = batches()
    before = run_and_capture(model, mbs)
    weights = {k: v.detach().clone() for k, v in model.named_parameters()}

    # The recorded maxima are the max over both micro-batches of the legal logits.
    expected_s = [reference_max(before[(i, "qkv")], a.softmax_scale) for i, a in enumerate(attns)]
    for a, s in zip(attns, expected_s):
        torch.testing.assert_close(a.core_attention.current_max_attn_logits.double(), s,
                                   rtol=1e-5, atol=1e-5)
    over = [s > TAU for s in expected_s]
    assert [o.tolist() for o in over] == [[False, True, False, False]] * 2 + [[False] * 4]
    assert all(s[3] < TAU for s in expected_s)  # head 3 is boosted but stays under tau

    stats = apply_qk_clip(model)

    # Logged values: per-layer per-head maxima and the heads clipped.
    for a, s, o in zip(attns, expected_s, over):
        assert stats.max_logits[a.layer_number] == pytest.approx(s.tolist(), rel=1e-5)
        assert stats.heads_clipped[a.layer_number] == int(o.sum())
        assert a.core_attention.current_max_attn_logits is None  # reset for the next step
    assert stats.max_logit == pytest.approx(max(s.max().item() for s in expected_s), rel=1e-5)
    assert stats.num_heads_clipped == 2

    # Re-run each layer's attention on the inputs it had: each head's logits scale by eta.
    after = {i: [] for i in range(len(attns))}
    for i, a in enumerate(attns):
        hook = a.core_attention.register_forward_pre_hook(
            lambda m, args, kw, out=after[i]: out.append(tuple(x.detach().clone()
                                                               for x in args[:3])),
            with_kwargs=True)
        with torch.no_grad():
            for (x, *_) in before[(i, "input")]:
                a(x, None)
        hook.remove()
    for i, a in enumerate(attns):
        eta = torch.where(over[i], TAU / expected_s[i], torch.ones_like(expected_s[i]))
        for (q0, k0, v0), (q1, k1, v1) in zip(before[(i, "qkv")], after[i]):
            l0 = reference_logits(q0, k0, a.softmax_scale)
            l1 = reference_logits(q1, k1, a.softmax_scale)
            legal = torch.isfinite(l0)
            ratio = eta[None, :, None, None].expand_as(l0)
            torch.testing.assert_close(l1[legal], l0[legal] * ratio[legal], rtol=1e-5, atol=1e-4)
            assert torch.equal(v1, v0)  # V untouched
            rope = llm.qk_rope_head_dim
            assert torch.equal(k1[..., -rope:], k0[..., -rope:])  # shared rope key untouched
        s_after = reference_max(after[i], a.softmax_scale)
        assert (s_after <= TAU * (1 + 1e-5)).all()
        torch.testing.assert_close(s_after[over[i]], torch.full_like(s_after[over[i]], TAU),
                                   rtol=1e-5, atol=0)
        torch.testing.assert_close(s_after[~over[i]], expected_s[i][~over[i]], rtol=1e-6, atol=0)

    # Weights: only q and k_nope rows of clipped heads changed.
    heads, nope, _v_dim = llm.num_attention_heads, llm.qk_nope_head_dim, llm.v_head_dim
    for name, w in model.named_parameters():
        layer = int(name.split(".")[2]) if name.startswith("decoder.layers.") else None
        q_name = "linear_q_proj" if q_lora is None else "linear_q_up_proj"
        if layer is None or not (name.endswith((f"{q_name}.weight", "linear_kv_up_proj.weight"))):
            assert torch.equal(w, weights[name]), name
            continue
        old = weights[name].view(heads, -1, w.shape[1])
        new = w.detach().view(heads, -1, w.shape[1])
        for h in range(heads):
            if not over[layer][h]:
                assert torch.equal(new[h], old[h]), (name, h)
            elif "kv_up" in name:
                assert torch.equal(new[h, nope:], old[h, nope:])  # V rows
                root = math.sqrt(eta_of(expected_s[layer][h]))
                torch.testing.assert_close(new[h, :nope], old[h, :nope] * root, rtol=1e-6,
                                           atol=0)
            else:
                e = eta_of(expected_s[layer][h])
                torch.testing.assert_close(new[h, :nope], old[h, :nope] * math.sqrt(e),
                                           rtol=1e-6, atol=0)
                torch.testing.assert_close(new[h, nope:], old[h, nope:] * e, rtol=1e-6, atol=0)


def eta_of(s: torch.Tensor) -> float:
    return min(TAU / float(s), 1.0)


def test_same_as_megatron_clip_qk_and_reduction_over_a_group(megatron_groups):
    """Ours (with the MAX all-reduce over the world-size-1 gloo group) and megatron-core's
    ``MLASelfAttention.clip_qk`` give the same weights for positive max logits."""
    import torch.distributed as dist

    ours, _ = build_model(48)
    theirs, _ = build_model(48)
    for model in (ours, theirs):
        run_and_capture(model, batches())
    recorded = [a.core_attention.current_max_attn_logits.clone() for a in mla_attentions(theirs)]
    stats = apply_qk_clip(ours, group=dist.group.WORLD)
    with torch.no_grad():
        for a in mla_attentions(theirs):
            a.clip_qk()
    assert stats.num_heads_clipped == 2
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=0, msg=name)
    for a, s in zip(mla_attentions(ours), recorded):
        assert stats.max_logits[a.layer_number] == s.tolist()


def test_all_reduce_max_single_process(megatron_groups):
    import torch.distributed as dist

    a, b = torch.tensor([1.0, 5.0]), torch.tensor([[3.0], [-2.0]])
    all_reduce_max_([a, b], dist.group.WORLD)
    assert a.tolist() == [1.0, 5.0] and b.tolist() == [[3.0], [-2.0]]


def test_negative_max_logit_head_left_alone(megatron_groups):
    """A head whose max logit is negative while another head exceeds tau: we leave it alone;
    megatron 0.16.1's ``clamp(tau / S, max=1)`` gives eta < 0 and ``eta ** 0.5`` = NaN rows."""
    ours, _ = build_model(48)
    theirs, _ = build_model(48)
    s = torch.tensor([-3.0, 200.0, 50.0, 7.0])
    a_ours, a_theirs = mla_attentions(ours)[0], mla_attentions(theirs)[0]
    before = q_weight(a_ours).detach().clone()
    clip_mla_(a_ours, qk_clip_eta(s, TAU))
    after = q_weight(a_ours).detach().view(4, 24, -1)
    assert torch.isfinite(after).all()
    assert torch.equal(after[0], before.view(4, 24, -1)[0])
    a_theirs.core_attention.current_max_attn_logits = s.clone()
    with torch.no_grad():
        a_theirs.clip_qk()
    # Upstream behaviour (megatron-core 0.16.1): q_nope rows NaN, q_rope rows x (tau / -3).
    head0 = q_weight(a_theirs).detach().view(4, 24, -1)[0]
    assert torch.isnan(head0[:16]).all()
    torch.testing.assert_close(head0[16:], before.view(4, 24, -1)[0, 16:] * (TAU / -3.0))


def test_fp32_master_weights_clipped_then_cast(megatron_groups):
    """bf16 model weights with fp32 ``main_param`` (megatron's Float16 optimizer layout): the
    master rows are scaled in fp32, the bf16 weight is the master's cast."""
    model, _ = build_model(None)
    attn = mla_attentions(model)[0]
    masters = {}
    for w in (q_weight(attn), attn.linear_kv_up_proj.weight):
        masters[w] = w.detach().clone()
        w.main_param = masters[w].clone()
        w.data = w.data.bfloat16()
    eta = qk_clip_eta(torch.tensor([7.0, 400.0, 20.0, 125.0]), TAU)  # heads 1 and 3 clipped
    clip_mla_(attn, eta)
    nope = attn.config.qk_head_dim
    for w, old in masters.items():
        main = w.main_param.view(4, -1, w.shape[1])
        old = old.view(4, -1, w.shape[1])
        for h in range(4):
            e = float(eta[h])
            scale = torch.ones(main.shape[1], dtype=torch.float64)
            scale[:nope] = math.sqrt(e)
            if w is q_weight(attn):
                scale[nope:] = e
            expected = (old[h].double() * scale[:, None]).float()
            if e == 1.0:
                assert torch.equal(main[h], old[h])
            else:  # one fp32 rounding of the scale: <= 2 ulp
                torch.testing.assert_close(main[h], expected, rtol=2.5e-7, atol=0)
        assert w.dtype == torch.bfloat16 and torch.equal(w.detach(), w.main_param.bfloat16())

    # A flat DistributedOptimizer shard holds no whole rows: refused.
    w = attn.linear_kv_up_proj.weight
    w.main_param = w.main_param.view(-1)[:100]
    w.main_param_sharded = True
    with pytest.raises(RuntimeError, match="whole per-head rows"):
        clip_mla_(attn, eta)


def test_log_only_layers_are_reported_not_clipped(megatron_groups):
    model, _ = build_model(48, qk_clip=False, log_max_attention_logit=True)
    weights = {k: v.detach().clone() for k, v in model.named_parameters()}
    run_and_capture(model, batches())
    stats = apply_qk_clip(model)
    assert stats.max_logit > TAU and stats.num_heads_clipped == 0
    for k, v in model.named_parameters():
        assert torch.equal(v, weights[k])
    with pytest.raises(RuntimeError, match="recorded no max logits"):
        apply_qk_clip(model)  # the recording was reset
