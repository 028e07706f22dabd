"""Keye-VL 1.5 vision tower + merger (megatron blocks) vs a reference composed from transformers
5.25 (there is no Keye class in transformers): ``SiglipVisionModel``'s embeddings and encoder
layers, Qwen2.5-VL's vision rotary functions (``Qwen2_5_VLVisionRotaryEmbedding``,
``apply_rotary_pos_emb_vision``) applied to q/k inside a small attention written here
(block-diagonal per image / video frame), the position table resized with ``F.interpolate``
(bilinear, ``align_corners=False``), the post-layernorm, then the 1.5 merger in plain torch.

The rotary ids are built here in RASTER order (``row = i // w``, as Keye's released code); the
transformers helper ``get_vision_position_ids`` is block-major (Qwen2.5-VL's order), a control
shows the two differ. Tiny random config, fp32; ``ATOL`` 1e-5.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("transformers")
from hf_fixtures import perturb
from transformers import SiglipVisionConfig as HFSiglipConfig
from transformers import SiglipVisionModel
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
    Qwen2_5_VLVisionConfig,
    Qwen2_5_VLVisionRotaryEmbedding,
    apply_rotary_pos_emb_vision,
)

ATOL = 1e-5
HIDDEN, HEADS, LAYERS, FFN, SIDE, LLM = 64, 4, 2, 96, 4, 48
GRID = torch.tensor([[1, 4, 6], [1, 6, 2], [2, 4, 4]])  # two images, one 2-frame video


@pytest.fixture(scope="module")
def hf_siglip():
    torch.manual_seed(0)
    config = HFSiglipConfig(hidden_size=HIDDEN, num_hidden_layers=LAYERS,
                            num_attention_heads=HEADS, intermediate_size=FFN,
                            image_size=14 * SIDE, patch_size=14, layer_norm_eps=1e-6)
    config._attn_implementation = "eager"
    model = SiglipVisionModel(config).eval()
    perturb(model, seed=3)
    return model


@pytest.fixture(scope="module")
def ref_merger():
    torch.manual_seed(1)
    d = 4 * HIDDEN
    merger = torch.nn.ModuleDict({
        "pre_norm": torch.nn.LayerNorm(d, eps=1e-5), "linear_1": torch.nn.Linear(d, d),
        "linear_2": torch.nn.Linear(d, LLM)})
    perturb(merger, seed=5)
    return merger


def vision_config(**overrides):
    from megatron_vlm.families.keye.config import SiglipVisionConfig

    return SiglipVisionConfig(hidden_size=HIDDEN, num_layers=LAYERS, num_attention_heads=HEADS,
                              ffn_hidden_size=FFN, patch_size=14, pos_emb_side=SIDE,
                              norm_epsilon=1e-6, **overrides)


# --------------------------------------------------------------------------- the reference


def frames_of(grid):
    return [(h, w) for t, h, w in grid.tolist() for _ in range(t)]


def raster_ids(grid):
    """[N, 2] (row, col) per patch, raster order inside every frame."""
    ids = []
    for h, w in frames_of(grid):
        i = torch.arange(h * w)
        ids.append(torch.stack([i // w, i % w], dim=-1))
    return torch.cat(ids)


def ref_tower(hf, pixels, grid, position_ids=None, segments=None):
    vm = hf  # transformers 5: SiglipVisionModel holds embeddings, encoder, post_layernorm
    x = vm.embeddings.patch_embedding(pixels).flatten(1)  # [N, D]
    table = vm.embeddings.position_embedding.weight.reshape(1, SIDE, SIDE, HIDDEN)
    pos = [F.interpolate(table.permute(0, 3, 1, 2), size=(h, w), mode="bilinear",
                         align_corners=False)[0].permute(1, 2, 0).reshape(h * w, HIDDEN)
           for h, w in frames_of(grid)]
    x = x + torch.cat(pos)
    rope = Qwen2_5_VLVisionRotaryEmbedding(Qwen2_5_VLVisionConfig(hidden_size=HIDDEN,
                                                                  num_heads=HEADS))
    ids = raster_ids(grid) if position_ids is None else position_ids
    cos, sin = rope(x, ids)
    sizes = [h * w for h, w in frames_of(grid)] if segments is None else segments
    hd = HIDDEN // HEADS
    for layer in vm.encoder.layers:
        a = layer.self_attn
        h = layer.layer_norm1(x)
        q, k, v = (proj(h).view(-1, HEADS, hd) for proj in (a.q_proj, a.k_proj, a.v_proj))
        q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)
        outs = []
        for qs, ks, vs in zip(q.split(sizes), k.split(sizes), v.split(sizes)):
            scores = torch.einsum("qhd,khd->hqk", qs, ks) * hd ** -0.5
            outs.append(torch.einsum("hqk,khd->qhd", scores.softmax(-1), vs))
        x = x + a.out_proj(torch.cat(outs).reshape(-1, HIDDEN))
        x = x + layer.mlp(layer.layer_norm2(x))
    return vm.post_layernorm(x)


def ref_merge(features, grid):
    rows = []
    for (h, w), x in zip(frames_of(grid), features.split([h * w for h, w in frames_of(grid)])):
        x = x.view(1, h // 2, 2, w // 2, 2, HIDDEN).permute(0, 1, 3, 2, 4, 5)
        rows.append(x.reshape(-1, 4 * HIDDEN))
    return torch.cat(rows)


def ref_project(merger, merged):
    x = merger["linear_1"](merger["pre_norm"](merged))
    return merger["linear_2"](F.gelu(x))


# --------------------------------------------------------------------------- ours


def copy_from_reference(tower, hf):
    """Explicit mapping of SigLIP's modules onto ours (q/k/v fused per head, megatron style)."""
    vm, sd = hf, {}
    sd["patch_embed.weight"] = vm.embeddings.patch_embedding.weight
    sd["patch_embed.bias"] = vm.embeddings.patch_embedding.bias
    sd["pos_embed.weight"] = vm.embeddings.position_embedding.weight
    sd["encoder.final_layernorm.weight"] = vm.post_layernorm.weight
    sd["encoder.final_layernorm.bias"] = vm.post_layernorm.bias
    hd = HIDDEN // HEADS
    for i, layer in enumerate(vm.encoder.layers):
        o, a = f"encoder.layers.{i}.", layer.self_attn
        for p in ("weight", "bias"):
            sd[o + f"input_layernorm.{p}"] = getattr(layer.layer_norm1, p)
            sd[o + f"pre_mlp_layernorm.{p}"] = getattr(layer.layer_norm2, p)
            sd[o + f"self_attention.linear_proj.{p}"] = getattr(a.out_proj, p)
            sd[o + f"mlp.linear_fc1.{p}"] = getattr(layer.mlp.fc1, p)
            sd[o + f"mlp.linear_fc2.{p}"] = getattr(layer.mlp.fc2, p)
            q, k, v = (getattr(getattr(a, f"{n}_proj"), p) for n in "qkv")
            per_head = torch.cat([t.reshape(HEADS, hd, *t.shape[1:]) for t in (q, k, v)], 1)
            sd[o + f"self_attention.linear_qkv.{p}"] = per_head.reshape(3 * HIDDEN, *q.shape[1:])
    params = dict(tower.named_parameters())
    assert params.keys() == sd.keys()
    with torch.no_grad():
        for name, value in sd.items():
            params[name].copy_(value)


