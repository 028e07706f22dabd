"""SigLIP -> MoonViT import against transformers 5.23 ``SiglipVisionModel`` (SPEC §2): at SigLIP's
own grid, with RoPE off, the position table at its native size and SigLIP's LayerNorm eps, our
MoonViT's encoder output equals SigLIP's ``last_hidden_state`` (fp32, ``ATOL`` 2e-5 on LayerNorm'd
features of size ~1; measured ~1e-6). The attention-pooling head is skipped and counted.
"""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")
from hf_fixtures import perturb
from transformers import SiglipVisionConfig, SiglipVisionModel

ATOL = 2e-5
GRID = 4  # image 56 px, patch 14


@pytest.fixture(scope="module")
def siglip(megatron_groups, tmp_path_factory):
    torch.manual_seed(0)
    config = SiglipVisionConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                intermediate_size=64, image_size=14 * GRID, patch_size=14,
                                layer_norm_eps=1e-6)
    config._attn_implementation = "eager"
    model = SiglipVisionModel(config).eval()
    perturb(model, seed=4)
    path = tmp_path_factory.mktemp("siglip")
    model.save_pretrained(path / "hf")
    return model, path


def _patches(image: torch.Tensor) -> torch.Tensor:
    """[3, 14g, 14g] -> [g*g, 3, 14, 14] in raster order (row, col)."""
    return image.reshape(3, GRID, 14, GRID, 14).permute(1, 3, 0, 2, 4).reshape(-1, 3, 14, 14)


def test_moonvit_from_siglip_equals_siglip(siglip):
    from megatron_vlm.config import ParallelConfig
    from megatron_vlm.convert.siglip import import_siglip, load_siglip_import
    from megatron_vlm.models.vision.hf_weights import load_state
    from megatron_vlm.models.vision.moonvit import build_moonvit

    hf, path = siglip
    out = import_siglip(path / "hf", path / "moonvit.safetensors")
    vision, state = load_siglip_import(out)
    assert (vision.pos_emb_height, vision.pos_emb_width, vision.rope) == (GRID, GRID, False)
    assert vision.norm_epsilon == 1e-6
    ours = build_moonvit(vision, ParallelConfig()).eval()
    load_state(ours, state)
    images = torch.rand(2, 3, 14 * GRID, 14 * GRID, generator=torch.Generator().manual_seed(1))
    images = images * 2 - 1
    grid = torch.tensor([[1, GRID, GRID], [1, GRID, GRID]])
    with torch.no_grad():
        expected = hf(pixel_values=images).last_hidden_state  # [2, 16, 32]
        got = ours.encode(torch.cat([_patches(i) for i in images]), grid)
    torch.testing.assert_close(got, expected.reshape(-1, 32), atol=ATOL, rtol=0)
    assert expected.abs().max() > 1.0
    # Controls: MoonViT's RoPE on, or the position table read column-major, move the output.
    import dataclasses

    transposed = dict(state, **{"pos_embed.weight": state["pos_embed.weight"].transpose(0, 1)})
    for changed, weights in ((dataclasses.replace(vision, rope=True), state), (vision, transposed)):
        other = build_moonvit(changed, ParallelConfig()).eval()
        load_state(other, weights)
        with torch.no_grad():
            diff = other.encode(torch.cat([_patches(i) for i in images]), grid) - got
        assert diff.abs().max() > 100 * ATOL


def test_siglip_head_skipped_and_counted(siglip):
    from safetensors import safe_open

    hf, path = siglip
    head = sum(1 for k in hf.state_dict() if k.startswith("vision_model.head.") or
               k.startswith("head."))
    assert head > 0
    with safe_open(str(path / "moonvit.safetensors"), "pt") as f:
        skipped = json.loads(f.metadata()["skipped"])
    assert skipped == {"no counterpart in our model": head}
