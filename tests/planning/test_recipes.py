"""Every shipped real-size layout is one the planner says fits in 80 GB, at the full ViT patch
budget, on the GPU count it is written for; the split megatron is given equals the stage plan;
and the numbers quoted in the recipes' docstrings are the planner's."""

from __future__ import annotations

import re

import pytest

from megatron_vlm.config.parallel import layers_from_layout
from megatron_vlm.planning.layouts import GIB, evaluate
from megatron_vlm.recipes import RECIPES
from megatron_vlm.recipes.kimi import H100_GPUS
from tools.plan_parallel import build_inputs, parse_args, recipe_layout


@pytest.mark.parametrize("name", sorted(H100_GPUS))
def test_shipped_layout_fits_80gb(name) -> None:
    gpus = H100_GPUS[name]
    job, inputs = build_inputs(parse_args(["--recipe", name, "--gpus", str(gpus)]))
    assert inputs.vision_budget is not None and inputs.vision_budget.fill == 1.0
    assert job.model.is_vlm and inputs.hardware.gpu_memory_gib == 80.0
    dp = job.parallel.data_parallel_size(gpus)  # the recipe's own check of the world size
    layout = recipe_layout(job, gpus)
    assert layout.dp == dp
    est = evaluate(inputs, layout)
    assert est.fits, est.reasons
    usable = (80.0 - inputs.hardware.reserved_gib) * GIB
    assert 0.3 * usable < est.peak_memory <= usable
    # The split megatron receives is the one costed, and every stage has work.
    plan = est.stage_plan
    if job.parallel.pipeline_layout is not None:
        assert list(plan.layers_per_stage) == layers_from_layout(job.parallel.pipeline_layout)
    assert plan.imbalance < 2.0
    # The docstring quotes the planned peak memory of the busiest rank.
    doc = " ".join(RECIPES[name].__doc__.split())
    quoted = [float(x) for x in re.findall(r"Planned: (\d+(?:\.\d+)?) GiB", doc)]
    assert quoted and quoted[0] == pytest.approx(est.peak_memory / GIB, abs=0.55)


def test_unbalanced_or_oversized_layouts_of_the_same_model_fail() -> None:
    """The check can fail: K2.5 without pipeline parallelism or with too little EP does not fit,
    and the reason names the memory."""
    gpus = H100_GPUS["kimi_k25"]
    for overrides in (["parallel.pp=1", "parallel.pipeline_layout=null"],
                      ["parallel.ep=2"]):
        job, inputs = build_inputs(parse_args(["--recipe", "kimi_k25", "--gpus", str(gpus),
                                               *overrides]))
        est = evaluate(inputs, recipe_layout(job, gpus))
        assert not est.fits
        assert any("GiB" in r for r in est.reasons)
