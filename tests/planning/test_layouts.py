"""Layout planner: impossible layouts refused with their reasons, fitting layouts ranked, the
pipeline schedule's in-flight micro-batches as megatron counts them, and the CLI."""

from __future__ import annotations

import dataclasses
import json
from types import SimpleNamespace

import pytest

from megatron_vlm.config.model import ModelConfig
from megatron_vlm.config.vision import kimi_projector_config, moonvit_config
from megatron_vlm.planning.costs import VisionBudget
from megatron_vlm.planning.layouts import (
    GIB,
    Layout,
    PlanInputs,
    candidate_layouts,
    evaluate,
    in_flight,
    plan_layouts,
)
from megatron_vlm.recipes.kimi import kimi_k25_llm, moonlight_llm


def _k25_inputs(**changes) -> PlanInputs:
    llm = kimi_k25_llm()
    model = ModelConfig(llm=llm, vision=moonvit_config(), projector=kimi_projector_config(7168),
                        params_dtype="bf16")
    values = {"model": model, "num_gpus": 1024, "seq_length": 4096, "global_batch_size": 8192,
                  "optimizer": "muon", "sharding": "layerwise", "recompute": "full",
                  "vision_budget": VisionBudget(patches_per_micro_batch=16384,
                                             patches_per_item=4096, fill=0.5)}
    values.update(changes)
    return PlanInputs(**values)


