"""Our MoonViT / MoonViT-3D (megatron-core blocks) vs transformers 5.23 ``Kimi_K25VisionModel``.

Weights are copied from the HF module (and, once, from the files ``save_pretrained`` writes);
fp32 throughout. Tolerance: ``ATOL`` = 2e-5 absolute on LayerNorm'd features of size ~1 (observed
differences are ~1e-6: the same math in a different summation order).

HF 5.23 cannot encode items with different t in one call (its merge gather concatenates
``[n, t, 4]`` blocks of different t and raises), so mixed-t references are per-item HF calls --
equivalent, because attention is block-diagonal per item in both.
"""

from __future__ import annotations

import pytest
import torch

ATOL = 2e-5
NUM_HEADS = 4  # conftest.VISION


def hf_encode(hf_vit, pixel_values, grid_thw):
    with torch.no_grad():
        out = hf_vit(pixel_values, grid_thw=grid_thw)
    return out.last_hidden_state, out.pooler_output


def ours_encode(model, pixel_values, grid_thw):
    with torch.no_grad():
        return model.encode(pixel_values, grid_thw), model(pixel_values, grid_thw)


@pytest.fixture(scope="module")
def hf_vit(hf_kimi):
    return hf_kimi.model.vision_tower


@pytest.fixture(scope="module")
def ours(ours_from_hf):
    return ours_from_hf()


def assert_close(actual, expected, atol=ATOL):
    assert actual.shape == expected.shape
    diff = (actual - expected).abs().max().item()
    assert diff <= atol, f"max abs diff {diff:.3e} > {atol:.0e}"


def test_one_image(hf_vit, ours, media):
    """A 6x8 grid (not the 8x8 table: bicubic resampling; h != w: row/column roles)."""
    pixels, grid = media([[1, 6, 8]], seed=0)
    hf_last, hf_merged = hf_encode(hf_vit, pixels, grid)
    last, merged = ours_encode(ours, pixels, grid)
    assert_close(last, hf_last)
    assert_close(merged, hf_merged)
    assert merged.shape == (12, 4, 32)


def test_images_of_different_sizes_packed(hf_vit, ours, media):
    """Four images in one packed sequence: up- and down-sampled tables, the native 8x8 size and a
    single merged token."""
    pixels, grid = media([[1, 4, 6], [1, 10, 4], [1, 8, 8], [1, 2, 2]], seed=1)
    hf_last, hf_merged = hf_encode(hf_vit, pixels, grid)
    last, merged = ours_encode(ours, pixels, grid)
    assert_close(last, hf_last)
    assert_close(merged, hf_merged)


def test_four_frame_chunk(hf_vit, ours, media):
    """One video chunk t=4: temporal rows 1..4, attention across all frames, frame mean."""
    pixels, grid = media([[4, 4, 6]], seed=2)
    hf_last, hf_merged = hf_encode(hf_vit, pixels, grid)
    last, merged = ours_encode(ours, pixels, grid)
    assert_close(last, hf_last)
    assert_close(merged, hf_merged)
    assert merged.shape == (6, 4, 32)  # 4x temporal compression: one frame's tokens
    # Frame order matters (temporal table), so reversing the frames must change the result.
    reversed_pixels = pixels.view(4, 24, 3, 14, 14).flip(0).reshape_as(pixels)
    _, merged_rev = ours_encode(ours, reversed_pixels, grid)
    assert (merged_rev - merged).abs().max() > 1e-3


def test_six_frame_video_as_chunks_4_plus_2_packed_with_an_image(hf_vit, ours, media):
    """A 6-frame video as chunks t=4 and t=2 (the short last chunk, never padded), packed with an
    image, in one call of ours; HF per item (see module docstring)."""
    pixels, grid = media([[4, 4, 6], [2, 4, 6], [1, 6, 4]], seed=3)
    sizes = grid.prod(dim=1).tolist()
    hf_last, hf_merged = [], []
    for px, g in zip(pixels.split(sizes), grid):
        last, merged = hf_encode(hf_vit, px, g[None])
        hf_last.append(last)
        hf_merged.append(merged)
    last, merged = ours_encode(ours, pixels, grid)
    assert_close(last, torch.cat(hf_last))
    assert_close(merged, torch.cat(hf_merged))
    assert merged.shape[0] == 6 + 6 + 6


