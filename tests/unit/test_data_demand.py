"""benchmarks/data_demand.py: the cores-per-GPU arithmetic on hand-made rates, and its smoke run
(no timing asserts)."""

from __future__ import annotations

import pytest

from benchmarks import data_demand


def test_before_and_after_arithmetic():
    # Round numbers: tp 2 x pp 2 = 4 GPUs per replica,
    # 1000 tokens/s/GPU -> 4000 tokens/s per replica -> 4 micro-batches/s of S = 1000 tokens.
    plan = {"tp": 2, "pp": 2, "cp": 1, "tokens_per_s_per_gpu": 1000.0, "seq_length": 1000,
            "vision_token_fraction": 0.1, "patches_per_micro_batch": 800,
            "video_share_of_vision_tokens": 0.25}
    media = {"image": {"s_per_llm_token": 1e-3, "s_per_patch": 2.5e-4},
             "video": {"s_per_llm_token": 2e-3, "s_per_patch": 5e-4}}
    pack = {"s_per_token": 1e-4}
    handoff = {"encode_s": 0.01, "decode_s": 0.001}
    d = data_demand.demand(plan, media, pack, handoff)
    video = d["cases"]["video@vision_share"]
    # media 100 tokens x 2 ms = 0.2 s, pack 1000 x 0.1 ms = 0.1 s per micro-batch; 4 per second.
    assert video["cores_per_gpu_before"] == pytest.approx(4 * 0.3)
    # after: the source 4 x (0.3 + 0.01), three receivers 4 x 0.001 each, over 4 GPUs.
    assert video["cores_per_gpu_after"] == pytest.approx((4 * 0.31 + 3 * 4 * 0.001) / 4)
    # The stage mix: 3/4 images (1 ms per token), 1/4 video (2 ms): 0.125 s media.
    mix = d["cases"]["stage_mix@vision_share"]
    assert mix["cores_per_gpu_before"] == pytest.approx(4 * (0.125 + 0.1))
    assert d["cores_per_gpu_after"] == mix["cores_per_gpu_after"]
    assert d["cases"]["image@full_patch_budget"]["media_cores_per_gpu_before"] == \
        pytest.approx(4 * 800 * 2.5e-4)
    assert d["meets_target"] == (mix["cores_per_gpu_after"] <= 0.2)
