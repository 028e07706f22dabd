"""MetricsLogger (JSONL, TensorBoard, progress line), MoE load stats and the loss plot."""

from __future__ import annotations

import io
import json
import math
import struct

import pytest
import torch
from rich.console import Console

from megatron_vlm.training.metrics import (
    MetricsLogger,
    format_eta,
    loss_curves,
    moe_load_stats,
    plot_loss_curves,
    read_metrics,
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _console() -> tuple[Console, io.StringIO]:
    buf = io.StringIO()
    return Console(file=buf, width=60, color_system=None, highlight=False), buf


def test_jsonl_records(tmp_path) -> None:
    console, _ = _console()
    with MetricsLogger(tmp_path, is_writer=True, total_steps=10, console=console) as logger:
        logger.log(1, "train", {"loss": 2.5, "lr": torch.tensor(3e-4), "grad_norm": float("nan"),
                                "moe": {"layer1": {"max_over_mean_load": 1.25}}})
        logger.log(2, "train", {"loss": 2.25, "skipped_steps": 1})
        logger.log(2, "valid", {"loss/wiki": 2.75})
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 3
    first, second, val = (json.loads(line) for line in lines)
    assert first["step"] == 1 and first["split"] == "train" and first["loss"] == 2.5
    assert first["lr"] == pytest.approx(3e-4)
    assert first["grad_norm"] is None  # NaN -> null, strict JSON
    assert first["moe/layer1/max_over_mean_load"] == 1.25
    assert second["skipped_steps"] == 1.0
    assert val["split"] == "valid" and val["loss/wiki"] == 2.75
    # Appending (resume) keeps earlier lines.
    with MetricsLogger(tmp_path, is_writer=True, total_steps=10, console=console) as logger:
        logger.log(3, "train", {"loss": 2.0})
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 2, 3]


def test_non_writer_writes_nothing(tmp_path) -> None:
    console, buf = _console()
    logger = MetricsLogger(tmp_path / "run", is_writer=False, total_steps=10, console=console,
                           tensorboard=True)
    logger.log(1, "train", {"loss": 1.0}, progress=True)
    logger.message("resumed")
    logger.close()
    assert not (tmp_path / "run").exists()
    assert buf.getvalue() == ""