@pytest.fixture(scope="module")
def ours(megatron_groups, hf_siglip, ref_merger):
    from megatron_vlm.config import ParallelConfig
    from megatron_vlm.families.keye.config import KeyeMergerConfig
    from megatron_vlm.families.keye.merger import build_keye_merger
    from megatron_vlm.families.keye.vision import build_keye_vision

    tower = build_keye_vision(vision_config(), ParallelConfig()).eval()
    copy_from_reference(tower, hf_siglip)
    merger = build_keye_merger(KeyeMergerConfig(vision_hidden_size=HIDDEN, merge_size=4,
                                                output_size=LLM), ParallelConfig()).eval()
    with torch.no_grad():
        for ours_name, ref in (("pre_norm", "pre_norm"), ("mlp.linear_fc1", "linear_1"),
                               ("mlp.linear_fc2", "linear_2")):
            for p in ("weight", "bias"):
                merger.get_parameter(f"{ours_name}.{p}").copy_(
                    ref_merger[ref].get_parameter(p))
    return tower, merger


def pixels_for(grid, seed):
    n = int(grid.prod(dim=1).sum())
    return torch.rand(n, 3, 14, 14, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def assert_close(actual, expected, atol=ATOL):
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    diff = (actual - expected).abs().max().item()
    assert diff <= atol, f"max abs diff {diff:.3e} > {atol:.0e}"


# --------------------------------------------------------------------------- tests


def test_packed_images_and_video_equal_reference(ours, hf_siglip, ref_merger):
    """Images 4x6 and 6x2 (table up/down-sampled, h != w) and a 2-frame 4x4 video (the table's
    own size) in one packed call: pre-merge features, merged rows and LLM embeddings."""
    tower, merger = ours
    pixels = pixels_for(GRID, seed=0)
    with torch.no_grad():
        expected = ref_tower(hf_siglip, pixels, GRID)
        expected_llm = ref_project(ref_merger, ref_merge(expected, GRID))
        got = tower.encode(pixels, GRID)
        grouped = tower(pixels, GRID)
        got_llm = merger(grouped)
    assert_close(got, expected)
    assert expected.abs().max() > 0.5
    assert grouped.shape == (6 + 3 + 2 * 4, 4, HIDDEN)  # one token per 2x2 per frame
    assert_close(grouped.flatten(1), ref_merge(expected, GRID))
    assert_close(got_llm, expected_llm)
    assert got_llm.shape == (17, LLM)
    from megatron_vlm.families.keye.merger import llm_tokens_per_item

    assert llm_tokens_per_item(vision_config(), GRID).tolist() == [6, 3, 8]


def test_frames_are_separate_segments(ours):
    """A video's frames never attend to each other and share positions: swapping the two frames
    swaps the outputs; the packed call equals one call per item."""
    tower, _ = ours
    pixels = pixels_for(GRID, seed=1)
    video = slice(24 + 12, None)
    swapped = pixels.clone()
    swapped[video] = pixels[video].view(2, 16, 3, 14, 14).flip(0).reshape(32, 3, 14, 14)
    with torch.no_grad():
        out = tower.encode(pixels, GRID)
        out_swapped = tower.encode(swapped, GRID)
        alone = torch.cat([tower.encode(x, g[None]) for x, g in
                           zip(pixels.split(GRID.prod(dim=1).tolist()), GRID)])
    assert_close(out_swapped[video], out[video].view(2, 16, HIDDEN).flip(0).reshape(32, HIDDEN))
    assert_close(alone, out)


def test_reference_is_sensitive(hf_siglip, ours):
    """Controls: the block-major ids of transformers' helper, or one segment for the whole video,
    move the reference far from ours, so the equality above can fail."""
    from transformers.vision_utils import get_vision_position_ids

    tower, _ = ours
    pixels = pixels_for(GRID, seed=2)
    with torch.no_grad():
        got = tower.encode(pixels, GRID)
        block_major = ref_tower(hf_siglip, pixels, GRID, get_vision_position_ids(GRID, 2))
        one_segment = ref_tower(hf_siglip, pixels, GRID, segments=GRID.prod(dim=1).tolist())
    assert (block_major - got).abs().max() > 1e3 * ATOL
    assert (one_segment[36:] - got[36:]).abs().max() > 1e3 * ATOL
    assert_close(one_segment[:36], got[:36])  # the images are one segment either way


def test_init_from_siglip_checkpoint(hf_siglip, ours, tmp_path):
    """save_pretrained's files -> init_from_siglip: every tower tensor equals the explicit
    mapping's, the config is read from config.json, the pooling head is skipped."""
    from megatron_vlm.config import ParallelConfig
    from megatron_vlm.families.keye.siglip_init import (
        init_from_siglip,
        read_siglip_checkpoint,
        siglip_vision_config,
    )
    from megatron_vlm.families.keye.vision import build_keye_vision

    tower, _ = ours
    hf_siglip.save_pretrained(tmp_path)
    hf_config, state = read_siglip_checkpoint(tmp_path)
    vision = siglip_vision_config(hf_config)
    assert vision == vision_config()
    fresh = build_keye_vision(vision, ParallelConfig()).eval()
    skipped = init_from_siglip(fresh, state)
    assert skipped and all(k.startswith("head.") for k in skipped)
    theirs = dict(tower.named_parameters())
    for name, p in fresh.named_parameters():
        torch.testing.assert_close(p, theirs[name], rtol=0, atol=0, msg=name)
    # A SiglipModel's layout: the tower under ``vision_model.``, a text tower beside it.
    released = {f"vision_model.{k}": v for k, v in state.items()}
    released.update({"text_model.embeddings.token_embedding.weight": torch.zeros(3, 2),
                     "logit_scale": torch.zeros(1)})
    assert set(init_from_siglip(fresh, released)) == {
        "logit_scale", "text_model.embeddings.token_embedding.weight",
        *(f"vision_model.{k}" for k in skipped)}
    bad = {k: v for k, v in state.items() if "layers.1." not in k}
    with pytest.raises(ValueError, match="lacks"):
        init_from_siglip(fresh, bad)


def test_configs_refuse_with_the_fix():
    """Validation names the config key; the defaults are Keye-VL 1.5's sizes."""
    from megatron_vlm.families.keye.config import (
        KeyeMergerConfig,
        keye_merger_config,
        keye_vision_config,
    )

    real = keye_vision_config()
    assert (real.head_dim, real.merged_hidden_size, real.pos_emb_side) == (72, 4608, 27)
    assert keye_merger_config().intermediate_size == 4608
    with pytest.raises(ValueError, match="num_attention_heads=5 does not divide"):
        _vision(num_attention_heads=5)
    with pytest.raises(ValueError, match="multiple of 4"):
        _vision(hidden_size=24, num_attention_heads=4)  # head dim 6
    with pytest.raises(ValueError, match="model.projector.output_size=48 != model.llm"):
        KeyeMergerConfig(vision_hidden_size=HIDDEN, output_size=48).check_matches(
            vision_config(), 4096)


def _vision(**fields):
    from megatron_vlm.families.keye.config import SiglipVisionConfig

    return SiglipVisionConfig(**fields)
