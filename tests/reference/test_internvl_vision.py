"""InternVL3.5 vision tower + projector == transformers 5.25 ``InternVLModel.get_image_features``.

Two tiny random ``InternVLConfig`` s, fp32: a 300M-style tower (LayerNorm, q/k/v biases) and a
6B-style one (RMSNorm, whole-width qk-norm, no q/k/v bias), both with layer scale, CLS token and
learned table, pixel shuffle 0.5 and ``mlp1``. Tiles are 112 px (8x8 patches of 14, 16 LLM
tokens each) so the test stays small; our tower takes them as raster ``[N, 3, 14, 14]`` patches
with one ``grid_thw`` row ``(tiles, 8, 8)`` per image. Every HF tensor is perturbed away from its
init (LayerNorm 1/0, layer scale 0.1, zero CLS/table) so a wrong mapping changes the output.
Weights are copied through the family's HF name map.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")
from hf_fixtures import perturb
from transformers.models.internvl.configuration_internvl import InternVLConfig
from transformers.models.internvl.modeling_internvl import InternVLModel

ATOL = 1e-5
HIDDEN, HEADS, LAYERS, FFN, OUT, SIDE, PATCH = 64, 4, 2, 96, 48, 8, 14
TILE = SIDE * PATCH
GRID = torch.tensor([[3, SIDE, SIDE], [1, SIDE, SIDE], [2, SIDE, SIDE]])  # 6 tiles, 3 images
TILES = int(GRID[:, 0].sum())
TOKENS_PER_TILE = SIDE * SIDE // 4
VARIANTS = {
    "300m": dict(norm_type="layer_norm", use_qk_norm=False, attention_bias=True),
    "6b": dict(norm_type="rms_norm", use_qk_norm=True, attention_bias=False),
}


def hf_model(variant: str, seed: int) -> InternVLModel:
    torch.manual_seed(seed)
    vision = dict(hidden_size=HIDDEN, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                  intermediate_size=FFN, image_size=TILE, patch_size=PATCH,
                  layer_norm_eps=1e-6, **VARIANTS[variant])
    text = dict(model_type="qwen2", vocab_size=64, hidden_size=OUT, intermediate_size=64,
                num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
    config = InternVLConfig(vision_config=vision, text_config=text, downsample_ratio=0.5)
    config.vision_config._attn_implementation = "eager"
    model = InternVLModel(config).eval()
    perturb(model.vision_tower, seed=seed + 10)
    perturb(model.multi_modal_projector, seed=seed + 20)
    return model


@pytest.fixture(scope="module")
def hf_300m():
    return hf_model("300m", seed=0)


@pytest.fixture(scope="module")
def hf_6b():
    return hf_model("6b", seed=1)


def configs(variant: str):
    from megatron_vlm.families.internvl.config import InternVisionConfig, InternVLProjectorConfig

    v = VARIANTS[variant]
    vision = InternVisionConfig(
        hidden_size=HIDDEN, num_layers=LAYERS, num_attention_heads=HEADS, ffn_hidden_size=FFN,
        patch_size=PATCH, pos_emb_side=SIDE, norm_type=v["norm_type"], norm_epsilon=1e-6,
        qkv_bias=v["attention_bias"], qk_norm=v["use_qk_norm"])
    projector = InternVLProjectorConfig(vision_hidden_size=HIDDEN, merge_size=4, output_size=OUT)
    return vision, projector


def name_table():
    from megatron_vlm.convert.rules import ConvertContext, Table
    from megatron_vlm.families.internvl.hf_vision_names import internvl_visual_rules

    rules = internvl_visual_rules(hf_vision_prefix="vision_tower.",
                                  hf_projector_prefix="multi_modal_projector.")
    return Table(rules, ConvertContext(vision_num_heads=HEADS))


def hf_visual_state(hf: InternVLModel) -> dict:
    return {k: v for k, v in hf.state_dict().items() if not k.startswith("language_model.")}


def copy_by_name_map(tower, projector, hf: InternVLModel) -> None:
    """Fill our tower and projector from the HF model through the family's rules."""
    table, state, used = name_table(), hf_visual_state(hf), []
    with torch.no_grad():
        for prefix, module in (("vision_tower.", tower), ("projector.", projector)):
            for name, param in module.named_parameters():
                rule, binding = table.lookup(prefix + name)
                names = rule.hf_names(binding)
                used += names
                param.copy_(rule.transform.to_ours([state[n] for n in names], table.ctx))
    assert sorted(used) == sorted(state), set(state) ^ set(used)  # each HF tensor exactly once


