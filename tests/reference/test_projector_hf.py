"""Our Kimi projector (megatron MLP) against transformers 5.23 ``Kimi_K25MultimodalProjection``,
and vision tower + projector against HF's image / video feature path. fp32; tolerance ``ATOL``
= 2e-5 absolute (outputs of size ~1; observed ~1e-6)."""

from __future__ import annotations

import pytest
import torch

ATOL = 2e-5


def assert_close(actual, expected, atol=ATOL):
    assert actual.shape == expected.shape
    diff = (actual - expected).abs().max().item()
    assert diff <= atol, f"max abs diff {diff:.3e} > {atol:.0e}"


def build_projector(state):
    from megatron_vlm.config import ParallelConfig
    from megatron_vlm.config.vision import ProjectorConfig
    from megatron_vlm.models.projector import build_projector as build
    from megatron_vlm.models.vision.hf_weights import load_state

    model = build(ProjectorConfig(vision_hidden_size=32, merge_size=4, output_size=48),
                  ParallelConfig()).eval()
    load_state(model, state)
    return model


@pytest.fixture(scope="module")
def projector(megatron_groups, hf_kimi):
    from megatron_vlm.models.vision.hf_weights import projector_state_from_hf

    return build_projector(projector_state_from_hf(hf_kimi.model.mm_projector.state_dict()))


def test_projector_matches_hf_module(hf_kimi, projector):
    """LayerNorm per 32-wide sub-token -> 128 -> Linear -> exact GELU -> Linear -> 48."""
    merged = torch.randn(7, 4, 32, generator=torch.Generator().manual_seed(0)) * 3 + 1
    with torch.no_grad():
        expected = hf_kimi.model.mm_projector(merged).squeeze(1)
        actual = projector(merged)
    assert actual.shape == (7, 48)
    assert_close(actual, expected)


def test_projector_from_saved_checkpoint_names(hf_kimi, hf_checkpoint):
    """``mm_projector.proj.{0,2}`` and ``model.mm_projector.pre_norm`` (the saved layout)."""
    from megatron_vlm.models.vision.hf_weights import projector_state_from_hf

    assert "mm_projector.proj.0.weight" in hf_checkpoint
    model = build_projector(projector_state_from_hf(hf_checkpoint))
    merged = torch.randn(5, 4, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert_close(model(merged), hf_kimi.model.mm_projector(merged).squeeze(1))


def test_image_features_match_hf_get_image_features(hf_kimi, ours_from_hf, projector, media):
    """Vision tower + projector == ``Kimi_K25Model.get_image_features`` for packed images."""
    pixels, grid = media([[1, 4, 6], [1, 2, 8], [1, 6, 6]], seed=2)
    with torch.no_grad():
        expected = torch.cat(hf_kimi.model.get_image_features(pixels, grid).pooler_output)
        actual = projector(ours_from_hf()(pixels, grid))
    assert actual.shape == (6 + 4 + 9, 48)
    assert_close(actual, expected)


def test_video_chunk_features_match_hf_workaround(hf_kimi, ours_from_hf, projector, media):
    """A 4-frame chunk through SPEC §9's workaround for HF's video path (``vision_tower`` then
    ``mm_projector`` directly): h*w/4 LLM tokens for the whole chunk."""
    pixels, grid = media([[4, 4, 4]], seed=3)
    with torch.no_grad():
        vision_out = hf_kimi.model.vision_tower(pixels, grid_thw=grid)
        expected = hf_kimi.model.mm_projector(vision_out.pooler_output).squeeze(1)
        actual = projector(ours_from_hf()(pixels, grid))
    assert actual.shape == (4, 48)
    assert_close(actual, expected)
