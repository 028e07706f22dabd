"""GLM-4.5V / GLM-4.1V vision tower + projector (megatron blocks) vs transformers 5.25:
``Glm4vMoeModel``'s vision model (GLM-4.5V; its ``get_image_features`` / ``get_video_features``
are the released per-modality paths) and ``Glm4vVisionModel`` (GLM-4.1V, here with a qkv bias).

Weights go through our HF name map (``families/glm/hf_vision_names.py``: every HF tensor used
once, every parameter of ours filled). Two images of different sizes (table up- and
down-sampled, h != w) and a video of 2 temporal patches are one packed call on our side; pixels
are block-major rows ``[N, C*T*p*p]`` as the Glm4v processors emit them. Tiny random configs,
fp32, ``ATOL`` 1e-5.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")
from hf_fixtures import perturb
from transformers.models.glm4v.configuration_glm4v import Glm4vVisionConfig
from transformers.models.glm4v.modeling_glm4v import Glm4vVisionModel
from transformers.models.glm4v_moe.configuration_glm4v_moe import Glm4vMoeConfig
from transformers.models.glm4v_moe.modeling_glm4v_moe import Glm4vMoeModel

ATOL = 1e-5
HIDDEN, HEADS, LAYERS, OUT, INTER, SIDE = 64, 4, 2, 48, 80, 4
PATCH_DIM = 3 * 2 * 14 * 14
GRID = torch.tensor([[1, 4, 6], [1, 8, 4], [2, 6, 4]])  # two images, a 2-temporal-patch video
IMAGES, VIDEO = GRID[:2], GRID[2:]
TOKENS = [6, 8, 12]  # t*h*w/4


def _vision_kwargs(attention_bias: bool) -> dict:
    return dict(depth=LAYERS, hidden_size=HIDDEN, num_heads=HEADS, out_hidden_size=OUT,
                intermediate_size=INTER, image_size=14 * SIDE, patch_size=14,
                temporal_patch_size=2, spatial_merge_size=2, attention_bias=attention_bias)


@pytest.fixture(scope="module")
def hf_glm45v():
    """A tiny ``Glm4vMoeModel`` (vision model + a 1-layer MoE text model, unused here)."""
    torch.manual_seed(0)
    text = dict(vocab_size=64, hidden_size=OUT, intermediate_size=64, moe_intermediate_size=16,
                num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                n_routed_experts=4, num_experts_per_tok=2, first_k_dense_replace=1)
    config = Glm4vMoeConfig(vision_config=_vision_kwargs(False), text_config=text)
    config.vision_config._attn_implementation = "eager"
    model = Glm4vMoeModel(config).eval()
    perturb(model.visual, seed=3)
    return model


@pytest.fixture(scope="module")
def hf_glm41v():
    torch.manual_seed(1)
    config = Glm4vVisionConfig(**_vision_kwargs(True))
    config._attn_implementation = "eager"
    model = Glm4vVisionModel(config).eval()
    perturb(model, seed=4)
    return model


def configs(attention_bias: bool):
    from megatron_vlm.families.glm.config import GlmMergerConfig, GlmVisionConfig

    vision = GlmVisionConfig(hidden_size=HIDDEN, num_layers=LAYERS, num_attention_heads=HEADS,
                             ffn_hidden_size=OUT, patch_size=14, temporal_patch_size=2,
                             pos_emb_side=SIDE, attention_bias=attention_bias)
    merger = GlmMergerConfig(vision_hidden_size=HIDDEN, merge_size=4, output_size=OUT,
                             ffn_hidden_size=INTER)
    return vision, merger


def copy_by_name_map(tower, merger, hf_visual) -> None:
    """Fill our tower and projector from the HF vision model through the family's rules."""
    from megatron_vlm.convert.rules import ConvertContext, Table
    from megatron_vlm.families.glm.hf_vision_names import glm_visual_rules

    table = Table(glm_visual_rules(hf_prefix=""), ConvertContext(vision_num_heads=HEADS))
    hf = dict(hf_visual.state_dict())
    used = []
    with torch.no_grad():
        for prefix, module in (("vision_tower.", tower), ("projector.", merger)):
            for name, param in module.named_parameters():
                rule, binding = table.lookup(prefix + name)
                names = rule.hf_names(binding)
                used += names
                param.copy_(rule.transform.to_ours([hf[n] for n in names], table.ctx))
    assert sorted(used) == sorted(hf), set(hf) ^ set(used)  # each HF tensor exactly once


