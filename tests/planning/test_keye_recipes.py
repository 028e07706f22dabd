"""Keye-VL 1.5 recipes: each builds and validates (YAML round trip), is found by name through the
family's own recipe table, the real ones refuse to start without a tokenizer and data, the
stage chain (8K -> 32K -> 128K, RoPE base 1e6 -> 8e6, each from the previous stage's checkpoint)
is as the report describes, the raised RoPE base changes no tensor (so ``init_from`` takes the
previous stage), and every 8B layout is one the planner says fits on H100 80 GB with the
figures its docstring quotes."""

from __future__ import annotations

import re

import pytest
import torch

from megatron_vlm.config import load_yaml
from megatron_vlm.families import get_family
from megatron_vlm.families.keye import recipes as keye
from megatron_vlm.planning.layouts import GIB, evaluate
from megatron_vlm.recipes import RECIPES, get_recipe, recipe_names
from tools.plan_parallel import build_inputs, parse_args, recipe_layout

KEYE = ("keye_vl_1_5_8b", "keye_vl_1_5_8b_anneal_32k", "keye_vl_1_5_8b_anneal_128k",
        "tiny_keye_cpu")


@pytest.mark.parametrize("name", KEYE)
def test_recipes_build_validate_and_roundtrip_yaml(name, tmp_path) -> None:
    job = get_recipe(name)
    assert job.name == name and job.model.family == "keye" and job.model.is_vlm
    assert job.model.llm.attention == "gqa" and job.model.llm.position_embedding == "mrope"
    path = tmp_path / "job.yaml"
    path.write_text(job.to_yaml())
    assert load_yaml(str(path)) == job


def test_the_family_declares_its_recipes_and_get_recipe_finds_them() -> None:
    assert get_family("keye").recipes == KEYE == tuple(keye.RECIPES)
    assert not set(KEYE) & set(RECIPES)  # found through the family, not the central table
    assert set(KEYE) <= set(recipe_names())
    with pytest.raises(ValueError, match="keye_vl_1_5_8b_anneal_32k"):
        get_recipe("keye_vl_1_5_8b_anneal_64k")


@pytest.mark.parametrize("name", sorted(keye.H100_GPUS))
def test_real_recipes_require_tokenizer_and_data(name) -> None:
    job = get_recipe(name)
    with pytest.raises(ValueError) as err:
        job.check_inputs()
    assert "data.tokenizer" in str(err.value) and "data.multimodal.root" in str(err.value)
    get_recipe("tiny_keye_cpu").check_inputs()  # the bundled corpus and tokenizer


def test_stage_chain_follows_the_report() -> None:
    s3, a32, a128 = (get_recipe(n) for n in KEYE[:3])
    assert [j.data.seq_length for j in (s3, a32, a128)] == [8192, 32768, 131072]
    assert [j.model.llm.rope_theta for j in (s3, a32, a128)] == [1e6, 8e6, 8e6]
    assert s3.checkpoint.init_from is None
    assert a32.checkpoint.init_from == f"{s3.train.output_dir}/checkpoints"
    assert a128.checkpoint.init_from == f"{a32.train.output_dir}/checkpoints"
    assert len({j.train.output_dir for j in (s3, a32, a128)}) == 3
    for job in (s3, a32, a128):
        llm = job.model.llm
        assert (llm.hidden_size, llm.num_layers, llm.num_attention_heads, llm.query_groups,
                llm.head_dim, llm.ffn_hidden_size, llm.vocab_size) == (
                    4096, 36, 32, 8, 128, 12288, 151936)
        assert llm.mrope_section == [16, 24, 24] and not llm.yarn.enabled
        assert not (job.model.freeze_vision or job.model.freeze_projector
                    or job.model.freeze_llm)
        assert llm.max_position_embeddings >= job.data.seq_length
        mix = job.data.multimodal.mix
        assert mix.unit == "tokens" and mix.vision_token_fraction is None
        total = sum(mix.weights.values())
        assert {k: round(100 * v / total) for k, v in mix.weights.items()} == {
            "video": 24, "image": 50, "text": 26}
    assert a32.parallel.cp > 1 and a128.parallel.cp > 1
    # the tiny recipe's bundled mix: the corpus's alignment datasets (what its vision probes
    # measure in 300 CPU steps), weighted to video (40% image captions, 60% video; docstring)
    tiny = get_recipe("tiny_keye_cpu").data.multimodal.mix.weights
    assert tiny == {"image_caption": 0.4, "video": 0.6}


