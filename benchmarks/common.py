"""Shared helpers for the benchmarks: device description, library versions, JSON results.

Each benchmark writes ``benchmarks/results/<name>_<device>.json`` holding the date, the device
(CPU model and core count; the CUDA device name if one is visible), library versions, the
benchmark's configuration and its results. Benchmarks are not tests; each has a ``--smoke``
mode (a few seconds) exercised by ``tests/unit/test_benchmarks_smoke.py``.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import json
import os
import platform
import re
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def cpu_model() -> str:
    """CPU model name from ``/proc/cpuinfo`` (``platform.processor()`` as a fallback)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown-cpu"


def cuda_device() -> str | None:
    try:
        import torch
        if torch.cuda.is_available():
            return torch.cuda.get_device_name(0)
    except Exception:  # noqa: BLE001 - a description, never fatal
        pass
    return None


def device_info() -> dict[str, Any]:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu_model": cpu_model(),
        "cpu_cores": cores,
        "cuda_device": cuda_device(),
        "platform": platform.platform(),
        "python": platform.python_version(),
    }


def device_tag() -> str:
    """File-name tag of the device: the CUDA device if any, else the CPU model."""
    name = cuda_device() or cpu_model()
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower() or "unknown"


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for label, module in (("torch", "torch"), ("megatron-core", "megatron.core"),
                          ("megatron-energon", "megatron.energon"), ("decord", "decord"),
                          ("av", "av"), ("numpy", "numpy")):
        try:
            mod = importlib.import_module(module)
            out[label] = str(getattr(mod, "__version__", "unknown"))
        except Exception:  # noqa: BLE001 - missing library: recorded as None
            out[label] = None
    return out


def parse_args(description: str, argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--smoke", action="store_true", help="tiny sizes, a few seconds")
    p.add_argument("--out-dir", default=None, help=f"result directory (default {RESULTS_DIR})")
    return p.parse_args(argv)


def write_result(name: str, config: dict[str, Any], results: dict[str, Any],
                 out_dir: str | os.PathLike | None = None, smoke: bool = False,
                 notes: str = "") -> Path:
    """Write ``<out_dir>/<name>_<device>.json`` (``_smoke`` appended in smoke mode)."""
    dev = device_info()
    payload = {
        "benchmark": name,
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": dev,
        "device_kind": "cuda" if dev["cuda_device"] else "cpu",
        "versions": versions(),
        "smoke": smoke,
        "notes": notes,
        "config": config,
        "results": results,
    }
    out = Path(out_dir) if out_dir else RESULTS_DIR
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}_{device_tag()}{'_smoke' if smoke else ''}.json"
    path.write_text(json.dumps(payload, indent=2, sort_keys=False) + "\n")
    print(json.dumps(results, indent=2))
    print(f"wrote {path}")
    return path
