"""VisionConfig / ProjectorConfig: real-size defaults and errors that name the fix."""

from __future__ import annotations

import pytest

from megatron_vlm.config.vision import (
    ProjectorConfig,
    VisionConfig,
    kimi_projector_config,
    moonvit_config,
)


def test_moonvit_real_size():
    v = moonvit_config()
    assert (v.hidden_size, v.num_layers, v.num_attention_heads, v.ffn_hidden_size) == (
        1152, 27, 16, 4304)
    assert (v.patch_size, v.pos_emb_height, v.pos_emb_width, v.temporal_patch_size) == (
        14, 64, 64, 4)
    assert (v.head_dim, v.merge_size, v.merged_hidden_size) == (72, 4, 4608)
    assert v.norm_epsilon == 1e-5 and v.rope_theta == 10000.0
    p = kimi_projector_config(7168)
    assert (p.input_size, p.intermediate_size, p.output_size) == (4608, 4608, 7168)
    p.check_matches(v, llm_hidden_size=7168)


@pytest.mark.parametrize("kwargs,match", [
    ({"hidden_size": 1152, "num_attention_heads": 10}, "does not divide hidden_size"),
    ({"hidden_size": 96, "num_attention_heads": 16}, "multiple of 4"),
    ({"num_layers": 0}, "num_layers=0 must be >= 1"),
    ({"rope_theta": 1.0}, "rope_theta"),
])
def test_vision_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        VisionConfig(**kwargs)


def test_projector_must_fit_tower_and_llm():
    v = moonvit_config()
    with pytest.raises(ValueError, match="set them equal"):
        ProjectorConfig(vision_hidden_size=1024).check_matches(v, 7168)
    with pytest.raises(ValueError, match="model.llm.hidden_size=2048"):
        kimi_projector_config(7168).check_matches(v, 2048)
    with pytest.raises(ValueError, match="ffn_hidden_size"):
        ProjectorConfig(ffn_hidden_size=0)
