"""The planner's memory for torch ``grouped_mm`` experts (``PlanInputs.torch_grouped_experts``):
one stacked copy of a layer's local expert weights, charged once per rank (it lives only while a
layer runs, ``models/experts.py`` ``GroupedExperts``), and the fc1 output kept per routed token
instead of the SwiGLU intermediates. Expected values from K2.5's shapes, not the planner's terms.
"""

from __future__ import annotations

import dataclasses

import pytest

from megatron_vlm.config.model import ModelConfig
from megatron_vlm.planning.activations import expert_stack_bytes
from megatron_vlm.planning.layouts import Layout, PlanInputs, evaluate, in_flight
from megatron_vlm.recipes.kimi import kimi_k25_llm

H, F, EXPERTS, TOPK = 7168, 2048, 384, 8  # K2.5


def test_k25_stack_is_the_issue_figure() -> None:
    """48 local experts at ep=8: fc1 ``2F x h`` + fc2 ``h x F`` each, bf16 = 4.2 GB."""
    llm = kimi_k25_llm()
    assert (llm.hidden_size, llm.moe_ffn_hidden_size, llm.num_experts) == (H, F, EXPERTS)
    assert expert_stack_bytes(llm, ep=8, etp=1) == 48 * 3 * F * H * 2 == 4_227_858_432
    assert expert_stack_bytes(llm, ep=8, etp=2) == 4_227_858_432 / 2
    assert expert_stack_bytes(dataclasses.replace(llm, num_experts=None), ep=8, etp=1) == 0


def test_grouped_experts_add_one_stack_per_rank_and_swap_the_expert_terms() -> None:
    """K2.5 LLM on 1,024 GPUs (tp8 pp16 ep8, no recompute): on every pipeline rank, torch
    grouped experts minus TE-style experts = one stack + (2kF - 4kF) bf16 per local token per
    MoE layer per micro-batch in flight. Retaining the stack per layer and micro-batch (the old
    path) would have added ``sum(in-flight x MoE layers)`` stacks instead."""
    llm = kimi_k25_llm()
    inputs = PlanInputs(model=ModelConfig(llm=llm, params_dtype="bf16"), num_gpus=1024,
                        seq_length=4096, global_batch_size=8192, optimizer="muon",
                        sharding="layerwise", recompute="none")
    lay = Layout(tp=8, pp=16, vpp=None, cp=1, ep=8, etp=1, dp=8)
    te = evaluate(inputs, lay)
    grouped = evaluate(dataclasses.replace(inputs, torch_grouped_experts=True), lay)
    assert te.stage_plan.layers_per_stage == grouped.stage_plan.layers_per_stage
    local_tokens = 4096 / 8
    stack = 48 * 3 * F * H * 2
    for rank, (a, b) in enumerate(zip(te.rank_memory, grouped.rank_memory)):
        assert a["params"] == b["params"] and a["optimizer_state"] == b["optimizer_state"]
        stages = [s for s in te.stage_plan.stages if s.pp_rank == rank]
        counts = in_flight(lay.pp, lay.vpp, rank, 8192 // lay.dp)
        moe = sum(c * sum(llm.moe_layer_freq[i] for i in s.layers)
                  for s, c in zip(stages, counts))
        expected = (stack if moe else 0) + moe * local_tokens * (2 - 4) * TOPK * F * 2
        assert b["activations"] - a["activations"] == pytest.approx(expected, rel=1e-9), rank
    assert max(m["total"] for m in grouped.rank_memory) < te.peak_memory + stack
