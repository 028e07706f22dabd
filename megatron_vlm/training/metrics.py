"""Training metrics: a JSONL log, TensorBoard scalars, a one-line console progress report, MoE
load statistics and loss-curve plots.

Record format (one JSON object per line of ``<out_dir>/metrics.jsonl``, appended across resumes)::

    {"step": 120, "split": "train", "time": 1764000000.0, "loss": 2.31, "lr": 0.0003, ...}

``split`` is ``"train"`` for training steps and ``"valid"`` for validation, where each dataset's
loss is ``"loss/<dataset>"``; every other key is a float metric. Nested dicts are flattened with
``/`` (``{"moe": {"a": 1}}`` -> ``"moe/a"``); NaN and infinities are written as ``null`` (strict
JSON). The progress line reads ``loss``, ``lr``, ``grad_norm``, ``tokens_per_s``, ``samples_per_s``,
``tflops_per_device``, ``mfu`` (a fraction), ``data/modality/<name>`` (realised token mix),
``skipped_steps`` and ``step_time_s`` (for the ETA).
Only the writer rank (rank 0) touches files or the console: the caller passes ``is_writer``
(no torch.distributed here).
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

#: Keys the progress line shows, in order, with their label and format (missing keys left out).
_PROGRESS_FIELDS = (
    ("loss", "loss", "{:.4f}"),
    ("lr", "lr", "{:.2e}"),
    ("grad_norm", "gnorm", "{:.3f}"),
    ("tokens_per_s", "tok/s", "{:,.0f}"),
    ("samples_per_s", "samples/s", "{:,.1f}"),
    ("tflops_per_device", "TFLOP/s", "{:.3g}"),  # 0.0463 on a CPU, 412 on an H100
)


def format_eta(seconds: float | None) -> str:
    """Seconds as ``h:mm:ss`` (hours may exceed 24: ``27:46:40``); ``?:??:??`` when unknown."""
    if seconds is None or not math.isfinite(seconds) or seconds < 0:
        return "?:??:??"
    total = int(round(seconds))
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


def _to_float(value: Any) -> float | None:
    if value is None:  # already flattened: a non-finite value
        return None
    if isinstance(value, torch.Tensor):
        value = value.detach().float().item()
    value = float(value)
    return value if math.isfinite(value) else None


def flatten_metrics(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, float | None]:
    """Flatten nested dicts with ``/`` and convert values (numbers, 0-d tensors) to floats.

    Non-finite values become ``None`` (JSON ``null``).
    """
    flat: dict[str, float | None] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_metrics(value, prefix=f"{name}/"))
        else:
            flat[name] = _to_float(value)
    return flat


class MetricsLogger:
    """Writes metrics to ``<out_dir>/metrics.jsonl``, TensorBoard and the console (writer only).

    Args:
        out_dir: run directory; created if missing.
        is_writer: whether this process writes (rank 0); on other ranks every method is a no-op.
        total_steps: planned training steps (for the progress line and ETA).
        tensorboard: also write TensorBoard scalars to ``<out_dir>/tensorboard``.
        peak_tflops: device peak, for MFU in the progress line when a record has no ``mfu``.
        console: a ``rich.console.Console`` to print to (default: stdout).
        clock: monotonic time source in seconds, for the ETA when records carry no
            ``step_time_s`` (tests pass a fake one).
        sinks: more destinations for every record (e.g. ``wandb_log.WandbSink``): objects with
            ``log(step, split, flat_metrics)`` and ``close()``; writer rank only.
    """

    def __init__(
        self,
        out_dir: str | Path,
        *,
        is_writer: bool,
        total_steps: int,
        tensorboard: bool = False,
        peak_tflops: float | None = None,
        console: Any = None,
        clock: Callable[[], float] = time.monotonic,
        sinks: Sequence[Any] = (),
    ) -> None:
        self.is_writer = is_writer
        self._sinks = list(sinks) if is_writer else []
        self.total_steps = total_steps
        self.peak_tflops = peak_tflops
        self._clock = clock
        # ETA sources: the sum and count of reported step times, else the wall clock between the
        # first and the latest train record (start-up before the first record excluded).
        self._step_time_sum = 0.0
        self._step_time_count = 0
        self._first: tuple[int, float] | None = None
        self._last: tuple[int, float] | None = None
        self._file = None
        self._tb = None
        self._console = None
        self.path = Path(out_dir) / "metrics.jsonl"
        if not is_writer:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Line-buffered append: a crash loses at most the line being written; resume appends.
        self._file = open(self.path, "a", buffering=1, encoding="utf-8")
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # slow import; only when asked

            self._tb = SummaryWriter(log_dir=str(Path(out_dir) / "tensorboard"))
        if console is None:
            from rich.console import Console

            console = Console(highlight=False)
        self._console = console

    def log(
        self, step: int, split: str, metrics: Mapping[str, Any], *, progress: bool = False
    ) -> None:
        """Append one record to the JSONL file and TensorBoard (writer only).

        Args:
            step: optimizer step the values belong to.
            split: ``"train"`` or ``"valid"`` (see the module docstring).
            metrics: name -> number (floats, ints, 0-d tensors, nested dicts).
            progress: also print the one-line report: the progress line for ``train``
                (once per log interval), the losses for another split.
        """
        if not self.is_writer:
            return  # no .item() syncs or I/O on other ranks
        flat = flatten_metrics(metrics)
        if split == "train":
            self._time_step(int(step), flat.get("step_time_s"))
        record: dict[str, Any] = {"step": int(step), "split": split, "time": time.time(), **flat}
        self._file.write(json.dumps(record, allow_nan=False) + "\n")
        if self._tb is not None:
            for key, value in flat.items():
                if value is not None:
                    self._tb.add_scalar(f"{split}/{key}", value, global_step=int(step))
        for sink in self._sinks:
            sink.log(int(step), split, flat)
        if progress:
            line = (self.progress_line(step, flat) if split == "train"
                    else self.split_line(step, split, flat))
            # soft_wrap: one line even when wider than the terminal (log files, SLURM output).
            self._console.print(line, soft_wrap=True)

    def message(self, text: str) -> None:
        """Print a one-off line (resume, stop, warnings) on the writer rank."""
        if self.is_writer:
            self._console.print(text, soft_wrap=True, markup=False)

    def _time_step(self, step: int, step_time_s: float | None) -> None:
        if step_time_s is not None:
            self._step_time_sum += step_time_s
            self._step_time_count += 1
        now = self._clock()
        if self._first is None:
            self._first = (step, now)
        self._last = (step, now)

    def seconds_per_step(self) -> float | None:
        """Average training step time: the mean of the reported ``step_time_s`` values, or the
        wall time between the first and latest train record per step; None while unknown."""
        if self._step_time_count:
            return self._step_time_sum / self._step_time_count
        if self._first is None or self._last is None or self._last[0] <= self._first[0]:
            return None
        return (self._last[1] - self._first[1]) / (self._last[0] - self._first[0])

    def eta_seconds(self, step: int) -> float | None:
        """Remaining time: average step time x steps left; None while unknown."""
        per_step = self.seconds_per_step()
        if per_step is None:
            return None
        return per_step * max(self.total_steps - step, 0)

    def progress_line(self, step: int, metrics: Mapping[str, Any]) -> str:
        """The one-line report for ``step`` (rich markup)."""
        flat = flatten_metrics(metrics)
        width = len(str(self.total_steps))
        parts = [f"[bold]step {step:>{width}}/{self.total_steps}[/bold]"]
        for key, label, fmt in _PROGRESS_FIELDS:
            if flat.get(key) is not None:
                parts.append(f"{label} {fmt.format(flat[key])}")
        mfu = flat.get("mfu")
        if mfu is None and self.peak_tflops and flat.get("tflops_per_device") is not None:
            mfu = flat["tflops_per_device"] / self.peak_tflops
        if mfu is not None:
            parts.append(f"MFU {100 * mfu:.1f}%")
        mix = {k[len("data/modality/"):]: v for k, v in flat.items()
               if k.startswith("data/modality/") and v is not None}
        if mix:  # realised LLM-token share per modality so far (multimodal loader)
            parts.append("mix " + " ".join(f"{m} {100 * v:.0f}%" for m, v in sorted(mix.items())))
        if flat.get("skipped_steps"):
            parts.append(f"[yellow]skipped {int(flat['skipped_steps'])}[/yellow]")
        parts.append(f"ETA {format_eta(self.eta_seconds(step))}")
        return " | ".join(parts)

    def split_line(self, step: int, split: str, metrics: Mapping[str, Any]) -> str:
        """The one-line report of a validation pass: each dataset's loss (rich markup)."""
        flat = flatten_metrics(metrics)
        losses = [(k[len("loss/"):], v) for k, v in sorted(flat.items())
                  if k.startswith("loss/") and v is not None]
        width = len(str(self.total_steps))
        parts = [f"[bold]{split} {step:>{width}}/{self.total_steps}[/bold]"]
        parts += [f"{name} {value:.4f}" for name, value in losses]
        if "loss" in flat and flat["loss"] is not None:
            parts.append(f"loss {flat['loss']:.4f}")
        return " | ".join(parts)

    def close(self) -> None:
        """Flush and close the files (idempotent)."""
        for sink in self._sinks:
            sink.close()
        self._sinks = []
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None

    def __enter__(self) -> MetricsLogger:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def moe_load_stats(
    tokens_per_expert: Sequence[torch.Tensor], layer_numbers: Sequence[int] | None = None
) -> dict[str, float]:
    """Per-layer expert load imbalance: ``max / mean`` of the tokens each expert received.

    1.0 is perfect balance; ``num_experts`` means one expert got every token. A layer that routed
    no token reports NaN (logged as null) and is left out of the summary over layers.

    Args:
        tokens_per_expert: one ``[num_experts]`` count tensor per MoE layer (e.g. megatron's
            ``router.local_tokens_per_expert`` of a step, summed over TP x CP x DP).
        layer_numbers: names for the layers (default ``0, 1, ...``; megatron's
            ``router.layer_number`` is 1-based).

    Returns:
        ``moe/layer<n>/max_over_mean_load`` per layer (the key ``training/telemetry.py`` uses),
        and ``moe/max_over_mean_load/max`` and ``.../mean`` over layers.
    """
    if layer_numbers is None:
        layer_numbers = range(len(tokens_per_expert))
    if len(layer_numbers) != len(tokens_per_expert):
        raise ValueError(
            f"{len(layer_numbers)} layer_numbers for {len(tokens_per_expert)} count tensors"
        )
    out: dict[str, float] = {}
    finite = []
    for number, counts in zip(layer_numbers, tokens_per_expert):
        counts = counts.detach().double().flatten()
        mean = counts.mean().item()
        ratio = counts.max().item() / mean if mean > 0 else math.nan
        out[f"moe/layer{number}/max_over_mean_load"] = ratio
        if math.isfinite(ratio):
            finite.append(ratio)
    out["moe/max_over_mean_load/max"] = max(finite) if finite else math.nan
    out["moe/max_over_mean_load/mean"] = sum(finite) / len(finite) if finite else math.nan
    return out


