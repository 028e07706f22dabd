"""Pipeline stage planner: FLOPs per stage from independent formulas, the ViT on stage 0, an
optimal balance, megatron-readable splits, and impossible splits refused with reasons."""

from __future__ import annotations

import dataclasses
import itertools

import pytest

from megatron_vlm.config.model import ModelConfig
from megatron_vlm.config.parallel import layers_from_layout
from megatron_vlm.config.vision import kimi_projector_config, moonvit_config
from megatron_vlm.planning.costs import VisionBudget
from megatron_vlm.planning.stages import StagePlanError, plan_stages
from megatron_vlm.recipes.kimi import kimi_k25_llm, moonlight_llm
from megatron_vlm.training.flops import llm_flops_breakdown_per_token


def _vlm(llm) -> ModelConfig:
    return ModelConfig(llm=llm, vision=moonvit_config(),
                       projector=kimi_projector_config(llm.hidden_size), params_dtype="bf16")


def _bridge_vit_flops(vision, projector, patches: int, item: int) -> float:
    """Megatron-Bridge ``vit_flops_from_patch_stats`` written out (items of ``item`` patches,
    images: t=1), plus the patch convolution (2 * 3 * 14^2 * h per patch, forward x 3)."""
    h, f, depth = vision.hidden_size, vision.ffn_hidden_size, vision.num_layers
    patch_sum, patch_sq_sum, merged = patches, patches * item, patches // 4
    transformer = depth * ((8 * h**2 + 4 * h * f) * patch_sum + 4 * h * patch_sq_sum)
    mh = 4 * h
    merger = merged * (2 * mh * mh + 2 * mh * projector.output_size)
    conv = 2 * patches * 3 * 14 * 14 * h
    return 3 * (transformer + merger + conv)


def _megatron_per_layer(llm, seq: int) -> tuple[list[float], float]:
    """Per-layer training FLOPs of a micro-batch from Megatron-LM's whole-model formula
    (``training/flops.py``): attention terms split evenly over layers, dense/MoE MLP terms over
    their layers; and the head."""
    b = {k: v * seq for k, v in llm_flops_breakdown_per_token(llm, seq).items()}
    attn = (b["attn_q"] + b["attn_kv"] + b["attn_out"] + b["attn_core"]) / llm.num_layers
    dense = b["mlp_dense"] / max(llm.num_layers - llm.num_moe_layers, 1)
    moe = (b["mlp_routed"] + b["mlp_shared"]) / max(llm.num_moe_layers, 1)
    per_layer = [attn + (moe if kind else dense) for kind in llm.moe_layer_freq]
    return per_layer, b["logits"]


def test_stage_flops_equal_independent_per_layer_sums() -> None:
    model = _vlm(moonlight_llm())
    seq, patches, item = 8192, 16384, 4096
    budget = VisionBudget(patches_per_micro_batch=patches, patches_per_item=item)
    plan = plan_stages(model, seq, pp=4, vision_budget=budget)
    per_layer, head = _megatron_per_layer(model.llm, seq)
    vit = _bridge_vit_flops(model.vision, model.projector, patches, item)
    for stage in plan.stages:
        expected = sum(per_layer[i] for i in stage.layers)
        expected += vit if stage.index == 0 else 0.0
        expected += head if stage.index == len(plan.stages) - 1 else 0.0
        assert stage.flops == pytest.approx(expected, rel=1e-12), stage
    assert sum(s.flops for s in plan.stages) == pytest.approx(sum(per_layer) + head + vit,
                                                              rel=1e-12)
    assert list(itertools.chain.from_iterable(s.layers for s in plan.stages)) == list(range(27))


def test_heavy_vit_gives_stage_zero_fewer_layers() -> None:
    model = _vlm(moonlight_llm())
    light = plan_stages(model, 8192, pp=4,
                        vision_budget=VisionBudget(patches_per_micro_batch=1024,
                                                   patches_per_item=256))
    heavy = plan_stages(model, 8192, pp=4,
                        vision_budget=VisionBudget(patches_per_micro_batch=32768,
                                                   patches_per_item=16384))
    # One 16384-patch item costs several LLM layers: stage 0 keeps fewer than the others.
    assert heavy.layers_per_stage[0] < min(heavy.layers_per_stage[1:-1])
    assert heavy.layers_per_stage[0] < light.layers_per_stage[0]
    assert "vision" in heavy.stages[0].contents
    # The same model as text only: stage 0 holds at least as many layers as with a light ViT.
    text = plan_stages(dataclasses.replace(model, vision=None, projector=None), 8192, pp=4)
    assert text.layers_per_stage[0] >= light.layers_per_stage[0]


