"""InternVL3.5 recipes: each builds and validates (YAML round trip), is found by name through the
family's own recipe table, refuses to start without a tokenizer and data, its model is field by
field what the family's HF mapping reads from the released ``config.json`` (transformers 5.25's
``InternVLConfig`` with the released sizes), it packs 32K with the 1 : 2.5 text : multimodal mix
in LLM tokens, and its layout is one the planner says fits on H100 80 GB with the figures its
docstring quotes."""

from __future__ import annotations

import dataclasses
import re

import pytest

from megatron_vlm.config import load_yaml
from megatron_vlm.families import get_family
from megatron_vlm.families.internvl import recipes as internvl
from megatron_vlm.planning.layouts import GIB, evaluate
from megatron_vlm.recipes import RECIPES, get_recipe, recipe_names
from tools.plan_parallel import build_inputs, parse_args, recipe_layout

INTERNVL = ("internvl3_5_8b", "internvl3_5_30b_a3b")

# The released InternVL3_5-8B-HF / InternVL3_5-30B-A3B-HF config.json values (FAMILIES.md §3;
# Qwen3-8B's and Qwen3-30B-A3B's own config.json for the text models).
RELEASED_VISION = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                       intermediate_size=4096, image_size=448, patch_size=14,
                       norm_type="layer_norm", attention_bias=True, use_qk_norm=False,
                       layer_norm_eps=1e-6, layer_scale_init_value=0.1)
RELEASED_TEXT = {
    "internvl3_5_8b": dict(
        model_type="qwen3", vocab_size=151936, hidden_size=4096, intermediate_size=12288,
        num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
        max_position_embeddings=40960, rms_norm_eps=1e-6, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6}),
    "internvl3_5_30b_a3b": dict(
        model_type="qwen3_moe", vocab_size=151936, hidden_size=2048, intermediate_size=6144,
        moe_intermediate_size=768, num_hidden_layers=48, num_attention_heads=32,
        num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8,
        norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
        max_position_embeddings=40960, rms_norm_eps=1e-6, tie_word_embeddings=False,
        router_aux_loss_coef=0.001,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6}),
}
# Training choices the recipes make that a config.json does not state (checked on their own).
TRAINING_FIELDS = ("moe_aux_loss_coeff", "moe_token_dispatcher", "recompute")


def released_config(name: str) -> dict:
    from transformers import InternVLConfig

    cfg = InternVLConfig(vision_config=RELEASED_VISION, text_config=RELEASED_TEXT[name],
                         tie_word_embeddings=False, downsample_ratio=0.5,
                         vision_feature_layer=-1).to_dict()
    cfg["architectures"] = ["InternVLForConditionalGeneration"]
    return cfg


@pytest.mark.parametrize("name", INTERNVL)
def test_recipes_build_validate_and_roundtrip_yaml(name, tmp_path) -> None:
    job = get_recipe(name)
    assert job.name == name and job.model.family == "internvl" and job.model.is_vlm
    llm = job.model.llm
    assert llm.attention == "gqa" and llm.position_embedding == "rope" and llm.qk_layernorm
    path = tmp_path / "job.yaml"
    path.write_text(job.to_yaml())
    assert load_yaml(str(path)) == job


def test_the_family_declares_its_recipes_and_get_recipe_finds_them() -> None:
    assert get_family("internvl").recipes == INTERNVL == tuple(internvl.RECIPES)
    assert set(internvl.H100_GPUS) == set(INTERNVL)
    assert not set(INTERNVL) & set(RECIPES)  # found through the family, not the central table
    assert set(INTERNVL) <= set(recipe_names())
    assert "tiny_internvl_cpu" not in recipe_names()  # not built yet (family docstring)
    with pytest.raises(ValueError, match="internvl3_5_8b"):
        get_recipe("internvl3_5_9b")


@pytest.mark.parametrize("name", INTERNVL)
def test_real_recipes_require_tokenizer_and_data(name) -> None:
    job = get_recipe(name)
    with pytest.raises(ValueError) as err:
        job.check_inputs()
    assert "data.tokenizer" in str(err.value) and "data.multimodal.root" in str(err.value)


