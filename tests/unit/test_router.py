"""PaddingFreeTopKRouter: DeepSeek-V3 sigmoid routing with expert bias, against a rule written here.

The reference (``reference_routing``) follows the DeepSeek-V3 paper / ``inference/model.py`` Gate:
scores = sigmoid(logits); experts are *selected* by scores + expert_bias (optionally within the
best groups, a group scoring the sum of its top-2 biased scores); the combine weights are the
*unbiased* scores of the selected experts, normalised to sum 1, times the routed scaling factor.
Padding tokens (``padding_mask`` True, megatron's code convention) go to no expert.
"""

from __future__ import annotations

import pytest
import torch
from megatron.core.transformer.transformer_config import TransformerConfig

HIDDEN = 8
SCALING = 2.5
RATE = 1e-3


def router_config(num_experts: int = 16, topk: int = 4, groups: tuple[int, int] | None = None):
    return TransformerConfig(
        num_layers=1, hidden_size=HIDDEN, num_attention_heads=2, add_bias_linear=False,
        num_moe_experts=num_experts, moe_router_topk=topk,
        moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True,
        moe_router_bias_update_rate=RATE, moe_router_topk_scaling_factor=SCALING,
        moe_router_load_balancing_type="none", moe_router_dtype="fp32",
        moe_router_num_groups=groups[0] if groups else None,
        moe_router_group_topk=groups[1] if groups else None,
        moe_router_pre_softmax=False, moe_router_fusion=False, moe_aux_loss_coeff=0.0,
    )


def make_router(config: TransformerConfig, seed: int = 0):
    """A router with hand-set weight and expert bias (bias large enough to change choices)."""
    from megatron.core.transformer.moe.moe_utils import get_default_pg_collection

    from megatron_vlm.models.router import PaddingFreeTopKRouter

    router = PaddingFreeTopKRouter(config, pg_collection=get_default_pg_collection())
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        router.weight.copy_(torch.randn(config.num_moe_experts, HIDDEN, generator=g))
        router.expert_bias.copy_(0.3 * torch.randn(config.num_moe_experts, generator=g))
    return router


