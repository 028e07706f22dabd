"""``parallel.pipeline_layout``: megatron's layout string validated at config time (stages, layer
count, embedding first, loss last), parsed as megatron parses it, and what lets a 61-layer model
run on 16 uneven stages."""

from __future__ import annotations

import pytest

from megatron_vlm.config import ParallelConfig, apply_overrides
from megatron_vlm.config.parallel import layers_from_layout, pipeline_layout_problems
from megatron_vlm.recipes import get_recipe


@pytest.mark.parametrize("layout", ["E|(tt|)*30,t|L", "Et*3|(tt|)*29,m|L", "E,t*9|t*9|t*7,L",
                                    "(Et|)*1,t*5|(t*4,|)*2L"])
def test_parse_matches_megatron(layout) -> None:
    from megatron.core.transformer.enums import LayerType
    from megatron.core.transformer.pipeline_parallel_layer_layout import (
        PipelineParallelLayerLayout,
    )

    stages = PipelineParallelLayerLayout.parse_str_to_list(layout)
    assert layers_from_layout(layout) == [s.count(LayerType.decoder) for s in stages]


@pytest.mark.parametrize(("layout", "needle"), [
    ("E,t*30|t*31,L", "2 stages, pp x vpp = 4"),
    ("E,t*15|t*15|t*15|t*15,L", "places 60 decoder layers, the model has 61"),
    ("t*16|t*15|t*15|t*15,L", "must start with the embedding E"),
    ("E,t*16|t*15|t*15|t*15", "must end with the loss L"),
    ("E,t*16|t*15|x*15|t*15,L", "unknown letters ['x']"),
])
def test_bad_layouts_are_refused(layout, needle) -> None:
    assert any(needle in p for p in pipeline_layout_problems(layout, 4, 61))
    job = get_recipe("kimi_k25")
    with pytest.raises(ValueError) as err:
        apply_overrides(job, ["parallel.pp=4", f"parallel.pipeline_layout={layout}"])
    assert needle in str(err.value)


def test_uneven_layers_need_a_layout() -> None:
    job = get_recipe("kimi_k25")  # 61 layers on pp=16 via its layout
    assert job.parallel.pp == 16 and sum(layers_from_layout(job.parallel.pipeline_layout)) == 61
    with pytest.raises(ValueError, match="does not divide model.llm.num_layers=61"):
        apply_overrides(job, ["parallel.pipeline_layout=null"])
    ok = ParallelConfig(tp=8, pp=4, ep=8, etp=1, sequence_parallel=True,
                        pipeline_layout="E,t*15|t*16|t*16|t*14,L")
    assert ok.layout_problems(job.model, seq_length=4096, pad_to_multiple=1) == []