@pytest.mark.parametrize("name", INTERNVL)
def test_sizes_are_the_released_transformers_configs(name) -> None:
    """The recipe's tower, projector and LLM == what ``hf_config.model_from_hf`` reads from the
    release's ``InternVLConfig`` (every field but the training choices), and the transformers
    configs carry the released numbers themselves."""
    from megatron_vlm.families.internvl.hf_config import model_from_hf

    cfg = released_config(name)
    hf, _ = model_from_hf(cfg, "bf16")
    job = get_recipe(name)
    model = job.model
    assert model.vision == hf.vision and model.projector == hf.projector
    llm = dataclasses.replace(model.llm, **{f: getattr(hf.llm, f) for f in TRAINING_FIELDS})
    assert llm == hf.llm
    text, vision = cfg["text_config"], cfg["vision_config"]
    assert (model.llm.hidden_size, model.llm.num_layers, model.llm.num_attention_heads,
            model.llm.query_groups, model.llm.head_dim, model.llm.vocab_size) == (
                text["hidden_size"], text["num_hidden_layers"], text["num_attention_heads"],
                text["num_key_value_heads"], text["head_dim"], text["vocab_size"])
    assert model.llm.rope_theta == text["rope_parameters"]["rope_theta"] == 1e6
    assert (model.vision.hidden_size, model.vision.num_layers, model.vision.ffn_hidden_size,
            model.vision.tile_size, model.vision.qkv_bias) == (
                vision["hidden_size"], vision["num_hidden_layers"],
                vision["intermediate_size"], vision["image_size"][0], vision["attention_bias"])
    assert model.vision.tokens_per_tile == cfg["image_seq_length"] == 256
    assert model.projector.input_size == 4 * 1024 and model.projector.output_size == (
        text["hidden_size"])
    if name == "internvl3_5_30b_a3b":
        assert (model.llm.num_experts, model.llm.moe_router_topk, model.llm.moe_ffn_hidden_size,
                model.llm.num_moe_layers, model.llm.num_shared_experts) == (
                    text["num_local_experts"], 8, 768, 48, 0)
        # norm_topk_prob: top-k then softmax; Qwen3-MoE's load-balancing loss coefficient
        assert not model.llm.moe_router_pre_softmax
        assert model.llm.moe_router_score_function == "softmax"
        assert model.llm.moe_aux_loss_coeff == text["router_aux_loss_coef"]
    else:
        assert model.llm.num_experts is None
        assert model.llm.ffn_hidden_size == text["intermediate_size"] == 12288


@pytest.mark.parametrize("name", INTERNVL)
def test_32k_packs_with_the_text_multimodal_mix(name) -> None:
    job = get_recipe(name)
    assert job.data.seq_length == 32768 <= job.model.llm.max_position_embeddings
    mm = job.data.multimodal
    mix = mm.mixes[mm.stage]
    assert mix.unit == "tokens" and mix.vision_token_fraction is None
    text = sum(w for k, w in mix.weights.items() if k == "text")
    multimodal = sum(w for k, w in mix.weights.items() if k != "text")
    assert multimodal / text == pytest.approx(2.5)
    # every dataset name is one the corpus's own mixes use
    corpus = {k for m in mm.mixes.values() if m is not mix for k in m.weights}
    assert set(mix.weights) <= corpus and "video" in mix.weights
    # 12 tiles + thumbnail per image; a video of at most 64 frames leaves room for its text
    assert mm.image_max_patches == 13 * 1024
    assert mm.video_max_frames * 256 <= job.data.seq_length // 2
    # context parallelism cuts each document into 2 cp chunks of whole TP shards
    assert job.data.pad_to_multiple % (2 * job.parallel.cp * job.parallel.tp) == 0


@pytest.mark.parametrize("name", INTERNVL)
def test_shipped_layout_fits_80gb(name) -> None:
    gpus = internvl.H100_GPUS[name]
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
    doc = " ".join(getattr(internvl, name).__doc__.split())
    gib = [float(x) for x in re.findall(r"Planned: (\d+(?:\.\d+)?) GiB", doc)]
    assert gib and gib[0] == pytest.approx(est.peak_memory / GIB, abs=0.06)
    seconds = [float(x) for x in re.findall(r"GiB on the busiest rank[^,]*, (\d+\.\d+) s", doc)]
    assert seconds and seconds[0] == pytest.approx(est.step_time_s, abs=0.06)


def test_an_oversized_layout_of_the_same_model_fails() -> None:
    """The check can fail: the 8B at 32K without CP (tp2 dp32) does not fit."""
    gpus = internvl.H100_GPUS["internvl3_5_8b"]
    job, inputs = build_inputs(parse_args(["--recipe", "internvl3_5_8b", "--gpus", str(gpus),
                                           "parallel.cp=1", "data.pad_to_multiple=1"]))
    est = evaluate(inputs, recipe_layout(job, gpus))
    assert not est.fits and any("GiB" in r for r in est.reasons)