def build_ours(hf_visual, attention_bias: bool):
    from megatron_vlm.config import ParallelConfig
    from megatron_vlm.families.glm.merger import build_glm_merger
    from megatron_vlm.families.glm.vision import build_glm_vision

    vision, merger_config = configs(attention_bias)
    tower = build_glm_vision(vision, ParallelConfig()).eval()
    merger = build_glm_merger(merger_config, ParallelConfig()).eval()
    copy_by_name_map(tower, merger, hf_visual)
    return tower, merger


@pytest.fixture(scope="module")
def ours45(megatron_groups, hf_glm45v):
    return build_ours(hf_glm45v.visual, attention_bias=False)


@pytest.fixture(scope="module")
def ours41(megatron_groups, hf_glm41v):
    return build_ours(hf_glm41v, attention_bias=True)


def pixels_for(grid, seed):
    n = int(grid.prod(dim=1).sum())
    return torch.rand(n, PATCH_DIM, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def split_video_grid(grid):
    """``[t, h, w]`` -> ``t`` rows ``[1, h, w]`` (what ``Glm4vModel.get_video_features`` feeds
    its vision model)."""
    return torch.cat([torch.tensor([[1, h, w]] * t) for t, h, w in grid.tolist()])


def hf_features(visual, pixels, grid):
    """transformers' pre-merge features (after ``post_layernorm``), ``last_hidden_state``
    (after the downsample) and ``pooler_output`` (after the merger), video split per temporal
    patch."""
    seen = []
    hook = visual.post_layernorm.register_forward_hook(lambda m, i, o: seen.append(o))
    try:
        out = visual(pixels, grid_thw=split_video_grid(grid))
    finally:
        hook.remove()
    return seen[0], out.last_hidden_state, out.pooler_output


def assert_close(actual, expected, atol=ATOL):
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    diff = (actual - expected).abs().max().item()
    assert diff <= atol, f"max abs diff {diff:.3e} > {atol:.0e}"


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize("which", ["glm45v", "glm41v"])
def test_packed_images_and_video_equal_reference(which, request):
    """One packed call (4x6 and 8x4 images, a 6x4 video of 2 temporal patches): pre-merge
    features, and LLM embeddings of every item, equal transformers' vision model."""
    hf = request.getfixturevalue(f"hf_{which}")
    tower, merger = request.getfixturevalue("ours45" if which == "glm45v" else "ours41")
    visual = hf.visual if which == "glm45v" else hf
    pixels = pixels_for(GRID, seed=0)
    with torch.no_grad():
        pre, _, expected = hf_features(visual, pixels, GRID)
        got_pre = tower.encode(pixels, GRID)
        got = merger(tower(pixels, GRID))
    assert_close(got_pre, pre)
    assert pre.abs().max() > 0.5 and expected.abs().max() > 0.1
    assert_close(got, expected)
    assert got.shape == (sum(TOKENS), OUT)


def test_per_modality_paths_equal_packed(ours45, hf_glm45v):
    """transformers' released paths, one modality each (``get_image_features`` for the two
    images, ``get_video_features`` with the unsplit video grid), equal our one packed call."""
    tower, merger = ours45
    pixels = pixels_for(GRID, seed=1)
    n_images = int(IMAGES.prod(dim=1).sum())
    with torch.no_grad():
        images = hf_glm45v.get_image_features(pixels[:n_images], IMAGES).pooler_output
        video = hf_glm45v.get_video_features(pixels[n_images:], VIDEO).pooler_output
        got = merger(tower(pixels, GRID))
    assert [x.shape[0] for x in (*images, *video)] == TOKENS
    assert_close(got, torch.cat([*images, *video]))


def test_temporal_patches_are_separate_segments(ours45):
    """A video's temporal patches never attend to each other and share positions: swapping
    them swaps the outputs; the packed call equals one call per item."""
    tower, _ = ours45
    pixels = pixels_for(GRID, seed=2)
    video = slice(24 + 32, None)
    swapped = pixels.clone()
    swapped[video] = pixels[video].view(2, 24, PATCH_DIM).flip(0).reshape(48, PATCH_DIM)
    with torch.no_grad():
        out = tower.encode(pixels, GRID)
        out_swapped = tower.encode(swapped, GRID)
        alone = torch.cat([tower.encode(x, g[None]) for x, g in
                           zip(pixels.split(GRID.prod(dim=1).tolist()), GRID)])
    assert_close(out_swapped[video], out[video].view(2, 24, HIDDEN).flip(0).reshape(48, HIDDEN))
    assert_close(alone, out)


def test_patch_order_and_rope_matter(ours45, hf_glm45v, monkeypatch):
    """Controls that the equality can fail: raster-ordered ids (not block-major) for the table
    and the RoPE, or no RoPE at all, move ours far from the reference."""
    from megatron_vlm.families.glm import vision as glm_vision

    tower, _ = ours45
    pixels = pixels_for(GRID, seed=3)
    block_major = glm_vision.block_major_index
    with torch.no_grad():
        pre, _, _ = hf_features(hf_glm45v.visual, pixels, GRID)
        with monkeypatch.context() as m:  # kernel 1: raster order
            m.setattr(glm_vision, "block_major_index", lambda h, w, k: block_major(h, w, 1))
            got_raster = tower.encode(pixels, GRID)
        with monkeypatch.context() as m:
            angles = tower.rope_angles
            m.setattr(tower, "rope_angles", lambda seg: torch.zeros_like(angles(seg)))
            got_no_rope = tower.encode(pixels, GRID)
        got = tower.encode(pixels, GRID)
    assert (got_raster - pre).abs().max() > 1e3 * ATOL
    assert (got_no_rope - pre).abs().max() > 1e3 * ATOL
    assert_close(got, pre)  # restored


def test_tokens_and_configs():
    """Token counts per item; validation names the config key; real sizes."""
    from megatron_vlm.families.glm.config import (
        GlmMergerConfig,
        GlmVisionConfig,
        glm_merger_config,
        glm_vision_config,
    )
    from megatron_vlm.families.glm.merger import llm_tokens_per_item

    vision, merger = configs(False)
    assert llm_tokens_per_item(vision, GRID).tolist() == TOKENS
    with pytest.raises(ValueError, match="not divisible by the merge kernel"):
        llm_tokens_per_item(vision, torch.tensor([[1, 3, 4]]))
    real = glm_vision_config()
    assert (real.head_dim, real.patch_dim, real.merged_hidden_size) == (128, 1176, 6144)
    assert glm_merger_config().input_size == 6144
    with pytest.raises(ValueError, match="num_attention_heads=5 does not divide"):
        GlmVisionConfig(num_attention_heads=5)
    with pytest.raises(ValueError, match="merge_kernel_height=2 != merge_kernel_width=1"):
        GlmVisionConfig(merge_kernel_width=1)
    with pytest.raises(ValueError, match="model.projector.output_size=48 != model.llm"):
        merger.check_matches(vision, 4096)
    with pytest.raises(ValueError, match="must be a square"):
        GlmMergerConfig(merge_size=2)


@pytest.mark.parametrize("which", ["ours45", "ours41"])
def test_cost_model_matches_modules(which, request):
    """``costs.vision_tensors`` names every parameter with its shape (TP 1; the qkv bias only
    with ``attention_bias``); ``step_flops`` equals torch's FLOP counter on our forward (convs
    and matmuls) plus the per-temporal-patch attention counted here; the planner's
    ``vision_flops`` of a one-item budget equals ``step_flops`` of that item."""
    from torch.utils.flop_counter import FlopCounterMode

    from megatron_vlm.families.glm import costs
    from megatron_vlm.planning.costs import VisionBudget

    tower, merger = request.getfixturevalue(which)
    vision, merger_config = configs(which == "ours41")
    params = {n: tuple(p.shape) for n, p in tower.named_parameters(prefix="vision_tower")}
    params.update({n: tuple(p.shape) for n, p in merger.named_parameters(prefix="projector")})
    assert {t.name: t.shape for t in costs.vision_tensors(vision, merger_config, "bf16", 1)} \
        == params
    pixels = pixels_for(GRID, seed=4)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        merger(tower(pixels, GRID))
    attention = 4 * LAYERS * HIDDEN * sum(t * (h * w) ** 2 for t, h, w in GRID.tolist())
    frames = GRID * torch.tensor([2, 1, 1])  # the packed batch's grids count frames
    step = costs.step_flops(vision, OUT, frames, merger_config)
    assert step == pytest.approx(3 * (counter.get_total_flops() + attention), rel=1e-12)
    budget = VisionBudget(patches_per_micro_batch=48, patches_per_item=48, frames_per_item=2)
    planned = costs.vision_flops(vision, merger_config, budget)
    assert sum(planned.values()) == pytest.approx(
        costs.step_flops(vision, OUT, torch.tensor([[4, 4, 6]]), merger_config), rel=1e-12)


def test_name_map_round_trip(ours41, hf_glm41v):
    """Export through the same rules gives transformers' tensors back bit for bit (the fused
    qkv with its bias, gate/up pairs, the downsample under the projector)."""
    from megatron_vlm.convert.rules import ConvertContext, Table
    from megatron_vlm.families.glm.hf_vision_names import glm_visual_rules

    tower, merger = ours41
    table = Table(glm_visual_rules(hf_prefix=""), ConvertContext(vision_num_heads=HEADS))
    ours = dict(tower.named_parameters(prefix="vision_tower"))
    ours.update(merger.named_parameters(prefix="projector"))
    exported = {}
    for name, param in ours.items():
        rule, binding = table.lookup(name)
        exported.update(zip(rule.hf_names(binding), rule.transform.to_hf(param.detach(),
                                                                          table.ctx)))
    hf = hf_glm41v.state_dict()
    assert exported.keys() == hf.keys()
    for name, value in hf.items():
        assert torch.equal(exported[name], value), name
    te = table.to_te_name("vision_tower.encoder.layers.1.pre_mlp_layernorm.weight")
    assert te == "vision_tower.encoder.layers.1.mlp.linear_fc1.layer_norm_weight"


def test_vision_config_from_and_to_hf(hf_glm45v):
    """transformers' configs -> ours -> back: the tiny one and the defaults (GLM-4.1V's sizes,
    equal to our real-size configs)."""
    from megatron_vlm.convert.rules import ConversionError
    from megatron_vlm.families.glm.config import glm_merger_config, glm_vision_config
    from megatron_vlm.families.glm.hf_vision_config import vision_from_hf, vision_to_hf

    hf = hf_glm45v.config.vision_config.to_dict()
    vision, merger = vision_from_hf(hf)
    assert (vision, merger) == configs(False)
    back = vision_to_hf(vision, merger)
    assert {k: hf[k] for k in back} == back
    assert vision_from_hf(Glm4vVisionConfig().to_dict()) == (glm_vision_config(),
                                                              glm_merger_config())
    with pytest.raises(ConversionError, match="hidden_act='gelu'"):
        vision_from_hf({**hf, "hidden_act": "gelu"})
    vision.ffn_hidden_size = 2 * OUT
    with pytest.raises(ConversionError, match="one out_hidden_size"):
        vision_to_hf(vision, merger)


def test_real_size_parameter_count():
    """The cost model's real-size tower + projector hold as many parameters as transformers'
    default ``Glm4vVisionModel`` (built on the meta device)."""
    from megatron_vlm.families.glm import costs
    from megatron_vlm.families.glm.config import glm_merger_config, glm_vision_config

    with torch.device("meta"):
        hf = Glm4vVisionModel(Glm4vVisionConfig())
    ours = costs.vision_tensors(glm_vision_config(), glm_merger_config(), "bf16", 1)
    assert sum(t.numel for t in ours) == sum(p.numel() for p in hf.parameters()) == 892_498_432
