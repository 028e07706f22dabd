"""The InternVL3.5 family through the family interface (``get_family('internvl')``): registry,
conversion table, 256 placeholder tokens per 448-px tile on the packed batch's grids, the built
VLM writes each tile's / frame's features into its own placeholders, and the cost model names the
built tensors. (Logits against transformers: ``tests/reference/test_internvl_model.py``.)"""

from __future__ import annotations

import pytest
import torch

from megatron_vlm.config import ParallelConfig
from megatron_vlm.config.model import LLMConfig, ModelConfig
from megatron_vlm.families import family_costs, family_media_rules, get_family


def _tiny_internvl(side: int = 4) -> ModelConfig:
    from megatron_vlm.families.internvl.config import InternVisionConfig, InternVLProjectorConfig

    llm = LLMConfig(attention="gqa", vocab_size=256, hidden_size=64, num_layers=2,
                    num_attention_heads=4, num_query_groups=2, kv_channels=16,
                    qk_layernorm=True, ffn_hidden_size=96, num_experts=None, num_dense_layers=2,
                    rope_theta=1e4, max_position_embeddings=512)
    vision = InternVisionConfig(hidden_size=32, num_layers=1, num_attention_heads=2,
                                ffn_hidden_size=64, pos_emb_side=side)
    projector = InternVLProjectorConfig(vision_hidden_size=32, merge_size=4, output_size=64)
    return ModelConfig(family="internvl", llm=llm, vision=vision, projector=projector)


def test_registry_and_conversion_table():
    from megatron_vlm.convert.tables import conversion_family, export_family_for, family_of

    family = get_family("internvl")
    assert family.position_ids == "rope" and family.name == "internvl"
    rules = family_media_rules("internvl")
    assert rules.family == "internvl" and rules.position_rule is None
    assert family_of("InternVLForConditionalGeneration").model_family == "internvl"
    assert export_family_for("internvl", True) == "internvl"
    assert conversion_family("internvl").model_rules is not None


def test_tokens_per_tile_and_refusals():
    """A ``(k, 32, 32)`` image of k tiles is 256 k tokens; a frame ``(1, 32, 32)`` 256; an odd
    side is refused naming the pixel shuffle."""
    from megatron_vlm.families.internvl.config import internvit_300m_config

    rule = get_family("internvl").llm_tokens_per_item
    vision = internvit_300m_config()
    grid = torch.tensor([[13, 32, 32], [1, 32, 32], [5, 32, 32]])
    assert rule(vision, grid).tolist() == [13 * 256, 256, 5 * 256]
    with pytest.raises(ValueError, match="pixel shuffle"):
        rule(vision, torch.tensor([[1, 31, 32]]))


def test_built_vlm_places_each_tile_and_costs_name_its_tensors():
    """An image of 3 tiles ``(3, 4, 4)`` and two video frames ``(1, 4, 4)``: 12 + 4 + 4
    placeholders; changing the image's second tile changes only its 4 rows (tiles attend
    within themselves); the cost model lists the built tower and projector tensors."""
    from megatron_vlm.convert.mcore import ensure_single_process_groups

    model_cfg = _tiny_internvl()
    groups = ensure_single_process_groups().pg_collection
    torch.manual_seed(0)
    vlm = get_family("internvl").build_vlm(model_cfg, ParallelConfig(),
                                           pg_collection=groups).eval()
    grid = torch.tensor([[3, 4, 4], [1, 4, 4], [1, 4, 4]])
    assert vlm.llm_tokens_per_item(grid).tolist() == [12, 4, 4]
    pixels = torch.randn(int(grid.prod(dim=1).sum()), 3, 14, 14)
    positions = torch.cat([torch.arange(2, 14), torch.arange(16, 20), torch.arange(22, 26)])
    ids = torch.randint(0, 200, (1, 28))
    pos = torch.arange(28).view(1, 28)

    def embed(px):
        return vlm.embed(ids, pos, px, grid, positions)[:, 0]

    with torch.no_grad():
        base = embed(pixels)
        moved = pixels.clone()
        moved[16:32] += 1.0  # the image's second tile
        changed = (embed(moved) - base).abs().amax(dim=1) > 1e-6
    assert changed.nonzero().flatten().tolist() == list(range(6, 10))
    built = {k: tuple(v.shape) for k, v in vlm.state_dict().items()
             if k.startswith(("vision_tower.", "projector.")) and torch.is_tensor(v)
             and not k.endswith("_extra_state")}
    costs = family_costs("internvl").vision_tensors(model_cfg.vision, model_cfg.projector,
                                                    "fp32", 1)
    assert built == {t.name: t.shape for t in costs}
