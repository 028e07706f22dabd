"""GLM-4.5V / GLM-4.1V recipes: each builds and validates (YAML round trip), is found by name
through the family's own recipe table, the real ones refuse to start without a tokenizer and
data, their sizes are transformers' GLM configs, the 8K -> 32K chain is the seed recipe's (global
batch 1,536 at 8,192; 32,768 with CP=4 from the 8K stage's checkpoint), and every real layout is
one the planner says fits on H100 80 GB -- with megatron's even pipeline split, which is what the
MTP layer leaves (no custom ``pipeline_layout``) -- with the figures its docstring quotes."""

from __future__ import annotations

import dataclasses
import re

import pytest

from megatron_vlm.config import load_yaml
from megatron_vlm.families import get_family
from megatron_vlm.families.glm import recipes as glm
from megatron_vlm.planning.layouts import GIB, evaluate
from megatron_vlm.recipes import RECIPES, get_recipe, recipe_names
from tools.plan_parallel import build_inputs, parse_args, recipe_layout

GLM = ("glm45v", "glm45v_long_32k", "glm41v_9b", "tiny_glm_cpu")


def megatron_layout(job, gpus: int):
    """The recipe's layout as megatron builds it: without ``pipeline_layout`` megatron gives
    every pipeline stage ``num_layers / pp`` layers (the planner would balance them instead)."""
    layout = recipe_layout(job, gpus)
    if layout.split is None and layout.pp > 1:
        layers = job.model.llm.num_layers
        assert layers % layout.pp == 0
        layout = dataclasses.replace(layout, split=(layers // layout.pp,) * layout.pp)
    return layout


@pytest.mark.parametrize("name", GLM)
def test_recipes_build_validate_and_roundtrip_yaml(name, tmp_path) -> None:
    job = get_recipe(name)
    assert job.name == name and job.model.family == "glm" and job.model.is_vlm
    llm = job.model.llm
    assert llm.attention == "gqa" and llm.position_embedding == "mrope"
    assert llm.rotary_fraction == 0.5 and llm.add_qkv_bias
    path = tmp_path / "job.yaml"
    path.write_text(job.to_yaml())
    assert load_yaml(str(path)) == job


def test_the_family_declares_its_recipes_and_get_recipe_finds_them() -> None:
    assert get_family("glm").recipes == GLM == tuple(glm.RECIPES)
    assert not set(GLM) & set(RECIPES)  # found through the family, not the central table
    assert set(GLM) <= set(recipe_names())
    with pytest.raises(ValueError, match="glm45v_long_32k"):
        get_recipe("glm45v_long_64k")


@pytest.mark.parametrize("name", sorted(glm.H100_GPUS))
def test_real_recipes_require_tokenizer_and_data(name) -> None:
    job = get_recipe(name)
    with pytest.raises(ValueError) as err:
        job.check_inputs()
    assert "data.tokenizer" in str(err.value) and "data.multimodal.root" in str(err.value)
    get_recipe("tiny_glm_cpu").check_inputs()  # the bundled corpus and tokenizer


def test_sizes_are_transformers_glm_configs() -> None:
    """GLM-4.5V's LLM == ``Glm4vMoeTextConfig()`` (GLM-4.5-Air) and GLM-4.1V's ==
    ``Glm4vTextConfig()`` field by field; both towers == ``Glm4v*VisionConfig()``."""
    from transformers import Glm4vConfig, Glm4vMoeConfig

    moe, dense = Glm4vMoeConfig(), Glm4vConfig()
    for job, hf in ((get_recipe("glm45v"), moe), (get_recipe("glm41v_9b"), dense)):
        llm, text = job.model.llm, hf.text_config
        assert (llm.hidden_size, llm.num_layers, llm.num_attention_heads, llm.query_groups,
                llm.norm_epsilon, llm.add_qkv_bias, llm.untie_embeddings) == (
                    text.hidden_size, text.num_hidden_layers, text.num_attention_heads,
                    text.num_key_value_heads, text.rms_norm_eps,
                    getattr(text, "attention_bias", True),  # Glm4v's q/k/v: bias=True always
                    not hf.tie_word_embeddings)
        # heads of 128: GLM-4.1V's hidden / heads; GLM-4.5V's config.json sets head_dim 128
        # (transformers' default config has none and would fall back to 4096 // 96 = 42)
        assert llm.head_dim == 128 == dense.text_config.hidden_size // 32
        assert llm.ffn_hidden_size == text.intermediate_size
        assert llm.rope_theta == text.rope_parameters["rope_theta"]
        assert llm.mrope_section == [8, 12, 12] and llm.rotary_dim == 64
        # FAMILIES.md §2: the released tokenizers' 151,552 (transformers' GLM-4.5V default
        # 151,424 is smaller; both hold the media ids 151339..151364)
        assert llm.vocab_size == 151552 >= text.vocab_size
        vision, projector, hv = job.model.vision, job.model.projector, hf.vision_config
        assert (vision.hidden_size, vision.num_layers, vision.num_attention_heads,
                vision.ffn_hidden_size, vision.patch_size, vision.temporal_patch_size,
                vision.pos_emb_side, vision.merge_kernel_height) == (
                    hv.hidden_size, hv.depth, hv.num_heads, hv.out_hidden_size, hv.patch_size,
                    hv.temporal_patch_size, hv.image_size // hv.patch_size,
                    hv.spatial_merge_size)
        assert (projector.output_size, projector.ffn_hidden_size) == (
            hv.out_hidden_size, hv.intermediate_size)
    a45, a41 = get_recipe("glm45v").model.llm, get_recipe("glm41v_9b").model.llm
    text = moe.text_config
    assert (a45.num_experts, a45.moe_router_topk, a45.num_shared_experts,
            a45.moe_ffn_hidden_size, a45.num_dense_layers, a45.moe_router_topk_scaling_factor,
            a45.moe_router_score_function, a45.moe_router_enable_expert_bias) == (
                text.n_routed_experts, text.num_experts_per_tok, text.n_shared_experts,
                text.moe_intermediate_size, text.first_k_dense_replace,
                text.routed_scaling_factor, "sigmoid", True)
    assert text.rope_parameters["partial_rotary_factor"] == a45.rotary_fraction
    assert a45.mrope_style == "neox" and not a45.sandwich_norms
    assert (a45.mtp_num_layers, a45.mtp_loss_weight) == (1, 0.0)  # GLM-4.5-Air's MTP layer
    assert a41.mrope_style == "interleaved" and a41.sandwich_norms and a41.num_experts is None


def test_stage_chain_is_the_seed_recipe() -> None:
    k8, k32 = get_recipe("glm45v"), get_recipe("glm45v_long_32k")
    assert (k8.data.seq_length, k8.data.global_batch_size) == (8192, 1536)
    assert k32.data.seq_length == 32768 and k32.parallel.cp == 4 and k8.parallel.cp == 1
    assert k8.checkpoint.init_from is None
    assert k32.checkpoint.init_from == f"{k8.train.output_dir}/checkpoints"
    assert k32.train.output_dir != k8.train.output_dir
    # the same tokens per step, the same model (a 32K-capable RoPE: no base change needed)
    assert (k32.data.seq_length * k32.data.global_batch_size
            == k8.data.seq_length * k8.data.global_batch_size)
    assert k32.model == dataclasses.replace(k8.model, llm=dataclasses.replace(
        k8.model.llm, max_position_embeddings=k32.model.llm.max_position_embeddings))
    assert k8.model.llm.max_position_embeddings >= k32.data.seq_length
    # context parallelism cuts each document into 2 cp chunks of whole TP shards
    assert k32.data.pad_to_multiple % (2 * k32.parallel.cp * k32.parallel.tp) == 0
    for job in (k8, k32):
        assert job.parallel.ep > 1 and job.parallel.etp == 1  # the experts over EP
        assert job.parallel.pipeline_layout is None  # MTP: megatron's even split (docstring)
        mm = job.data.multimodal
        # GLM videos are not fitted into packs: one video must fit with room for its text
        assert mm.slowfast.max_video_tokens < job.data.seq_length
        assert not (job.model.freeze_vision or job.model.freeze_projector
                    or job.model.freeze_llm)
    # the tiny recipe's bundled mix: captioned images and videos, half and half in LLM tokens
    # (what its vision probes measure; see its docstring)
    tiny = get_recipe("tiny_glm_cpu")
    assert tiny.data.multimodal.mix.weights == {"image_caption": 0.5, "video": 0.5}
    assert tiny.model.llm.num_experts and not tiny.model.llm.sandwich_norms


def test_a_custom_pipeline_layout_needs_the_mtp_layer() -> None:
    """Why the GLM-4.5V recipes keep megatron's even split: with ``mtp_num_layers=1`` megatron
    refuses a layout that does not place the MTP layer (``m``), and ours does not parse ``m``."""
    from megatron.core.transformer.pipeline_parallel_layer_layout import (
        PipelineParallelLayerLayout,
    )

    layout = PipelineParallelLayerLayout("E,t*18|t*28,L", pipeline_model_parallel_size=2)
    with pytest.raises(AssertionError, match="mtp"):
        layout.validate_layer_layout(num_layers=46, mtp_num_layers=1)
    PipelineParallelLayerLayout("E,t*18|t*28,mL", pipeline_model_parallel_size=2
                                ).validate_layer_layout(num_layers=46, mtp_num_layers=1)
    job = get_recipe("glm45v")
    parallel = dataclasses.replace(job.parallel, pipeline_layout="E,t*18|t*28,mL")
    problems = parallel.layout_problems(job.model, seq_length=job.data.seq_length,
                                        pad_to_multiple=job.data.pad_to_multiple)
    assert any("unknown letters ['m']" in p for p in problems), problems


@pytest.mark.parametrize("name", sorted(glm.H100_GPUS))
def test_shipped_layout_fits_80gb(name) -> None:
    gpus = glm.H100_GPUS[name]
    job, inputs = build_inputs(parse_args(["--recipe", name, "--gpus", str(gpus)]))
    assert inputs.vision_budget is not None and inputs.vision_budget.fill == 1.0
    assert inputs.hardware.gpu_memory_gib == 80.0
    layout = megatron_layout(job, gpus)
    assert layout.dp == job.parallel.data_parallel_size(gpus)
    est = evaluate(inputs, layout)
    assert est.fits, est.reasons
    usable = (80.0 - inputs.hardware.reserved_gib) * GIB
    assert 0.3 * usable < est.peak_memory <= usable
    # The docstring quotes the planner's peak memory of the busiest rank and its step time.
    doc = " ".join(getattr(glm, name).__doc__.split())
    gib = [float(x) for x in re.findall(r"Planned: (\d+(?:\.\d+)?) GiB", doc)]
    assert gib and gib[0] == pytest.approx(est.peak_memory / GIB, abs=0.06)
    seconds = [float(x) for x in re.findall(r"GiB on the busiest rank[^,]*, (\d+\.\d+) s", doc)]
    assert seconds and seconds[0] == pytest.approx(est.step_time_s, abs=0.06)


def test_an_oversized_layout_of_the_same_model_fails() -> None:
    """The check can fail: the 32K stage without CP (dp16) does not fit."""
    gpus = glm.H100_GPUS["glm45v_long_32k"]
    job, inputs = build_inputs(parse_args(["--recipe", "glm45v_long_32k", "--gpus", str(gpus),
                                           "parallel.cp=1", "data.pad_to_multiple=1"]))
    est = evaluate(inputs, megatron_layout(job, gpus))
    assert not est.fits and any("GiB" in r for r in est.reasons)