def _lay(**kw) -> Layout:
    base = {"tp": 8, "pp": 16, "vpp": None, "cp": 1, "ep": 8, "etp": 1}
    base.update(kw)
    base["dp"] = kw.get("dp", 1024 // (base["tp"] * base["pp"] * base["cp"]))
    return Layout(**base)


@pytest.mark.parametrize(
    ("layout", "changes", "needle"),
    [
        ({"tp": 3, "dp": 42}, {}, "tp=3 does not divide model.llm.num_attention_heads=64"),
        ({"tp": 16}, {}, "tp=16 spans nodes"),
        ({"ep": 5}, {}, "ep=5 does not divide num_experts=384"),
        ({"ep": 384, "tp": 1, "pp": 1}, {}, "ep*etp=384 does not divide dp*cp*tp=1024"),
        ({"pp": 64, "vpp": 2, "tp": 1}, {}, "need at least 126 decoder layers"),
        ({"cp": 4, "tp": 1}, {}, "cp=4 leaves 1024 tokens per CP rank"),
        ({"vpp": 2, "tp": 8, "pp": 16}, {"global_batch_size": 8 * 24},
         "24 micro-batches per DP rank not a multiple of pp=16"),
        ({}, {"global_batch_size": 100}, "global batch 100 is not divisible by dp=8"),
        ({}, {"optimizer": "muon", "sharding": "flat"}, "Muon cannot use the flat"),
        ({"tp": 8, "pp": 1, "ep": 8}, {}, "pp rank 0 needs"),
    ],
)
def test_impossible_layouts_are_rejected_with_reasons(layout, changes, needle) -> None:
    inputs = _k25_inputs(**changes)
    est = evaluate(inputs, _lay(**layout))
    assert not est.fits
    assert any(needle in r for r in est.reasons), est.reasons


def test_memory_reason_matches_the_busiest_rank() -> None:
    inputs = _k25_inputs()
    est = evaluate(inputs, _lay(tp=8, pp=1, ep=8))
    usable = (inputs.hardware.gpu_memory_gib - inputs.hardware.reserved_gib) * GIB
    assert est.peak_memory > usable
    # 1T parameters over ep=8 x tp=8 leave ~16B expert params per GPU: > 90 GiB for bf16
    # weights and fp32 gradients alone.
    assert est.rank_memory[0]["params"] + est.rank_memory[0]["grads"] > 90 * GIB
    assert f"{est.peak_memory / GIB:.1f} GiB" in est.reasons[0]


def test_fitting_layouts_are_ranked_and_under_the_budget() -> None:
    model = ModelConfig(llm=moonlight_llm(), vision=moonvit_config(),
                        projector=kimi_projector_config(2048), params_dtype="bf16")
    inputs = PlanInputs(model=model, num_gpus=64, seq_length=8192, global_batch_size=512,
                        optimizer="adamw", sharding="flat",
                        vision_budget=VisionBudget(patches_per_micro_batch=16384,
                                                   patches_per_item=4096))
    estimates = plan_layouts(inputs)
    fitting = [e for e in estimates if e.fits]
    assert fitting and len(fitting) < len(estimates)
    times = [e.step_time_s for e in fitting]
    assert times == sorted(times)
    usable = (inputs.hardware.gpu_memory_gib - inputs.hardware.reserved_gib) * GIB
    assert all(e.peak_memory <= usable for e in fitting)
    assert all(0 < e.mfu < inputs.hardware.efficiency for e in fitting)
    # Every rejected layout says why.
    assert all(e.reasons for e in estimates if not e.fits)
    # A 16B model on 64 GPUs: more sharding of the optimizer state means less memory.
    one = evaluate(inputs, Layout(tp=1, pp=1, vpp=None, cp=1, ep=8, etp=1, dp=64))
    less_dp = evaluate(dataclasses.replace(inputs, num_gpus=8),
                       Layout(tp=1, pp=1, vpp=None, cp=1, ep=8, etp=1, dp=8))
    assert one.rank_memory[0]["optimizer_state"] < less_dp.rank_memory[0]["optimizer_state"]


def test_recompute_trades_activations_for_time() -> None:
    lay = _lay(tp=8, pp=16, ep=8)
    none = evaluate(_k25_inputs(recompute="none"), lay)
    full = evaluate(_k25_inputs(recompute="full"), lay)
    assert full.rank_memory[1]["activations"] < none.rank_memory[1]["activations"] / 5
    assert full.step_time_s > none.step_time_s
    assert full.rank_memory[1]["params"] == none.rank_memory[1]["params"]


@pytest.mark.parametrize(("pp", "vpp", "micro"), [(4, None, 16), (4, None, 2), (4, 2, 16),
                                                  (8, 4, 24), (2, 3, 8)])
def test_in_flight_micro_batches_follow_megatrons_schedule(pp, vpp, micro) -> None:
    from megatron.core.pipeline_parallel.schedules import (
        get_pp_rank_microbatches,
        get_schedule_table,
    )

    for rank in range(pp):
        comm = SimpleNamespace(pp_group=SimpleNamespace(size=lambda: pp, rank=lambda r=rank: r),
                               virtual_pipeline_model_parallel_size=vpp)
        _, _, warmup, _ = get_pp_rank_microbatches(micro, vpp or 1, pp, p2p_communicator=comm)
        if vpp is None:
            expected = [min(warmup + 1, micro)]
        else:  # which chunk each warm-up forward (and the first 1F1B forward) runs
            table = get_schedule_table(micro, vpp, pp)[: warmup + 1]
            expected = [sum(1 for _, chunk in table if chunk == c) for c in range(vpp)]
        assert in_flight(pp, vpp, rank, micro) == expected, (rank, expected)


def test_candidates_cover_the_enumerated_space() -> None:
    inputs = _k25_inputs()
    layouts = list(candidate_layouts(inputs))
    assert all(lay.tp * lay.pp * lay.cp * lay.dp == 1024 for lay in layouts)
    assert {lay.etp for lay in layouts if lay.tp == 8} == {1, 8}
    assert _lay(tp=8, pp=16, ep=8) in layouts


def test_cli_writes_ranked_json(tmp_path, capsys) -> None:
    from tools.plan_parallel import main

    out = tmp_path / "plan.json"
    assert main(["--recipe", "kimi_vl_a3b", "--gpus", "64", "--top", "5",
                 "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "layouts fit" in text and "rejected; by first reason" in text and "best:" in text
    data = json.loads(out.read_text())
    fits = [e for e in data["layouts"] if e["fits"]]
    assert fits and all(not e["reasons"] for e in fits)
    assert [e["step_time_s"] for e in fits] == sorted(e["step_time_s"] for e in fits)
    assert any(e["reasons"] for e in data["layouts"] if not e["fits"])
