"""MoonViT on megatron blocks, single process: packing, recompute, bf16, bad grids, parameters.
(Equality with transformers is in tests/reference/test_moonvit_hf.py.)"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from megatron_vlm.config import ParallelConfig
from megatron_vlm.config.vision import VisionConfig, moonvit_config

TINY = VisionConfig(hidden_size=32, num_layers=2, num_attention_heads=4, ffn_hidden_size=64,
                    pos_emb_height=8, pos_emb_width=8)


def build(vision: VisionConfig = TINY, params_dtype: str = "fp32", seed: int = 0):
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from megatron_vlm.models.vision.moonvit import build_moonvit

    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)
    model = build_moonvit(vision, ParallelConfig(), params_dtype)
    with torch.no_grad():  # megatron zero-inits biases and unit-inits norms: make all count
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


def media(grid: list[list[int]], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    grid_thw = torch.tensor(grid)
    n = int(grid_thw.prod(dim=1).sum())
    return torch.randn(n, 3, 14, 14, generator=torch.Generator().manual_seed(seed)), grid_thw


def test_packed_items_equal_items_encoded_alone(megatron_groups):
    """Block-diagonal attention: packing images and video chunks changes nothing per item."""
    model = build()
    pixels, grid = media([[1, 4, 6], [4, 2, 4], [1, 10, 2], [2, 4, 4]], seed=1)
    with torch.no_grad():
        packed = model.encode(pixels, grid)
        alone = torch.cat([model.encode(px, g[None]) for px, g in
                           zip(pixels.split(grid.prod(dim=1).tolist()), grid)])
    torch.testing.assert_close(packed, alone, rtol=0, atol=1e-5)


def test_attention_spans_all_frames_of_a_chunk(megatron_groups):
    """Changing frame 3 of a 4-frame chunk changes the features of frame 0 (joint attention)."""
    model = build()
    pixels, grid = media([[4, 2, 2]], seed=2)
    edited = pixels.clone()
    edited[12:] += 1.0
    with torch.no_grad():
        a, b = model.encode(pixels, grid), model.encode(edited, grid)
    assert (a[:4] - b[:4]).abs().max() > 1e-3


def test_full_recompute_gives_the_same_gradients(megatron_groups):
    pixels, grid = media([[1, 4, 4], [3, 2, 2]], seed=3)
    grads = []
    for recompute in ("none", "full", "core_attn"):
        model = build(dataclasses.replace(TINY, recompute=recompute)).train()
        model(pixels, grid).square().sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    for other in grads[1:]:
        assert other.keys() == grads[0].keys()
        for name, g in grads[0].items():
            torch.testing.assert_close(other[name], g, rtol=0, atol=1e-6, msg=name)
    assert all(g.abs().sum() > 0 for g in grads[0].values())


def test_bf16_runs_close_to_fp32(megatron_groups):
    pixels, grid = media([[1, 4, 6], [2, 2, 2]], seed=4)
    fp32 = build()
    bf16 = build(params_dtype="bf16", seed=1)
    result = bf16.load_state_dict({k: v.to(torch.bfloat16) for k, v in fp32.state_dict().items()
                                   if not k.endswith("_extra_state")}, strict=False)
    assert not result.unexpected_keys
    assert all(k.endswith("_extra_state") for k in result.missing_keys)
    with torch.no_grad():
        ref, out = fp32(pixels, grid), bf16(pixels, grid)
    assert out.dtype == torch.bfloat16 and out.shape == ref.shape == (7, 4, 32)
    assert (out.float() - ref).abs().max() < 0.1


@pytest.mark.parametrize("grid,n,match", [
    ([[1, 4, 4]], 15, "describes 16 patches"),
    ([[5, 2, 2]], 20, "at most temporal_patch_size=4"),
    ([[1, 2, 3]], 6, "not divisible by the merge kernel"),
    ([[0, 2, 2]], 0, "must be >= 1"),
])
def test_bad_grids_are_errors(megatron_groups, grid, n, match):
    model = build()
    with pytest.raises(ValueError, match=match):
        model(torch.zeros(n, 3, 14, 14), torch.tensor(grid))


def test_parameter_count_and_biases(megatron_groups):
    """Closed form: conv + table + per layer (qkv, proj, fc1, fc2 with biases; 2 LayerNorms) +
    final LayerNorm."""
    v = TINY
    d, f = v.hidden_size, v.ffn_hidden_size
    per_layer = (3 * d * d + 3 * d) + (d * d + d) + (d * f + f) + (f * d + d) + 4 * d
    expected = (3 * 14 * 14 * d + d) + 8 * 8 * d + v.num_layers * per_layer + 2 * d
    assert sum(p.numel() for p in build().parameters()) == expected


def test_megatron_config_mapping():
    from megatron_vlm.models.vision.moonvit import build_vision_transformer_config

    config = build_vision_transformer_config(moonvit_config(), ParallelConfig())
    assert (config.hidden_size, config.num_layers, config.num_attention_heads) == (1152, 27, 16)
    assert (config.kv_channels, config.ffn_hidden_size) == (72, 4304)
    assert config.layernorm_epsilon == 1e-5 and config.normalization == "LayerNorm"
    assert config.add_bias_linear and config.add_qkv_bias and not config.gated_linear_unit
    x = torch.linspace(-4, 4, 9)
    torch.testing.assert_close(config.activation_func(x), F.gelu(x, approximate="tanh"))
    assert config.pipeline_model_parallel_size == 1 and config.context_parallel_size == 1
    with pytest.raises(ValueError, match="does not divide model.vision.num_attention_heads"):
        build_vision_transformer_config(moonvit_config(), ParallelConfig(tp=3))