def test_one_frame_last_chunk_uses_the_zero_temporal_row(hf_vit, ours, media):
    """A video whose last chunk has a single frame: t=1 means the zero row, like an image."""
    pixels, grid = media([[4, 2, 4], [1, 2, 4]], seed=4)
    sizes = grid.prod(dim=1).tolist()
    ref = torch.cat([hf_encode(hf_vit, px, g[None])[1] for px, g in zip(pixels.split(sizes), grid)])
    _, merged = ours_encode(ours, pixels, grid)
    assert_close(merged, ref)


def test_merger_matches_hf_temporal_merge(hf_vit):
    """Our gather-based merger vs HF's scatter-add ``Kimi_K25VisionModel.temporal_merge`` (the
    public method its forward pools with; mixed t in one call)."""
    from megatron_vlm.models.vision.merger import tpool_patch_merger

    grid = torch.tensor([[1, 4, 6], [4, 2, 4], [2, 6, 2], [1, 2, 2], [3, 2, 2]])
    x = torch.randn(int(grid.prod(dim=1).sum()), 32, generator=torch.Generator().manual_seed(5))
    expected = hf_vit.temporal_merge(x, grid, 2, 2)
    actual = tpool_patch_merger(x, grid, 2, 2)
    assert_close(actual, expected, atol=1e-6)


def test_weights_from_saved_checkpoint_layout(hf_kimi, hf_checkpoint, ours_from_hf, media):
    """Weights read from the files ``save_pretrained`` writes (fused ``wqkv`` with interleaved
    q/k rows, ``blocks.N.norm0``/``mlp.fc0`` names) give the same model as the in-memory HF
    module (rotate-half q/k after transformers' load-time permutation)."""
    from megatron_vlm.models.vision.hf_weights import load_state, vision_state_from_hf

    assert any(".wqkv." in k for k in hf_checkpoint)  # really the checkpoint layout
    model = ours_from_hf()
    load_state(model, vision_state_from_hf(hf_checkpoint, NUM_HEADS))
    pixels, grid = media([[1, 6, 4], [1, 4, 4]], seed=6)
    _, hf_merged = hf_encode(hf_kimi.model.vision_tower, pixels, grid)
    _, merged = ours_encode(model, pixels, grid)
    assert_close(merged, hf_merged)


def hf_max_logits(hf_vit, pixel_values, grid_thw) -> list[torch.Tensor]:
    """Per layer, per head: max over each item's (query, key) pairs of the scaled logit, from the
    HF attention's own projections and RoPE (hooked inputs)."""
    from transformers.models.kimi_k25.modeling_kimi_k25 import apply_rotary_pos_emb_vision

    maxima = []

    def hook(attn, args, kwargs, _out):
        x, cu = args[0], kwargs["cu_seqlens"]
        cos, sin = kwargs["position_embeddings"]
        q = attn.q_proj(x).view(1, x.shape[0], NUM_HEADS, -1)
        k = attn.k_proj(x).view(1, x.shape[0], NUM_HEADS, -1)
        q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)
        per_item = []
        for start, end in zip(cu[:-1].tolist(), cu[1:].tolist()):
            qi, ki = q[0, start:end].transpose(0, 1), k[0, start:end].transpose(0, 1)
            per_item.append((qi @ ki.transpose(1, 2) * attn.scaling).amax(dim=(1, 2)))
        maxima.append(torch.stack(per_item).amax(dim=0))

    handles = [layer.attn.register_forward_hook(hook, with_kwargs=True) for layer in hf_vit.layers]
    try:
        hf_encode(hf_vit, pixel_values, grid_thw)
    finally:
        for handle in handles:
            handle.remove()
    return maxima


def test_max_attention_logits_recorded(hf_vit, ours_from_hf, media):
    """With ``log_max_attention_logit`` each layer's core attention keeps the per-head max of the
    scaled logits over the packed, block-diagonal attention (for QK-Clip on the ViT)."""
    pixels, grid = media([[1, 4, 6], [1, 2, 2], [1, 6, 6]], seed=7)
    expected = hf_max_logits(hf_vit, pixels, grid)
    model = ours_from_hf(log_max_attention_logit=True)
    ours_encode(model, pixels, grid)
    recorded = [layer.self_attention.core_attention.current_max_attn_logits
                for layer in model.encoder.layers]
    assert len(recorded) == len(expected) == 2
    for got, want in zip(recorded, expected):
        assert got is not None and got.shape == (NUM_HEADS,)
        assert_close(got, want, atol=1e-4)


def test_max_logits_not_recorded_by_default(ours, media):
    pixels, grid = media([[1, 2, 2]], seed=8)
    ours_encode(ours, pixels, grid)
    assert all(layer.self_attention.core_attention.current_max_attn_logits is None
               for layer in ours.encoder.layers)