def build_ours(hf: InternVLModel, variant: str):
    from megatron_vlm.config import ParallelConfig
    from megatron_vlm.families.internvl.projector import build_internvl_projector
    from megatron_vlm.families.internvl.vision import build_internvit

    vision, projector_config = configs(variant)
    tower = build_internvit(vision, ParallelConfig()).eval()
    projector = build_internvl_projector(projector_config, ParallelConfig()).eval()
    copy_by_name_map(tower, projector, hf)
    return tower, projector


@pytest.fixture(scope="module")
def ours_300m(megatron_groups, hf_300m):
    return build_ours(hf_300m, "300m")


@pytest.fixture(scope="module")
def ours_6b(megatron_groups, hf_6b):
    return build_ours(hf_6b, "6b")


def tiles_for(num_tiles: int, seed: int, side: int = SIDE) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(num_tiles, 3, side * PATCH, side * PATCH, generator=gen) * 2 - 1


def to_patches(tiles: torch.Tensor) -> torch.Tensor:
    """``[T, 3, H, W]`` tiles -> raster ``[T*h*w, 3, 14, 14]`` patches (the data side's
    layout)."""
    t, c, height, width = tiles.shape
    x = tiles.view(t, c, height // PATCH, PATCH, width // PATCH, PATCH)
    return x.permute(0, 2, 4, 1, 3, 5).reshape(-1, c, PATCH, PATCH)


def assert_close(actual, expected, atol=ATOL):
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    diff = (actual - expected).abs().max().item()
    assert diff <= atol, f"max abs diff {diff:.3e} > {atol:.0e}"


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize("variant", ["300m", "6b"])
def test_packed_tiles_equal_get_image_features(variant, request):
    """Three images of 3, 1 and 2 tiles in one packed call: the LLM embeddings of every tile,
    and the tower's per-patch features (CLS dropped), equal transformers'."""
    hf = request.getfixturevalue(f"hf_{variant}")
    tower, projector = request.getfixturevalue(f"ours_{variant}")
    tiles = tiles_for(TILES, seed=0)
    with torch.no_grad():
        out = hf.get_image_features(tiles)
        expected = out.pooler_output  # [tiles, 16, OUT]
        pre = out.last_hidden_state[:, 1:]  # CLS dropped
        got_pre = tower.encode(to_patches(tiles), GRID)
        got = projector(tower(to_patches(tiles), GRID))
    assert expected.abs().max() > 0.1 and pre.abs().max() > 0.5
    assert_close(got_pre, pre.reshape(-1, HIDDEN))
    assert_close(got, expected.reshape(-1, OUT))
    assert got.shape == (TILES * TOKENS_PER_TILE, OUT)


def test_tiles_are_separate_segments_and_cls_matters(ours_300m, hf_300m, monkeypatch):
    """Tiles never attend to each other (packed == one call per tile; swapping two tiles of an
    image swaps their features); controls: another CLS token (every patch attends to it), or
    the layer scales at 1, move ours far from the reference."""
    from megatron_vlm.families.internvl.vision import LayerScaleBiasDropoutAdd

    tower, _ = ours_300m
    tiles = tiles_for(TILES, seed=1)
    patches, per_tile = to_patches(tiles), SIDE * SIDE
    one = torch.tensor([[1, SIDE, SIDE]])
    with torch.no_grad():
        pre = hf_300m.get_image_features(tiles).last_hidden_state[:, 1:].reshape(-1, HIDDEN)
        got = tower.encode(patches, GRID)
        alone = torch.cat([tower.encode(p, one) for p in patches.split(per_tile)])
        swapped = tower.encode(to_patches(tiles[[1, 0, 2, 3, 4, 5]]), GRID)
        scales = [m.weight for m in tower.modules() if isinstance(m, LayerScaleBiasDropoutAdd)]
        saved = [w.clone() for w in scales]
        for w in scales:
            w.fill_(1.0)
        unscaled = tower.encode(patches, GRID)
        for w, s in zip(scales, saved):
            w.copy_(s)
        cls = tower.pos_embed.cls_token.clone()
        # (a constant shift would vanish in the first LayerNorm)
        tower.pos_embed.cls_token.add_(torch.randn(HIDDEN, generator=torch.Generator()
                                                   .manual_seed(5)))
        moved_cls = tower.encode(patches, GRID)
        tower.pos_embed.cls_token.copy_(cls)
    assert_close(alone, got)
    assert_close(swapped[:per_tile], got[per_tile:2 * per_tile])
    assert (unscaled - pre).abs().max() > 1e3 * ATOL
    assert (moved_cls - pre).abs().max() > 1e3 * ATOL
    assert_close(tower.encode(patches, GRID).detach(), pre)  # restored


def test_qk_norm_is_whole_width(ours_6b, hf_6b, monkeypatch):
    """The 6B's q/k norm spans all heads: one norm equals transformers' ``q_norm`` on a row;
    control: megatron's per-head reading of the same weights (each head normalised on its own)
    moves the tower far from the reference."""
    from megatron_vlm.families.internvl.vision import WholeWidthRMSNorm

    tower, _ = ours_6b
    tiles = tiles_for(2, seed=2)
    grid = torch.tensor([[2, SIDE, SIDE]])
    norms = [m for m in tower.modules() if isinstance(m, WholeWidthRMSNorm)]
    assert len(norms) == 2 * LAYERS

    def per_head(self, x):
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight.view(x.shape[-2:]) * xf.to(x.dtype)

    x = torch.randn(3, 1, HEADS, HIDDEN // HEADS)
    with torch.no_grad():
        pre = hf_6b.get_image_features(tiles).last_hidden_state[:, 1:].reshape(-1, HIDDEN)
        hf_norm = hf_6b.vision_tower.encoder.layer[0].attention.q_norm
        assert_close(norms[0](x).flatten(-2), hf_norm(x.flatten(-2)))
        got = tower.encode(to_patches(tiles), grid)
        with monkeypatch.context() as m:
            m.setattr(WholeWidthRMSNorm, "forward", per_head)
            got_per_head = tower.encode(to_patches(tiles), grid)
    assert_close(got, pre)
    assert (got_per_head - pre).abs().max() > 1e3 * ATOL
    # megatron 0.16.1's finalize_model_grads sums over TP the grads of every parameter named
    # *q_layernorm* / *k_layernorm* when the LLM has qk_layernorm (Qwen3): these TP-sharded
    # norms must not carry those names.
    names = [n for n, _ in tower.named_parameters()]
    assert sum(".self_attention.q_norm." in n for n in names) == LAYERS
    assert not any("q_layernorm" in n or "k_layernorm" in n for n in names)


def test_pixel_shuffle_is_the_towers_merge(ours_300m, hf_300m):
    """The literal port of InternVL's pixel shuffle equals transformers' and the tower's 2x2
    row-major merge; the projector takes either form."""
    from megatron_vlm.families.internvl.projector import pixel_shuffle

    tower, projector = ours_300m
    x = torch.randn(3, SIDE, SIDE, HIDDEN)
    assert torch.equal(pixel_shuffle(x), hf_300m.pixel_shuffle(x, scale_factor=0.5))
    grid = torch.tensor([[3, SIDE, SIDE]])
    merged = tower._merge(x.reshape(-1, HIDDEN), tower.segments(grid))
    shuffled = pixel_shuffle(x).reshape(-1, 4 * HIDDEN)
    assert torch.equal(merged.flatten(1), shuffled)
    with torch.no_grad():
        assert torch.equal(projector(merged), projector(shuffled))
    with pytest.raises(ValueError, match="divisible by 2"):
        pixel_shuffle(torch.randn(1, 3, 4, 8))


def test_tokens_and_configs():
    """Token counts per item; validation names the config key; real sizes."""
    from megatron_vlm.families.internvl.config import (
        InternVisionConfig,
        internvit_6b_config,
        internvit_300m_config,
        internvl_projector_config,
    )
    from megatron_vlm.families.internvl.projector import llm_tokens_per_item

    vision, projector = configs("300m")
    assert llm_tokens_per_item(vision, GRID).tolist() == [48, 16, 32]
    with pytest.raises(ValueError, match="448 px"):
        llm_tokens_per_item(vision, torch.tensor([[1, 3, 4]]))
    small, big = internvit_300m_config(), internvit_6b_config()
    assert (small.tile_size, small.tokens_per_tile, small.head_dim) == (448, 256, 64)
    assert (big.head_dim, big.merged_hidden_size) == (128, 12800)
    assert internvl_projector_config(big, 5120).input_size == 12800
    with pytest.raises(ValueError, match="num_attention_heads=5 does not divide"):
        InternVisionConfig(num_attention_heads=5)
    with pytest.raises(ValueError, match="model.vision.norm_type='batch_norm'"):
        InternVisionConfig(norm_type="batch_norm")
    with pytest.raises(ValueError, match="model.projector.output_size=48 != model.llm"):
        projector.check_matches(vision, 4096)


def test_other_grid_resizes_table_as_transformers(ours_300m, hf_300m):
    """A tile of another size (6x6 patches) resizes the table bicubically as transformers'
    ``interpolate_pos_encoding`` does (InternVL's own tiles are always the table's size)."""
    tower, _ = ours_300m
    tile = tiles_for(1, seed=6, side=6)
    with torch.no_grad():
        expected = hf_300m.vision_tower(tile).last_hidden_state[0, 1:]
        got = tower.encode(to_patches(tile), torch.tensor([[1, 6, 6]]))
    assert_close(got, expected)


@pytest.mark.parametrize("variant", ["300m", "6b"])
def test_cost_model_matches_modules(variant, request):
    """``costs.vision_tensors`` names every parameter with its shape (TP 1); ``step_flops``
    equals torch's FLOP counter on our forward (conv and matmuls) plus the per-tile attention
    (CLS included) counted here; the planner's ``vision_flops`` of a one-item budget equals
    ``step_flops`` of that item."""
    from torch.utils.flop_counter import FlopCounterMode

    from megatron_vlm.families.internvl import costs
    from megatron_vlm.planning.costs import VisionBudget

    tower, projector = request.getfixturevalue(f"ours_{variant}")
    vision, projector_config = configs(variant)
    params = {n: tuple(p.shape) for n, p in tower.named_parameters(prefix="vision_tower")}
    params.update({n: tuple(p.shape) for n, p in projector.named_parameters(prefix="projector")})
    assert {t.name: t.shape for t in costs.vision_tensors(vision, projector_config, "bf16", 1)} \
        == params
    patches = to_patches(tiles_for(TILES, seed=7))
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        projector(tower(patches, GRID))
    attention = 4 * LAYERS * HIDDEN * TILES * (SIDE * SIDE + 1) ** 2
    step = costs.step_flops(vision, OUT, GRID, projector_config)
    assert step == pytest.approx(3 * (counter.get_total_flops() + attention), rel=1e-12)
    budget = VisionBudget(patches_per_micro_batch=3 * SIDE * SIDE,
                          patches_per_item=3 * SIDE * SIDE, frames_per_item=3)
    planned = costs.vision_flops(vision, projector_config, budget)
    assert sum(planned.values()) == pytest.approx(
        costs.step_flops(vision, OUT, GRID[:1]), rel=1e-12)
    assert costs.vision_bytes(vision, projector_config, budget, tp=1, cp=1) > 0


def test_name_map_round_trip(ours_6b, hf_6b):
    """Export through the same rules gives transformers' tensors back bit for bit (q, k, v
    split from megatron's per-head qkv, the layer scales, the whole-width q/k norms)."""
    tower, projector = ours_6b
    table = name_table()
    ours = dict(tower.named_parameters(prefix="vision_tower"))
    ours.update(projector.named_parameters(prefix="projector"))
    exported = {}
    for name, param in ours.items():
        rule, binding = table.lookup(name)
        exported.update(zip(rule.hf_names(binding),
                            rule.transform.to_hf(param.detach(), table.ctx)))
    hf = hf_visual_state(hf_6b)
    assert exported.keys() == hf.keys()
    for name, value in hf.items():
        assert torch.equal(exported[name], value), name
    te = table.to_te_name("vision_tower.encoder.layers.1.pre_mlp_layernorm.weight")
    assert te == "vision_tower.encoder.layers.1.mlp.linear_fc1.layer_norm_weight"


@pytest.mark.parametrize("variant", ["300m", "6b"])
def test_real_size_parameter_count(variant):
    """The cost model's real-size tower + ``mlp1`` (into a 4096-wide LLM) hold as many
    parameters as transformers' ``InternVLVisionModel`` + ``InternVLMultiModalProjector`` of the
    same sizes (built on the meta device)."""
    from transformers.models.internvl.configuration_internvl import InternVLVisionConfig
    from transformers.models.internvl.modeling_internvl import (
        InternVLMultiModalProjector,
        InternVLVisionModel,
    )

    from megatron_vlm.families.internvl import costs
    from megatron_vlm.families.internvl.config import (
        internvit_6b_config,
        internvit_300m_config,
        internvl_projector_config,
    )

    vision = internvit_300m_config() if variant == "300m" else internvit_6b_config()
    hf_vision = InternVLVisionConfig(
        hidden_size=vision.hidden_size, num_hidden_layers=vision.num_layers,
        num_attention_heads=vision.num_attention_heads, intermediate_size=vision.ffn_hidden_size,
        norm_type=vision.norm_type, use_qk_norm=vision.qk_norm, attention_bias=vision.qkv_bias)
    config = InternVLConfig(vision_config=hf_vision.to_dict(),
                            text_config=dict(model_type="qwen2", hidden_size=4096))
    with torch.device("meta"):
        hf = [InternVLVisionModel(config.vision_config), InternVLMultiModalProjector(config)]
    ours = costs.vision_tensors(vision, internvl_projector_config(vision, 4096), "bf16", 1)
    expected = {"300m": 304_012_288 + 33_570_816, "6b": 5_536_496_000 + 69_239_808}[variant]
    assert sum(t.numel for t in ours) == sum(p.numel() for m in hf for p in m.parameters()) \
        == expected


def test_vision_config_from_and_to_hf(hf_6b):
    """transformers' ``InternVLConfig`` -> ours -> back: the tiny 6B-style one and both real
    presets; import refuses what the tower cannot run, naming the field."""
    import dataclasses

    from megatron_vlm.convert.rules import ConversionError
    from megatron_vlm.families.internvl.config import (
        internvit_6b_config,
        internvit_300m_config,
        internvl_projector_config,
    )
    from megatron_vlm.families.internvl.hf_vision_config import vision_from_hf, vision_to_hf

    hf = hf_6b.config.to_dict()
    vision, projector = vision_from_hf(hf, OUT)
    assert (vision, projector) == configs("6b")
    back = vision_to_hf(vision, projector)
    assert {k: hf[k] for k in back if k != "vision_config"} == \
        {k: v for k, v in back.items() if k != "vision_config"}
    hf_vision = {k: list(v) if isinstance(v, tuple) else v
                 for k, v in hf["vision_config"].items()}
    assert {k: hf_vision[k] for k in back["vision_config"]} == back["vision_config"]
    for real in (internvit_300m_config(), internvit_6b_config()):
        real = dataclasses.replace(real, parallel_mode="split")
        proj = internvl_projector_config(real, 4096)
        text = dict(model_type="qwen3", hidden_size=4096)
        rebuilt = InternVLConfig(**vision_to_hf(real, proj), text_config=text).to_dict()
        assert vision_from_hf(rebuilt, 4096) == (real, proj)
    with pytest.raises(ConversionError, match="vision_feature_layer=-2"):
        vision_from_hf({**hf, "vision_feature_layer": -2}, OUT)
    with pytest.raises(ConversionError, match="vision_config.use_mean_pooling=False"):
        vision_from_hf({**hf, "vision_config": {**hf["vision_config"],
                                                 "use_mean_pooling": False}}, OUT)
    with pytest.raises(ConversionError, match="downsample_ratio=0.3"):
        vision_from_hf({**hf, "downsample_ratio": 0.3}, OUT)


def remote_layout(hf_state: dict) -> dict:
    """transformers' state in the remote-code layout: the inverse of the renames and the qkv
    split of transformers' ``convert_internvl_weights_to_hf.py``, written out here."""
    renames = [("vision_tower.", "vision_model."), ("encoder.layer.", "encoder.layers."),
               ("cls_token", "class_embedding"), ("position_embeddings", "position_embedding"),
               ("patch_embeddings.projection", "patch_embedding"), ("lambda_", "ls"),
               ("attention.projection_layer", "attn.proj"), ("attention.", "attn."),
               ("layernorm_before", "norm1"), ("layernorm_after", "norm2"),
               ("multi_modal_projector.layer_norm", "mlp1.0"),
               ("multi_modal_projector.linear_1", "mlp1.1"),
               ("multi_modal_projector.linear_2", "mlp1.3")]
    out = {}
    for name, value in hf_state.items():
        for old, new in renames:
            name = name.replace(old, new)
        if ".attn.q_proj." in name:
            parts = [hf_state_value(hf_state, name, x) for x in "qkv"]
            out[name.replace(".attn.q_proj.", ".attn.qkv.")] = torch.cat(parts)
        elif ".attn.k_proj." not in name and ".attn.v_proj." not in name:
            out[name] = value
    return out


def hf_state_value(hf_state: dict, remote_name: str, which: str):
    layer, rest = remote_name.split(".encoder.layers.")[1].split(".", 1)
    return hf_state[f"vision_tower.encoder.layer.{layer}.attention.{which}_proj."
                    + rest.rsplit(".", 1)[1]]


@pytest.mark.parametrize("variant", ["300m", "6b"])
def test_remote_code_layout_round_trip(variant, request):
    """The remote-code checkpoint layout (fused ``attn.qkv``, ``ls1``/``ls2``, ``mlp1.{0,1,3}``)
    imports to exactly the tensors the HF layout gives, and exports back bit for bit."""
    from megatron_vlm.convert.rules import ConvertContext, Table
    from megatron_vlm.families.internvl.hf_vision_names import internvl_remote_visual_rules

    hf = request.getfixturevalue(f"hf_{variant}")
    tower, projector = request.getfixturevalue(f"ours_{variant}")
    remote = remote_layout(hf_visual_state(hf))
    table = Table(internvl_remote_visual_rules(), ConvertContext(vision_num_heads=HEADS))
    ours = dict(tower.named_parameters(prefix="vision_tower"))
    ours.update(projector.named_parameters(prefix="projector"))
    exported = {}
    for name, param in ours.items():
        rule, binding = table.lookup(name)
        names = rule.hf_names(binding)
        assert torch.equal(rule.transform.to_ours([remote[n] for n in names], table.ctx), param)
        exported.update(zip(names, rule.transform.to_hf(param.detach(), table.ctx)))
    assert exported.keys() == remote.keys()
    assert all(torch.equal(exported[n], v) for n, v in remote.items())
    assert ("vision_model.encoder.layers.0.attn.qkv.bias" in remote) == (variant == "300m")


def test_full_recompute_same_grads(ours_6b):
    """``model.vision.recompute='full'`` (megatron re-runs each layer, layer scales and the
    whole-width q/k norms included) gives the same features and gradients."""
    import dataclasses

    from megatron_vlm.config import ParallelConfig
    from megatron_vlm.families.internvl.vision import build_internvit

    tower, _ = ours_6b
    vision, _ = configs("6b")
    recomputed = build_internvit(dataclasses.replace(vision, recompute="full"), ParallelConfig())
    recomputed.load_state_dict(tower.state_dict())
    patches = to_patches(tiles_for(2, seed=8))
    grid = torch.tensor([[2, SIDE, SIDE]])
    grads, calls = [], []
    recomputed.encoder.layers[0].register_forward_hook(lambda *_: calls.append(1))
    for model in (tower, recomputed):
        model.train()
        model.zero_grad()
        out = model(patches, grid)
        (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        model.eval()
        model.zero_grad()
    assert grads[0].keys() == grads[1].keys()
    for name, grad in grads[0].items():
        assert_close(grads[1][name], grad)
    assert grads[0]["encoder.layers.0.self_attention.q_norm.weight"].abs().max() > 0
    assert len(calls) == 2  # forward, then the recompute in backward