def read_metrics(metrics_jsonl: str | Path) -> list[dict[str, Any]]:
    """All records of a metrics file; a torn line (crash mid-write) is skipped."""
    records = []
    with open(metrics_jsonl, encoding="utf-8") as f:
        for line in f:
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def loss_curves(records: Sequence[Mapping[str, Any]]) -> dict[str, list[tuple[int, float]]]:
    """Loss against step per curve: ``"train"`` from ``loss`` of train records, and
    ``"<split>/<dataset>"`` from each ``loss/<dataset>`` key (``"<split>"`` for a bare ``loss``)
    of the other splits. After a resume the same step can appear twice: the later record wins."""
    latest: dict[str, dict[int, float]] = {}
    for rec in records:
        split, step = rec.get("split"), rec.get("step")
        if split is None or step is None:
            continue
        for key, value in rec.items():
            if value is None or not (key == "loss" or key.startswith("loss/")):
                continue
            if split == "train" and key != "loss":
                continue
            name = split if key == "loss" else f"{split}/{key[len('loss/'):]}"
            latest.setdefault(name, {})[int(step)] = float(value)
    return {name: sorted(points.items()) for name, points in latest.items()}


def plot_loss_curves(metrics_jsonl: str | Path, out_png: str | Path) -> Path:
    """Plot training loss and each validation dataset's loss against step; save a PNG.

    Returns:
        The PNG path.

    Raises:
        ValueError: the file has no record with a loss.
    """
    # The object-oriented API on the Agg canvas: headless, and no pyplot global state.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    curves = loss_curves(read_metrics(metrics_jsonl))
    if not curves:
        raise ValueError(f"{metrics_jsonl} has no record with a 'loss'; nothing to plot")
    fig = Figure(figsize=(8, 5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for name in sorted(curves, key=lambda n: (n != "train", n)):
        steps, losses = zip(*curves[name])
        if name == "train":
            ax.plot(steps, losses, label="train", linewidth=1.0, alpha=0.8)
        else:
            ax.plot(steps, losses, label=name, marker="o", markersize=3, linewidth=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title(Path(metrics_jsonl).parent.name or "loss")
    ax.grid(True, alpha=0.3)
    ax.legend()
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, format="png")
    return out_png
