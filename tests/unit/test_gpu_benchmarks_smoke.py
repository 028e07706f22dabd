"""Smoke runs of the model benchmarks (LLM/VLM MFU, ViT packing, optimizer step) on CPU.

Each ``benchmarks.<name>.main(["--smoke", ...])`` runs a tiny model in-process and its JSON must
carry the common fields and values that follow from the set-up (checked independently where a
value is known: token counts, document statistics, the Muon matrix count of the tiny model).
Nothing is timed against a target; the GPU-sized runs need CUDA (``run_gpu_suite.sh``).
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

COMMON = ("benchmark", "date", "device", "device_kind", "versions", "config", "results", "smoke")


def _read(path) -> dict:
    data = json.loads(path.read_text())
    for key in COMMON:
        assert key in data, key
    assert data["smoke"] is True
    assert data["device_kind"] == ("cuda" if torch.cuda.is_available() else "cpu")
    return data


def test_llm_mfu_smoke(tmp_path):
    from benchmarks import llm_mfu
    from benchmarks.harness import packed_text_batches

    data = _read(llm_mfu.main(["--smoke", "--out-dir", str(tmp_path)]))
    res, cfg = data["results"], data["config"]
    tokens = cfg["micro_batches"] * cfg["seq_length"]
    assert cfg["tokens_per_step"] == tokens
    # The same packed stream, rebuilt here: real tokens and sum L^2 from its cu_seqlens.
    batches = packed_text_batches(cfg["micro_batches"], cfg["seq_length"], 1024, seed=0,
                                  median=cfg["doc_median"])
    lengths = [int(b - a) for x in batches for a, b in zip(x.cu_seqlens[:-1], x.cu_seqlens[1:])]
    assert res["data"]["real_tokens"] == sum(lengths) < tokens
    assert res["data"]["seqlen_squared_sum"] == sum(n * n for n in lengths)
    for variant in ("ours", "stock+sdpa"):
        row = res[variant]
        assert row["tokens_per_s"] == pytest.approx(tokens / row["mean_step_seconds"])
        assert row["tflops_per_s_bshd"] > 0
        assert "mfu_bshd" not in row or torch.cuda.is_available()  # no CPU peak, no MFU
    # Packed counting (real tokens, sum L^2 < S^2 per sequence) is below the BSHD count.
    assert res["ours"]["tflops_per_s_thd"] < res["ours"]["tflops_per_s_bshd"]
    assert "attention=sdpa_mask" in res["ours"]["layers"] or torch.cuda.is_available()
    assert res["ours_over_stock_tokens_per_s"] == pytest.approx(
        res["ours"]["tokens_per_s"] / res["stock+sdpa"]["tokens_per_s"])


def test_vit_packing_smoke(tmp_path):
    from benchmarks import vit_packing

    data = _read(vit_packing.main(["--smoke", "--out-dir", str(tmp_path),
                                   "--attention-kernel", "sdpa_doc"]))
    res, cfg = data["results"], data["config"]
    assert cfg["packed_attention"] == "DocumentSDPAAttention"
    assert cfg["num_images"] + cfg["num_video_chunks"] == cfg["num_items"]
    assert res["packed"]["padding_fraction"] == 0.0
    assert 0.0 < res["padded"]["padding_fraction"] < 1.0
    assert res["packed"]["micro_batches"] < res["padded"]["micro_batches"]
    for layout in ("packed", "padded"):
        assert res[layout]["samples_per_s"] == pytest.approx(
            cfg["num_items"] / res[layout]["seconds"])


def test_vit_layout_groups_respect_the_budget():
    from benchmarks.vit_packing import packed_groups, padded_groups

    items = [(1, 4, 4), (4, 2, 2), (1, 6, 4), (1, 2, 2), (1, 8, 8)]  # 16, 16, 24, 4, 64 patches
    assert packed_groups(items, 40) == [[0, 1], [2, 3], [4]]
    # Padded, B * Lmax <= 40: 16+16 -> 2 x 16 = 32; adding 24 -> 3 x 24 = 72; 24 with 4 -> 2 x 24
    # = 48; 4 with 64 -> 128; so [0, 1], [2], [3], [4].
    assert padded_groups(items, 40) == [[0, 1], [2], [3], [4]]


def test_optimizer_step_smoke(tmp_path):
    from benchmarks import optimizer_step

    data = _read(optimizer_step.main(["--smoke", "--out-dir", str(tmp_path)]))
    res = data["results"]
    muon, adamw = res["muon+qk_clip"], res["adamw"]
    # Tiny LLM: 3 layers x 5 MLA matrices (q_down, q_up, kv_down, kv_up, o_proj) + dense layer's
    # gate, up, down + 2 MoE layers x (router + 8 experts x 3 + shared gate, up, down) = 74.
    assert muon["newton_schulz_matrices"] == 15 + 3 + 2 * (1 + 24 + 3)
    assert 0 < muon["analytic_fraction_spec_20m2n"] <= muon["analytic_fraction_at_target_tokens"]
    for row in (muon, adamw):
        assert row["fraction_at_target_tokens"] == pytest.approx(
            row["step_seconds_best"] / (row["fwd_bwd_seconds_best"] / row["tokens_measured"]
                                        * data["config"]["target_tokens_per_step"]))


@pytest.fixture(scope="module")
def smoke_loader_batches(tmp_path_factory):
    from benchmarks import vlm_mfu

    cfg = vlm_mfu.SMOKE
    run_dir = tmp_path_factory.mktemp("vlm_run")
    return vlm_mfu.loader_batches(cfg["seq_length"], cfg["max_patches"], cfg["micro_batches"],
                                  run_dir)


def test_vlm_batches_round_trip(smoke_loader_batches, tmp_path):
    """Dumped loader micro-batches load back equal, pixels included (stored as uint8)."""
    from benchmarks import vlm_mfu

    path = vlm_mfu.save_batches(smoke_loader_batches, tmp_path / "b.npz")
    loaded = vlm_mfu.load_batches(path)
    assert len(loaded) == len(smoke_loader_batches)
    for a, b in zip(smoke_loader_batches, loaded):
        for f in dataclasses.fields(a):
            x, y = getattr(a, f.name), getattr(b, f.name)
            if f.name == "vision" and x is None:
                assert y is None
            elif f.name == "vision":
                for g in dataclasses.fields(x):
                    u, v = getattr(x, g.name), getattr(y, g.name)
                    assert (u is None and v is None) or torch.equal(u, v), g.name
            elif torch.is_tensor(x):
                assert torch.equal(x, y), f.name
            else:
                assert x == y, f.name
    assert any(b.vision is not None for b in loaded)


def test_vlm_mfu_smoke(smoke_loader_batches, tmp_path):
    from benchmarks import vlm_mfu
    from megatron_vlm.config.vision import VisionConfig
    from megatron_vlm.recipes.tiny import tiny_moonvit
    from megatron_vlm.training.flops import vit_flops

    path = vlm_mfu.save_batches(smoke_loader_batches, tmp_path / "b.npz")
    data = _read(vlm_mfu.main(["--smoke", "--batches", str(path), "--out-dir", str(tmp_path)]))
    res = data["results"]
    mix = res["data_mix"]
    items = sum(len(b.vision.grid_thw) for b in smoke_loader_batches if b.vision is not None)
    assert mix["images"] + mix["video_chunks"] == items
    assert 0 < mix["vision_token_fraction"] < 1
    vision: VisionConfig = tiny_moonvit()
    vit = sum(vit_flops(vision, 64, b.vision.grid_thw.tolist())
              for b in smoke_loader_batches if b.vision is not None)
    assert res["vlm"]["model_flops_per_step"] - res["text_only"]["model_flops_per_step"] == \
        pytest.approx(vit)
    assert res["vit_flops_share"] == pytest.approx(vit / res["vlm"]["model_flops_per_step"])