def reference_routing(x, weight, bias, topk, groups=None):
    """``x [T, H]`` -> ``(probs [T, E], routing_map [T, E])`` by DeepSeek-V3's rule, row by row."""
    num_tokens, num_experts = x.shape[0], weight.shape[0]
    probs = torch.zeros(num_tokens, num_experts, dtype=torch.float64)
    routing_map = torch.zeros(num_tokens, num_experts, dtype=torch.bool)
    for t in range(num_tokens):
        logits = [sum(float(x[t, h]) * float(weight[e, h]) for h in range(x.shape[1]))
                  for e in range(num_experts)]
        scores = torch.sigmoid(torch.tensor(logits, dtype=torch.float64))
        biased = scores + bias.double()
        candidates = list(range(num_experts))
        if groups is not None:
            num_groups, group_topk = groups
            size = num_experts // num_groups
            group_score = [
                sum(sorted(biased[gi * size : (gi + 1) * size].tolist(), reverse=True)[:2])
                for gi in range(num_groups)
            ]
            kept = sorted(range(num_groups), key=lambda gi: -group_score[gi])[:group_topk]
            candidates = [e for e in candidates if e // size in kept]
        chosen = sorted(candidates, key=lambda e: -float(biased[e]))[:topk]
        total = sum(float(scores[e]) for e in chosen)
        for e in chosen:
            routing_map[t, e] = True
            probs[t, e] = float(scores[e]) / total * SCALING
    return probs, routing_map


def route(router, x_sbh, padding_mask_sb=None):
    """Run the router the way megatron's MoELayer does: input ``[s, b, h]``, mask ``[s, b]``."""
    return router(x_sbh, padding_mask=padding_mask_sb)


# --------------------------------------------------------------------------- routing rule


@pytest.mark.parametrize("groups", [None, (4, 2)], ids=["plain", "group-limited-4-2"])
def test_sigmoid_topk_with_expert_bias_matches_deepseek_rule(megatron_groups, groups):
    config = router_config(num_experts=16, topk=4, groups=groups)
    router = make_router(config)
    x = torch.randn(12, 2, HIDDEN, generator=torch.Generator().manual_seed(1))
    probs, routing_map = route(router, x)

    x_flat = x.reshape(-1, HIDDEN)  # megatron flattens [s, b] s-major
    ref_probs, ref_map = reference_routing(x_flat, router.weight.detach(),
                                           router.expert_bias.detach(), 4, groups)
    assert routing_map.dtype == torch.bool and routing_map.shape == (24, 16)
    assert torch.equal(routing_map, ref_map)
    torch.testing.assert_close(probs.double(), ref_probs, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(probs.sum(-1).double(), torch.full((24,), SCALING,
                                                                  dtype=torch.float64))

    # The test can fail: the bias changes the selection of some tokens, and normalising the
    # *biased* scores would give other weights.
    no_bias_map = reference_routing(x_flat, router.weight.detach(), torch.zeros(16), 4, groups)[1]
    assert not torch.equal(no_bias_map, ref_map)
    if groups is not None:
        ungrouped = reference_routing(x_flat, router.weight.detach(),
                                      router.expert_bias.detach(), 4, None)[1]
        assert not torch.equal(ungrouped, ref_map)
        # At most group_topk groups per token.
        per_group = ref_map.view(24, 4, 4).any(-1).sum(-1)
        assert (per_group <= 2).all()


def test_topk_scaling_factor_and_top1(megatron_groups):
    """top-1 keeps the raw sigmoid score (no normalisation), times the scaling factor."""
    config = router_config(num_experts=8, topk=1)
    router = make_router(config, seed=3)
    x = torch.randn(5, 1, HIDDEN, generator=torch.Generator().manual_seed(4))
    probs, routing_map = route(router, x)
    logits = x.reshape(-1, HIDDEN).double() @ router.weight.detach().double().T
    chosen = (torch.sigmoid(logits) + router.expert_bias.double()).argmax(-1)
    expected = torch.zeros(5, 8, dtype=torch.float64)
    expected[torch.arange(5), chosen] = torch.sigmoid(logits)[torch.arange(5), chosen] * SCALING
    assert torch.equal(routing_map, expected > 0)
    torch.testing.assert_close(probs.double(), expected, atol=1e-6, rtol=1e-6)


# --------------------------------------------------------------------------- expert-bias update


def expected_bias_update(bias: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """Aux-loss-free balancing (DeepSeek-V3 §2.1.2): b_e += rate * sign(mean count - count_e)."""
    mean = sum(counts) / len(counts)
    step = [RATE if mean > c else -RATE if mean < c else 0.0 for c in counts]
    return bias + torch.tensor(step, dtype=bias.dtype)


def test_tokens_per_expert_and_bias_update(megatron_groups):
    from megatron.core.distributed.finalize_model_grads import _update_router_expert_bias

    config = router_config(num_experts=16, topk=4)
    router = make_router(config, seed=5).train()
    g = torch.Generator().manual_seed(6)
    batches = [torch.randn(7, 2, HIDDEN, generator=g) for _ in range(3)]  # 3 micro-batches
    counts = [0] * 16
    for x in batches:
        route(router, x)
        _, ref_map = reference_routing(x.reshape(-1, HIDDEN), router.weight.detach(),
                                       router.expert_bias.detach(), 4)
        for e in range(16):
            counts[e] += int(ref_map[:, e].sum())
    assert sum(counts) == 3 * 14 * 4
    assert router.local_tokens_per_expert.tolist() == [float(c) for c in counts]

    # Evaluation and recomputation (no grad) must not count.
    with torch.no_grad():
        route(router, batches[0])
    assert router.local_tokens_per_expert.tolist() == [float(c) for c in counts]

    bias_before = router.expert_bias.detach().clone()
    expected = expected_bias_update(bias_before, counts)
    assert len(set(counts)) > 1  # some experts over, some under the mean
    _update_router_expert_bias([router], config)
    torch.testing.assert_close(router.expert_bias, expected, atol=0, rtol=0)
    overloaded = torch.tensor(counts) > sum(counts) / 16
    assert (router.expert_bias[overloaded] < bias_before[overloaded]).all()


# --------------------------------------------------------------------------- padding


@pytest.mark.parametrize("seq_len", [5, 8], ids=["T!=E", "T==E"])
def test_padding_tokens_get_no_expert(megatron_groups, seq_len):
    """With T == E (16 tokens, 16 experts) megatron's own ``routing_map & ~padding_mask``
    broadcasts over the wrong axis; with T != E it raises. Both must count real tokens only."""
    config = router_config(num_experts=16, topk=4)
    router = make_router(config, seed=7).train()
    x = torch.randn(seq_len, 2, HIDDEN, generator=torch.Generator().manual_seed(8))
    padding = torch.zeros(seq_len, 2, dtype=torch.bool)  # [s, b], True = padding
    padding[seq_len - 2 :, 0] = True
    padding[1, 1] = True
    x[padding] = 50.0 * torch.randn_like(x[padding])  # garbage hidden states on padding

    probs, routing_map = route(router, x, padding)
    is_pad = padding.reshape(-1)
    assert not routing_map[is_pad].any()
    assert (probs[is_pad] == 0).all()

    ref_probs, ref_map = reference_routing(x.reshape(-1, HIDDEN), router.weight.detach(),
                                           router.expert_bias.detach(), 4)
    assert torch.equal(routing_map[~is_pad], ref_map[~is_pad])
    torch.testing.assert_close(probs[~is_pad].double(), ref_probs[~is_pad], atol=1e-6, rtol=1e-6)
    counts = ref_map[~is_pad].sum(0).float()
    assert torch.equal(router.local_tokens_per_expert, counts)
    assert router.local_tokens_per_expert.sum() == 4 * int((~is_pad).sum())

    # Real tokens route exactly as without a mask.
    router.local_tokens_per_expert.zero_()
    probs_nomask, map_nomask = route(router, x)
    assert torch.equal(map_nomask[~is_pad], routing_map[~is_pad])
    assert torch.equal(probs_nomask[~is_pad], probs[~is_pad])
    assert map_nomask[is_pad].any()  # without the mask, padding would have taken experts


# --------------------------------------------------------------------------- end to end


def test_tiny_model_experts_see_only_real_tokens(megatron_groups):
    """Packed THD forward of the tiny LLM with a padding mask: the routed experts of every MoE
    layer receive exactly topk x (real tokens); the bias counts agree; real logits are unchanged."""
    from megatron.core.packed_seq_params import PackedSeqParams
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from megatron_vlm.config import ParallelConfig
    from megatron_vlm.models.llm import build_llm
    from megatron_vlm.recipes.tiny import tiny_llm

    torch.manual_seed(0)
    model_parallel_cuda_manual_seed(0)
    llm = tiny_llm(vocab_size=128)
    model = build_llm(llm, ParallelConfig()).train()

    spans = [12, 8]  # doc 0 real [0, 10) of [0, 12); doc 1 real [12, 18) of [12, 20)
    seq = sum(spans)
    padding = torch.ones(1, seq, dtype=torch.bool)
    padding[0, 0:10] = False
    padding[0, 12:18] = False
    num_real = int((~padding).sum())
    cu = torch.tensor([0, 10, 16], dtype=torch.int32)
    cu_pad = torch.tensor([0, 12, 20], dtype=torch.int32)
    params = PackedSeqParams(qkv_format="thd", cu_seqlens_q=cu, cu_seqlens_kv=cu,
                             cu_seqlens_q_padded=cu_pad, cu_seqlens_kv_padded=cu_pad,
                             max_seqlen_q=12, max_seqlen_kv=12)
    ids = torch.randint(0, 128, (1, seq), generator=torch.Generator().manual_seed(9))

    moe_layers = [layer for layer in model.decoder.layers if hasattr(layer.mlp, "router")]
    assert len(moe_layers) == llm.num_layers - llm.num_dense_layers
    seen: dict[int, list[int]] = {}

    def grab(i):
        def hook(module, args):
            dispatched, tokens_per_expert = args[0], args[1]
            seen[i] = [int(dispatched.shape[0]), int(torch.as_tensor(tokens_per_expert).sum())]
        return hook

    handles = [layer.mlp.experts.register_forward_pre_hook(grab(i))
               for i, layer in enumerate(moe_layers)]
    try:
        logits = model(ids, None, None, packed_seq_params=params, padding_mask=padding)
    finally:
        for h in handles:
            h.remove()
    with torch.no_grad():
        logits_nomask = model(ids, None, None, packed_seq_params=params)

    expected = llm.moe_router_topk * num_real
    assert seen == {i: [expected, expected] for i in range(len(moe_layers))}
    for layer in moe_layers:
        assert layer.mlp.router.local_tokens_per_expert.sum() == expected
    # Padding is never attended, so dropping its experts leaves the real tokens' logits alone.
    real_pos = ~padding[0]
    torch.testing.assert_close(logits[0, real_pos].detach(), logits_nomask[0, real_pos],
                               atol=1e-5, rtol=0)
