"""The family interface (``families/``, ``config/families.py``): a family's tower and projector
configs are read from YAML and overrides as its own types, mismatches and unknown names are
refused with the fix, and the planner's counts come from the family's cost model.

The toy family (``tests/fixtures/toy_family``) is defined only under tests/ and registered at run
time; ``tests/e2e/test_toy_family.py`` trains it."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import yaml

from megatron_vlm.config import ModelConfig, apply_overrides, from_dict
from megatron_vlm.config.families import FAMILY_MODULES, PLUGIN_ENV, family_module, register_family
from megatron_vlm.config.job import JobConfig
from megatron_vlm.config.parallel import ParallelConfig
from megatron_vlm.config.vision import ProjectorConfig, VisionConfig
from megatron_vlm.families import family_costs, get_family
from megatron_vlm.recipes import get_recipe

TOY = "fixtures.toy_family"


@pytest.fixture
def toy(monkeypatch):
    monkeypatch.setitem(FAMILY_MODULES, "toy", TOY)
    from fixtures.toy_family.config import ToyProjectorConfig, ToyVisionConfig

    return ToyVisionConfig, ToyProjectorConfig


def _toy_job(toy) -> JobConfig:
    job = get_recipe("tiny_vlm_cpu")
    return apply_overrides(job, ["model.family=toy", "model.vision={hidden_size: 8}",
                                 "model.projector={vision_hidden_size: 8, output_size: 64}"])


def test_yaml_and_overrides_read_the_family_types(toy, tmp_path):
    vision_type, projector_type = toy
    job = _toy_job(toy)
    assert type(job.model.vision) is vision_type and job.model.vision.hidden_size == 8
    assert type(job.model.projector) is projector_type
    # A field of the toy tower is addressable by override; MoonViT's fields are not.
    job = apply_overrides(job, ["model.vision.hidden_size=12",
                                "model.projector.vision_hidden_size=12"])
    assert job.model.vision.hidden_size == 12
    with pytest.raises(ValueError, match="unknown config field 'model.vision.pos_emb_height'"):
        apply_overrides(job, ["model.vision.pos_emb_height=8"])
    # YAML round trip (what job.yaml and every checkpoint manifest hold).
    again = from_dict(JobConfig, yaml.safe_load(job.to_yaml()))
    assert again.model == job.model and type(again.model.vision) is vision_type


def test_kimi_is_the_default_and_reads_old_configs():
    job = get_recipe("tiny_vlm_cpu")
    assert job.model.family == "kimi" and type(job.model.vision) is VisionConfig
    data = job.to_dict()
    del data["model"]["family"]  # a job.yaml written before families existed
    old = from_dict(JobConfig, data)
    assert old.model == job.model


def test_mismatched_or_unknown_family_is_refused(toy):
    job = get_recipe("tiny_vlm_cpu")
    with pytest.raises(ValueError, match="model.vision is a VisionConfig but model.family='toy'"):
        dataclasses.replace(job.model, family="toy")
    with pytest.raises(ValueError, match="not a registered family; choose one of"):
        ModelConfig(family="nope")
    with pytest.raises(ValueError, match="already registered"):
        register_family("kimi", TOY)


def test_plugin_env(monkeypatch):
    monkeypatch.setenv(PLUGIN_ENV, f"toy={TOY}, toy2={TOY}")
    monkeypatch.delitem(FAMILY_MODULES, "toy", raising=False)
    monkeypatch.delitem(FAMILY_MODULES, "toy2", raising=False)
    try:
        assert family_module("toy") == TOY and get_family("toy").name == "toy"
        # The package declares "toy": another registered name is refused, not silently used.
        with pytest.raises(ValueError, match="is named 'toy', registered as 'toy2'"):
            get_family("toy2")
    finally:
        FAMILY_MODULES.pop("toy", None)
        FAMILY_MODULES.pop("toy2", None)
    monkeypatch.setenv(PLUGIN_ENV, "bad-entry")
    with pytest.raises(ValueError, match="each entry is name=package"):
        family_module("toy3")


def test_built_model_and_cost_model_agree(toy):
    """The planner's and banner's tensor list (the family's cost model) names and sizes the
    tower and projector the family builds."""
    from megatron_vlm.convert.mcore import build_meta_model

    job = _toy_job(toy)
    model = build_meta_model(job.model)
    built = {k: tuple(v.shape) for k, v in model.state_dict().items()
             if k.startswith(("vision_tower.", "projector.")) and torch.is_tensor(v)}
    costs = family_costs("toy").vision_tensors(job.model.vision, job.model.projector, "fp32", 1)
    assert built == {t.name: t.shape for t in costs}
    kimi = get_recipe("tiny_vlm_cpu").model
    model = build_meta_model(kimi)
    built = {k: tuple(v.shape) for k, v in model.state_dict().items()
             if k.startswith(("vision_tower.", "projector.")) and torch.is_tensor(v)
             and not k.endswith("_extra_state")}
    costs = family_costs("kimi").vision_tensors(kimi.vision, kimi.projector, "fp32", 1)
    assert sum(torch.Size(s).numel() for s in built.values()) == sum(t.numel for t in costs)


def test_families_declare_their_recipes_and_types():
    kimi = get_family("kimi")
    assert kimi.vision_config is VisionConfig and kimi.projector_config is ProjectorConfig
    for name in kimi.recipes:
        assert get_recipe(name).model.family == "kimi", name


def _tiny_keye():
    from megatron_vlm.config.model import LLMConfig
    from megatron_vlm.families.keye.config import KeyeMergerConfig, SiglipVisionConfig

    llm = LLMConfig(attention="gqa", vocab_size=256, hidden_size=64, num_layers=2,
                    num_attention_heads=4, num_query_groups=2, kv_channels=16,
                    qk_layernorm=True, ffn_hidden_size=128, num_experts=None,
                    num_dense_layers=2, rope_theta=1e6, position_embedding="mrope",
                    mrope_section=[2, 3, 3], max_position_embeddings=512)
    vision = SiglipVisionConfig(hidden_size=32, num_layers=1, num_attention_heads=4,
                                ffn_hidden_size=64, pos_emb_side=4)
    merger = KeyeMergerConfig(vision_hidden_size=32, output_size=64)
    return ModelConfig(family="keye", llm=llm, vision=vision, projector=merger)


def test_keye_family_builds_and_places_one_block_per_frame():
    """The Keye family through the interface: its tower, merger and Qwen3/M-RoPE LLM are built
    by ``get_family('keye')``; a packed batch of an image and a 2-frame video places ``t*h*w/4``
    tokens per item (one block per frame, no temporal pooling) and moving one frame's pixels
    changes only that frame's block; the cost model names the built tensors."""
    from megatron_vlm.convert.mcore import ensure_single_process_groups

    model_cfg = _tiny_keye()
    groups = ensure_single_process_groups().pg_collection
    torch.manual_seed(0)
    vlm = get_family("keye").build_vlm(model_cfg, ParallelConfig(), pg_collection=groups).eval()
    grid = torch.tensor([[1, 4, 6], [2, 4, 4]])
    assert vlm.llm_tokens_per_item(grid).tolist() == [6, 8]
    s = 32
    pixels = torch.randn(int(grid.prod(dim=1).sum()), 3, 14, 14)
    positions = torch.cat([torch.arange(2, 8), torch.arange(10, 18)])  # 6 + 8 placeholders
    ids = torch.randint(0, 200, (1, s))
    pos = torch.arange(s).view(1, s)

    def embed(px):
        return vlm.embed(ids, pos, px, grid, positions)[:, 0]

    with torch.no_grad():
        base = embed(pixels)
        moved = pixels.clone()
        moved[-16:] += 1.0  # the video's second frame
        changed = (embed(moved) - base).abs().amax(dim=1) > 1e-6
    assert changed.nonzero().flatten().tolist() == list(range(14, 18))
    built = {k: tuple(v.shape) for k, v in vlm.state_dict().items()
             if k.startswith(("vision_tower.", "projector.")) and torch.is_tensor(v)}
    costs = family_costs("keye").vision_tensors(model_cfg.vision, model_cfg.projector, "fp32", 1)
    assert built == {t.name: t.shape for t in costs}
    # The YAML of a Keye model reads back as Keye types.
    from megatron_vlm.config.model import ModelConfig as MC

    again = from_dict(MC, dataclasses.asdict(model_cfg))
    assert again == model_cfg
