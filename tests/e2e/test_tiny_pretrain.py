"""The README's tiny pretraining: it learns, shows progress, leaves a checkpoint and a plot."""

from __future__ import annotations

import json

from conftest import read_metrics

from megatron_vlm.checkpoint import find_latest_checkpoint, verify_checkpoint


def test_validation_loss_falls_well_below_start(tiny_run):
    run_dir, _ = tiny_run
    valid = [r for r in read_metrics(run_dir) if r["split"] == "valid"]
    first, last = valid[0]["loss/text"], valid[-1]["loss/text"]
    assert valid[0]["step"] == 0 and valid[-1]["step"] == 150
    # Start is ~ln(1024) = 6.93 (uniform over the vocab); held-out text must be learned.
    assert 6.0 < first < 7.5, first
    assert last < first - 3.0, (first, last)


def test_progress_metrics_checkpoint_and_plot(tiny_run):
    run_dir, proc = tiny_run
    lines = [line for line in proc.stdout.splitlines() if line.startswith("step ")]
    assert len(lines) == 15, proc.stdout[-2000:]  # log_interval 10 over 150 steps
    for field in ("loss", "tok/s", "TFLOP/s", "MFU", "ETA"):
        assert field in lines[-1]
    train = [r for r in read_metrics(run_dir) if r["split"] == "train"]
    assert [r["step"] for r in train] == list(range(1, 151))
    assert all(r["skipped_steps"] == 0 for r in train)
    moe_keys = [k for k in train[-1] if k.startswith("moe/")]
    assert any(k.endswith("max_over_mean_load") for k in moe_keys)
    assert any(k.endswith("bias_drift") and train[-1][k] > 0 for k in moe_keys)
    png = (run_dir / "loss_curve.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    ckpt = find_latest_checkpoint(run_dir / "checkpoints")
    assert ckpt is not None and ckpt.name == "step_0000150"
    verify_checkpoint(ckpt, full=True)
    manifest = json.loads((ckpt / "manifest.json").read_text())
    assert manifest["step"] == 150
