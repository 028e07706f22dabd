"""End-to-end fixtures: the README's tiny pretraining, run once per test session in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def run_train(args: list[str], timeout: int = 600, check: bool = True) -> subprocess.CompletedProcess:
    """``python -m megatron_vlm.train ARGS`` in a fresh process (as a user runs it)."""
    env = dict(os.environ, TORCH_COMPILE_DISABLE="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run(
        [sys.executable, "-m", "megatron_vlm.train", *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"train failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n"
                             f"{proc.stderr[-6000:]}")
    return proc


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """The README's main job (recipe defaults) trained once for the whole test session."""
    run_dir = tmp_path_factory.mktemp("tiny_run")
    proc = run_train(["--recipe", "tiny_cpu", f"train.output_dir={run_dir}"])
    return run_dir, proc