def test_balance_is_optimal_against_brute_force() -> None:
    llm = dataclasses.replace(moonlight_llm(), num_layers=9, num_dense_layers=2)
    model = _vlm(llm)
    budget = VisionBudget(patches_per_micro_batch=8192, patches_per_item=4096)
    for pp, vpp in ((3, None), (2, 2), (4, None)):
        plan = plan_stages(model, 4096, pp=pp, vision_budget=budget, vpp=vpp)
        stages = pp * (vpp or 1)
        best = min(
            max(s.flops for s in plan_stages(model, 4096, pp=pp, vpp=vpp, vision_budget=budget,
                                             layers_per_stage=counts).stages)
            for counts in itertools.product(range(10), repeat=stages)
            if sum(counts) == 9 and all(c > 0 for c in counts[1:-1]))
        assert plan.max_stage_flops == pytest.approx(best, rel=1e-12)


def test_layout_string_is_what_megatron_builds() -> None:
    from megatron.core.transformer.enums import LayerType
    from megatron.core.transformer.pipeline_parallel_layer_layout import (
        PipelineParallelLayerLayout,
    )

    model = _vlm(kimi_k25_llm())
    budget = VisionBudget(patches_per_micro_batch=16384, patches_per_item=4096)
    for pp, vpp in ((8, None), (16, 2), (4, 4)):
        plan = plan_stages(model, 4096, pp=pp, vpp=vpp, vision_budget=budget)
        layout = PipelineParallelLayerLayout(plan.layout(), pp)
        layout.validate_layer_layout(num_layers=61, mtp_num_layers=None)
        assert layout.virtual_pipeline_model_parallel_size == (vpp or 1)
        # megatron numbers layers virtual-stage-major (vp 0 of every rank, then vp 1, ...).
        counts = [layout.layout[k % pp][k // pp].count(LayerType.decoder)
                  for k in range(len(plan.stages))]
        assert counts == list(plan.layers_per_stage)
        for s in plan.stages:
            assert (s.pp_rank, s.vp_stage) == (s.index % pp, s.index // pp)
            start = sum(counts[:s.index])
            assert list(s.layers) == list(range(start, start + counts[s.index]))
        assert layers_from_layout(plan.layout()) == list(plan.layers_per_stage)


def test_first_last_for_megatron_uneven_split() -> None:
    model = ModelConfig(llm=kimi_k25_llm(), params_dtype="bf16")
    plan = plan_stages(model, 4096, pp=4, layers_per_stage=[15, 16, 16, 14])
    assert plan.first_last() == (15, 14)
    assert plan_stages(model, 4096, pp=4, layers_per_stage=[15, 15, 17, 14]).first_last() is None
    assert plan_stages(model, 4096, pp=2, vpp=2,
                       layers_per_stage=[15, 16, 16, 14]).first_last() is None


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"pp": 40, "vpp": 2}, "need at least 78 decoder layers"),
        ({"pp": 4, "layers_per_stage": [20, 20, 20, 20]}, "sum to 80"),
        ({"pp": 4, "layers_per_stage": [30, 0, 16, 15]}, "middle stage(s) [1] hold no decoder"),
        ({"pp": 4, "layers_per_stage": [31, 30]}, "2 stage sizes given for pp x vpp = 4"),
        ({"pp": 1, "vpp": 2}, "vpp=2 needs vpp >= 2 and pp >= 2"),
        ({"pp": 0}, "pp=0 must be >= 1"),
    ],
)
def test_impossible_splits_are_refused_with_reasons(kwargs, needle) -> None:
    model = ModelConfig(llm=kimi_k25_llm(), params_dtype="bf16")
    with pytest.raises(StagePlanError) as err:
        plan_stages(model, 4096, **kwargs)
    assert needle in str(err.value)
    assert err.value.reasons


def test_vlm_without_budget_and_oversized_item_are_refused() -> None:
    with pytest.raises(ValueError, match="vision budget"):
        plan_stages(_vlm(moonlight_llm()), 4096, pp=2)
    with pytest.raises(ValueError, match="exceeds the micro-batch budget"):
        VisionBudget(patches_per_micro_batch=1024, patches_per_item=4096)