def test_tensorboard_scalars(tmp_path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    console, _ = _console()
    with MetricsLogger(tmp_path, is_writer=True, total_steps=10, tensorboard=True,
                       console=console) as logger:
        for step, loss in [(1, 3.0), (2, 2.5)]:
            logger.log(step, "train", {"loss": loss})
        logger.log(2, "valid", {"loss/wiki": 2.9})
    acc = EventAccumulator(str(tmp_path / "tensorboard"))
    acc.Reload()
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == [(1, 3.0), (2, 2.5)]
    assert [(e.step, pytest.approx(e.value)) for e in acc.Scalars("valid/loss/wiki")] == [(2, 2.9)]


@pytest.mark.parametrize(
    "seconds, text",
    [(0, "0:00:00"), (59.4, "0:00:59"), (3725, "1:02:05"), (100000, "27:46:40"),
     (float("nan"), "?:??:??"), (None, "?:??:??"), (-1, "?:??:??")],
)
def test_format_eta(seconds, text) -> None:
    assert format_eta(seconds) == text


def test_progress_line_and_eta_from_step_times(tmp_path) -> None:
    console, buf = _console()
    logger = MetricsLogger(tmp_path, is_writer=True, total_steps=1000, console=console)
    assert logger.eta_seconds(0) is None
    # Step times 2.0 and 3.0 s: average 2.5 s; 900 steps left after step 100 -> 2250 s.
    logger.log(99, "train", {"loss": 2.4, "step_time_s": 2.0})
    metrics = {"loss": 2.34567, "lr": 3e-4, "tokens_per_s": 123456.7, "tflops_per_device": 395.6,
               "mfu": 0.4, "skipped_steps": 2, "step_time_s": 3.0}
    logger.log(100, "train", metrics, progress=True)
    logger.message("stopping at step 100 [signal]")
    logger.close()
    assert logger.seconds_per_step() == pytest.approx(2.5)
    progress, message = buf.getvalue().splitlines()  # the progress report is one line
    for part in ("step  100/1000", "loss 2.3457", "lr 3.00e-04", "tok/s 123,457",
                 "TFLOP/s 396", "MFU 40.0%", "skipped 2", "ETA 0:37:30"):
        assert part in progress, (part, progress)
    assert message == "stopping at step 100 [signal]"  # no markup interpretation


def test_eta_from_wall_clock_and_mfu_from_peak(tmp_path) -> None:
    console, _ = _console()
    clock = FakeClock()
    logger = MetricsLogger(tmp_path, is_writer=True, total_steps=100, console=console,
                           peak_tflops=500.0, clock=clock)
    logger.log(10, "train", {"loss": 3.0})
    assert logger.eta_seconds(10) is None  # one record, no step times: unknown
    clock.now += 40 * 1.5  # 40 steps at 1.5 s
    logger.log(50, "train", {"loss": 2.0})
    assert logger.eta_seconds(50) == pytest.approx(75.0)
    line = logger.progress_line(50, {"tflops_per_device": 100.0})
    assert "MFU 20.0%" in line and "ETA 0:01:15" in line
    logger.close()


def test_progress_line_shows_the_realised_modality_mix(tmp_path) -> None:
    console, _ = _console()
    logger = MetricsLogger(tmp_path, is_writer=True, total_steps=10, console=console)
    line = logger.progress_line(5, {"loss": 1.0, "data/modality/video": 0.244,
                                    "data/modality/image": 0.496, "data/mix/video": 0.9})
    assert "mix image 50% video 24%" in line, line
    assert "mix" not in logger.progress_line(5, {"loss": 1.0})  # text-only runs: nothing
    logger.close()


def test_moe_load_stats() -> None:
    # Layer 3: counts 4 experts [6, 2, 0, 8], mean 4, max 8 -> 2.0.
    # Layer 5: [5, 5, 5, 5] -> 1.0. Layer 7: no tokens -> NaN, left out of max/mean.
    stats = moe_load_stats(
        [torch.tensor([6, 2, 0, 8]), torch.tensor([5.0, 5, 5, 5]), torch.zeros(4)],
        layer_numbers=[3, 5, 7],
    )
    assert stats["moe/layer3/max_over_mean_load"] == 2.0
    assert stats["moe/layer5/max_over_mean_load"] == 1.0
    assert math.isnan(stats["moe/layer7/max_over_mean_load"])
    assert stats["moe/max_over_mean_load/max"] == 2.0
    assert stats["moe/max_over_mean_load/mean"] == 1.5
    assert moe_load_stats([torch.tensor([1, 3])])["moe/layer0/max_over_mean_load"] == 1.5
    with pytest.raises(ValueError):
        moe_load_stats([torch.ones(2)], layer_numbers=[1, 2])


def test_plot_loss_curves(tmp_path) -> None:
    console, _ = _console()
    with MetricsLogger(tmp_path, is_writer=True, total_steps=100, console=console) as logger:
        for step in range(1, 101):
            logger.log(step, "train", {"loss": 5.0 / math.sqrt(step)})
            if step % 25 == 0:
                logger.log(step, "valid", {"loss/wiki": 5.5 / math.sqrt(step),
                                           "loss/captions": 6.0 / math.sqrt(step)})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 101, "split": "tr')  # a torn last line (crash mid-write) is skipped
    out = plot_loss_curves(tmp_path / "metrics.jsonl", tmp_path / "plots" / "loss.png")
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])  # IHDR
    assert (width, height) == (800, 500)
    assert len(data) > 10_000  # three curves, axes and legend, not a blank canvas


def test_plot_without_loss_raises(tmp_path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "split": "train", "lr": 0.1}\n')
    with pytest.raises(ValueError, match="no record with a 'loss'"):
        plot_loss_curves(path, tmp_path / "x.png")


def test_loss_curves_names_and_resume() -> None:
    records = [
        {"step": 1, "split": "train", "loss": 3.0, "loss/ignored": 9.0},
        {"step": 2, "split": "train", "loss": 2.8},
        {"step": 2, "split": "valid", "loss/wiki": 2.9, "loss/captions": 3.1, "lr": 0.1},
        {"step": 2, "split": "train", "loss": 2.7},  # resumed from step 1: step 2 again
        {"step": 3, "split": "train", "loss": None},  # a skipped (NaN) step
        {"step": 3, "split": "valid", "loss": 2.5},
    ]
    assert loss_curves(records) == {
        "train": [(1, 3.0), (2, 2.7)],
        "valid/wiki": [(2, 2.9)],
        "valid/captions": [(2, 3.1)],
        "valid": [(3, 2.5)],
    }
