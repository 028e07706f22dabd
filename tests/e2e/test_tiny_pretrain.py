"""The README's main job (``tiny_cpu``: the tiny VLM pretrained on the bundled multimodal corpus):
it learns every modality, shows progress with the realised data mix, leaves a checkpoint, metrics
and a plot. Uses the session's run (``tiny_vlm_run``, tests/conftest.py)."""

from __future__ import annotations

import json

from megatron_vlm.checkpoint import find_latest_checkpoint, verify_checkpoint
from megatron_vlm.config.data_mm import default_mixes
from megatron_vlm.data.mm_corpus import DATASET_MODALITY

STEPS = 600
DATASETS = ("image_caption", "image_qa", "video", "interleaved", "text")


def test_every_modality_learns(tiny_vlm_run):
    valid = [r for r in tiny_vlm_run.metrics if r["split"] == "valid"]
    first, last = valid[0], valid[-1]
    assert first["step"] == 0 and last["step"] == STEPS
    for name in DATASETS:
        # Start ~ln(1152) = 7.05 (uniform over the vocabulary); held-out data must be learned.
        assert 6.0 < first[f"loss/{name}"] < 8.0, (name, first)
        assert last[f"loss/{name}"] < 0.35 * first[f"loss/{name}"], (name, first, last)


def test_progress_mix_metrics_checkpoint_and_plot(tiny_vlm_run):
    lines = [line for line in tiny_vlm_run.stdout.splitlines() if line.startswith("step ")]
    assert len(lines) == STEPS // 10, tiny_vlm_run.stdout[-2000:]  # log_interval 10
    for field in ("loss", "tok/s", "TFLOP/s", "MFU", "mix image", "video", "text", "ETA"):
        assert field in lines[-1], (field, lines[-1])
    train = [r for r in tiny_vlm_run.metrics if r["split"] == "train"]
    assert [r["step"] for r in train] == list(range(1, STEPS + 1))
    assert all(r["skipped_steps"] == 0 for r in train)
    moe_keys = [k for k in train[-1] if k.startswith("moe/")]
    assert any(k.endswith("max_over_mean_load") for k in moe_keys)
    assert any(k.endswith("bias_drift") and train[-1][k] > 0 for k in moe_keys)
    # The realised LLM-token mix follows the joint stage's targets (sampling noise over 600
    # steps x 4 packs: a few points), and the modalities add up to all tokens.
    targets = default_mixes()["joint"].weights
    modality_target: dict[str, float] = {}
    for name, share in targets.items():
        assert abs(train[-1][f"data/mix/{name}"] - share) < 0.05, (name, train[-1])
        modality = DATASET_MODALITY[name]
        modality_target[modality] = modality_target.get(modality, 0.0) + share
    for modality, share in modality_target.items():
        assert abs(train[-1][f"data/modality/{modality}"] - share) < 0.05, modality
    assert abs(sum(train[-1][f"data/modality/{m}"] for m in modality_target) - 1) < 1e-6
    assert train[-1]["data/skipped/total"] == 0
    png = (tiny_vlm_run.run_dir / "loss_curve.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    ckpt = find_latest_checkpoint(tiny_vlm_run.run_dir / "checkpoints")
    assert ckpt is not None and ckpt.name == f"step_{STEPS:07d}"
    verify_checkpoint(ckpt, full=True)
    manifest = json.loads((ckpt / "manifest.json").read_text())
    assert manifest["step"] == STEPS
