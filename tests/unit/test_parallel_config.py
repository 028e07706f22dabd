"""Parallel layouts the model cannot run are refused at config time, each with its reason and fix.

The tiny VLM (LLM: 4 heads, FFN 192, 3 layers, 8 experts of width 48 + 1 shared; ViT: width 32,
4 heads, MLP 64; projector intermediate 128; S = 512) under one override set per case.
"""

from __future__ import annotations

import pytest

from megatron_vlm.config import ParallelConfig, apply_overrides
from megatron_vlm.recipes import get_recipe

TP2 = ["parallel.tp=2", "parallel.sequence_parallel=true"]


def _job(overrides: list[str]):
    return apply_overrides(get_recipe("tiny_vlm_cpu"), overrides)


@pytest.mark.parametrize(
    "overrides, must_contain",
    [
        (["parallel.tp=3", "parallel.sequence_parallel=true"],
         ["parallel.tp=3 does not divide model.llm.num_attention_heads=4", "[1, 2, 4]"]),
        ([*TP2, "model.llm.ffn_hidden_size=191"],
         ["parallel.tp=2 does not divide model.llm.ffn_hidden_size=191"]),
        (["parallel.tp=2"], ["requires sequence parallelism", "moe_layer.py:380",
                             "parallel.sequence_parallel=true"]),
        (["parallel.ep=3"], ["parallel.ep=3 does not divide model.llm.num_experts=8",
                             "[1, 2, 4, 8]"]),
        (["parallel.etp=5"], ["expert tensor parallel size 5", "moe_ffn_hidden_size=48"]),
        ([*TP2, "parallel.etp=1", "model.llm.moe_ffn_hidden_size=51"],
         ["parallel.tp=2 does not divide the shared experts' width 51"]),
        (["model.llm.num_experts=null", "parallel.ep=2"], ["need an MoE model"]),
        (["parallel.pp=2"], ["parallel.pp=2 does not divide model.llm.num_layers=3"]),
        (["parallel.pp=2", "parallel.vpp=2", "model.llm.num_layers=6"],
         ["parallel.pp*vpp=2*2=4 does not divide model.llm.num_layers=6"]),
        (["parallel.tp=4", "parallel.sequence_parallel=true", "model.vision.parallel_mode=tp",
          "model.vision.num_attention_heads=2"],
         ["model.vision.num_attention_heads=2 (vision parallel_mode=tp)",
          "model.vision.parallel_mode=split"]),
        ([*TP2, "model.vision.parallel_mode=tp", "model.vision.ffn_hidden_size=65"],
         ["model.vision.ffn_hidden_size=65"]),
        ([*TP2, "model.projector.ffn_hidden_size=129"],
         ["the projector's intermediate size 129"]),
        ([*TP2, "data.seq_length=514"], ["data.seq_length=514 must be a multiple of 2*cp*tp=4"]),
        (["parallel.cp=2", "data.pad_to_multiple=2"],
         ["data.pad_to_multiple=2 must be a multiple of 4 (2*cp)", "data.pad_to_multiple=4"]),
        ([*TP2, "parallel.cp=2", "data.pad_to_multiple=4"],
         ["data.pad_to_multiple=4 must be a multiple of 8 (2*cp*tp)"]),
        (["parallel.tp=0"], ["parallel.tp=0 must be >= 1"]),
        (["parallel.etp=0"], ["parallel.etp=0 must be >= 1"]),
        (["parallel.vpp=2"], ["parallel.vpp needs parallel.pp >= 2"]),
    ],
    ids=["llm_heads", "llm_ffn", "tp_without_sp", "experts", "expert_tp", "shared_experts",
         "ep_dense", "layers_pp", "layers_vpp", "vit_heads_tp_mode", "vit_ffn_tp_mode",
         "projector", "seq_length", "cp_document_pad", "cp_sp_document_pad", "size_zero",
         "etp_zero", "vpp_without_pp"],
)
def test_impossible_layout_is_refused_with_its_reason(overrides, must_contain):
    with pytest.raises(ValueError) as err:
        _job(overrides)
    for text in must_contain:
        assert text in str(err.value), (text, str(err.value))


def test_every_reason_is_listed_first_one_first():
    with pytest.raises(ValueError) as err:
        _job(["parallel.tp=3", "parallel.pp=2"])
    message = str(err.value)
    reasons = ["parallel.tp=3 does not divide model.llm.num_attention_heads=4",
               "parallel.tp=3 requires sequence parallelism",
               "parallel.pp=2 does not divide model.llm.num_layers=3"]
    assert message.startswith(reasons[0])
    assert all(r in message for r in reasons), message


@pytest.mark.parametrize("overrides", [
    [*TP2, "data.pad_to_multiple=4"],
    # split mode replicates the tower: its 2 heads need not divide tp=4
    ["parallel.tp=4", "parallel.sequence_parallel=true", "model.vision.num_attention_heads=2"],
    [*TP2, "parallel.ep=2", "parallel.etp=1"],
    ["parallel.pp=3", "parallel.ep=8"],
    ["parallel.pp=2", "parallel.vpp=2", "model.llm.num_layers=4"],
    [*TP2, "parallel.cp=2", "data.pad_to_multiple=8"],
], ids=["tp2_sp", "vit_split_mode_heads", "tp2_ep2_etp1", "pp3_ep8", "pp2_vpp2", "tp2_cp2"])
def test_possible_layouts_pass(overrides):
    job = _job(overrides)
    assert job.parallel.layout_problems(job.model, seq_length=job.data.seq_length,
                                        pad_to_multiple=job.data.pad_to_multiple) == []


def test_world_size_fixes_dp_and_the_expert_grid():
    assert ParallelConfig(tp=2, pp=2, sequence_parallel=True).data_parallel_size(8) == 2
    assert ParallelConfig(tp=2, ep=2, etp=1, sequence_parallel=True).data_parallel_size(2) == 1
    with pytest.raises(ValueError, match=r"world size 6 is not divisible by tp\*pp\*cp=4"):
        ParallelConfig(tp=2, cp=2, sequence_parallel=True).data_parallel_size(6)
    # ep x etp must tile tp x cp x dp: 4 x 2 experts ranks on 4 ranks cannot.
    with pytest.raises(ValueError, match=r"ep=4 x etp=2 must divide dp\*cp\*tp=4"):
        ParallelConfig(tp=2, ep=4, sequence_parallel=True).data_parallel_size(4)
