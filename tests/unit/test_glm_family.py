"""The GLM family through the family interface (``get_family('glm')``): registry, conversion
table, placeholder counts on the packed batch's frame grids, the built VLM places each item's
features in its own ``h*w/4`` placeholders, and the cost model names the built tensors. (The
logits against transformers: ``tests/reference/test_glm_model.py``.)"""

from __future__ import annotations

import pytest
import torch

from megatron_vlm.config import ParallelConfig
from megatron_vlm.config.model import LLMConfig, ModelConfig
from megatron_vlm.families import family_costs, family_media_rules, get_family


def _tiny_glm() -> ModelConfig:
    from megatron_vlm.families.glm.config import GlmMergerConfig, GlmVisionConfig

    llm = LLMConfig(attention="gqa", vocab_size=256, hidden_size=64, num_layers=2,
                    num_attention_heads=4, num_query_groups=2, kv_channels=16,
                    add_qkv_bias=True, ffn_hidden_size=96, num_dense_layers=1, num_experts=4,
                    moe_router_topk=2, num_shared_experts=1, moe_ffn_hidden_size=32,
                    moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True,
                    rope_theta=1e4, position_embedding="mrope", mrope_section=[1, 1, 2],
                    rotary_fraction=0.5, max_position_embeddings=512)
    vision = GlmVisionConfig(hidden_size=32, num_layers=1, num_attention_heads=2,
                             ffn_hidden_size=64, pos_emb_side=4)
    merger = GlmMergerConfig(vision_hidden_size=32, output_size=64, ffn_hidden_size=48)
    return ModelConfig(family="glm", llm=llm, vision=vision, projector=merger)


def test_registry_and_conversion_table():
    from megatron_vlm.convert.tables import export_family_for, family_of

    family = get_family("glm")
    assert family.position_ids == "mrope" and family.name == "glm"
    assert family_media_rules("glm").family == "glm"
    for arch in family.hf_architectures:
        assert family_of(arch).model_family == "glm"
    assert export_family_for("glm", True) == "glm4v"
    # GLM-4.5-Air's MTP layer (HF layer 46) is carried when config.json names no MTP layer
    from megatron_vlm.convert.importer import carried_keys
    from megatron_vlm.families.glm.hf_table import HF_FAMILY

    keys = [f"model.language_model.layers.{n}.{t}" for n, t in
            ((46, "eh_proj.weight"), (46, "mlp.gate.weight"), (45, "mlp.gate.weight"),
             (460, "enorm.weight"))]
    assert carried_keys(keys, HF_FAMILY) == keys[:2]


def test_tokens_per_item_count_frames():
    """Items arrive as ``(2, h, w)`` (frames): ``h*w/4`` tokens each; 4 frames are 2 temporal
    patches; an odd frame count or side is refused naming the rule."""
    vision = _tiny_glm().vision
    rule = get_family("glm").llm_tokens_per_item
    assert rule(vision, torch.tensor([[2, 4, 6], [2, 8, 2], [4, 2, 2]])).tolist() == [6, 4, 2]
    with pytest.raises(ValueError, match="temporal_patch_size=2"):
        rule(vision, torch.tensor([[1, 4, 4]]))
    with pytest.raises(ValueError, match="merge kernel"):
        rule(vision, torch.tensor([[2, 3, 4]]))


def test_built_vlm_places_each_item_and_costs_name_its_tensors():
    """An image (2, 4, 6) and a video's two temporal patches (2, 4, 4): 6 + 4 + 4 placeholders;
    changing the second temporal patch's pixels changes only its 4 rows; the cost model lists
    the built tower and projector tensors."""
    from megatron_vlm.convert.mcore import ensure_single_process_groups

    model_cfg = _tiny_glm()
    groups = ensure_single_process_groups().pg_collection
    torch.manual_seed(0)
    vlm = get_family("glm").build_vlm(model_cfg, ParallelConfig(), pg_collection=groups).eval()
    grid = torch.tensor([[2, 4, 6], [2, 4, 4], [2, 4, 4]])
    assert vlm.llm_tokens_per_item(grid).tolist() == [6, 4, 4]
    pixels = torch.randn(int(grid.prod(dim=1).sum()), 3, 14, 14)
    positions = torch.cat([torch.arange(2, 8), torch.arange(10, 14), torch.arange(16, 20)])
    ids = torch.randint(0, 200, (1, 24))
    pos = torch.arange(24).view(1, 24)

    def embed(px):
        return vlm.embed(ids, pos, px, grid, positions)[:, 0]

    with torch.no_grad():
        base = embed(pixels)
        moved = pixels.clone()
        moved[-32:] += 1.0  # the last item (second temporal patch), both frames
        changed = (embed(moved) - base).abs().amax(dim=1) > 1e-6
    assert changed.nonzero().flatten().tolist() == list(range(16, 20))
    built = {k: tuple(v.shape) for k, v in vlm.state_dict().items()
             if k.startswith(("vision_tower.", "projector.")) and torch.is_tensor(v)
             and not k.endswith("_extra_state")}
    costs = family_costs("glm").vision_tensors(model_cfg.vision, model_cfg.projector, "fp32", 1)
    assert built == {t.name: t.shape for t in costs}