def test_raised_rope_base_loads_the_previous_stage_and_takes_effect() -> None:
    """The ABF stage's model has exactly the previous stage's tensors (a strict load of the
    8K model's state succeeds: what ``init_from`` needs), and after the load its logits differ
    (the frequencies come from the new ``rope_theta``, not from the checkpoint)."""
    import dataclasses

    from megatron_vlm.config import ParallelConfig
    from megatron_vlm.models.llm import build_llm
    from megatron_vlm.parallel.init import ensure_single_process_groups

    ensure_single_process_groups(seed=1234)
    llm = get_recipe("tiny_keye_cpu").model.llm
    torch.manual_seed(0)
    before = build_llm(llm, ParallelConfig()).eval()
    after = build_llm(dataclasses.replace(llm, rope_theta=8e6), ParallelConfig()).eval()
    state = before.state_dict()
    assert not [k for k in state if "freq" in k or "rotary" in k]
    after.load_state_dict(state, strict=True)
    ids = torch.randint(0, llm.vocab_size, (1, 96), generator=torch.Generator().manual_seed(1))
    positions = torch.arange(96).repeat(3, 1) * 8  # text ids, spread to reach low frequencies
    with torch.no_grad():
        a, b = before(ids, positions, None), after(ids, positions, None)
        again = after(ids, positions, None)
    torch.testing.assert_close(b, again, atol=0, rtol=0)
    assert (a - b).abs().max() > 1e-4


@pytest.mark.parametrize("name", sorted(keye.H100_GPUS))
def test_shipped_layout_fits_80gb(name) -> None:
    gpus = keye.H100_GPUS[name]
    job, inputs = build_inputs(parse_args(["--recipe", name, "--gpus", str(gpus)]))
    assert inputs.vision_budget is not None and inputs.vision_budget.fill == 1.0
    assert inputs.hardware.gpu_memory_gib == 80.0
    layout = recipe_layout(job, gpus)
    assert layout.dp == job.parallel.data_parallel_size(gpus)
    est = evaluate(inputs, layout)
    assert est.fits, est.reasons
    usable = (80.0 - inputs.hardware.reserved_gib) * GIB
    assert 0.3 * usable < est.peak_memory <= usable
    # The docstring quotes the planner's peak memory of the busiest rank and its step time.
    doc = " ".join(getattr(keye, name).__doc__.split())
    gib = [float(x) for x in re.findall(r"Planned: (\d+(?:\.\d+)?) GiB", doc)]
    assert gib and gib[0] == pytest.approx(est.peak_memory / GIB, abs=0.06)
    seconds = [float(x) for x in re.findall(r"GiB on the busiest rank[^,]*, (\d+\.\d+) s", doc)]
    assert seconds and seconds[0] == pytest.approx(est.step_time_s, abs=0.06)


def test_an_oversized_layout_of_the_same_model_fails() -> None:
    """The check can fail: the 128K stage at TP=2 without CP (dp=32) does not fit."""
    gpus = keye.H100_GPUS["keye_vl_1_5_8b_anneal_128k"]
    job, inputs = build_inputs(parse_args(["--recipe", "keye_vl_1_5_8b_anneal_128k", "--gpus",
                                           str(gpus), "parallel.tp=2", "parallel.cp=1",
                                           "data.pad_to_multiple=1"]))
    est = evaluate(inputs, recipe_layout(job, gpus))
    assert not est.fits and any("GiB" in r for r in est.reasons)
