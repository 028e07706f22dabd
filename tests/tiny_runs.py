"""Helpers for tests that run training as a user does: ``python -m megatron_vlm.train ...`` in a
fresh process. Imported by ``tests/conftest.py`` (the session's tiny VLM run) and by the tests."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def train_env() -> dict[str, str]:
    """The environment CI runs training under (one thread per process, no torch.compile)."""
    return dict(os.environ, TORCH_COMPILE_DISABLE="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")


def run_train(args: list[str], timeout: int = 600,
              check: bool = True) -> subprocess.CompletedProcess:
    """``python -m megatron_vlm.train ARGS`` in a fresh process (as a user runs it)."""
    proc = subprocess.run(
        [sys.executable, "-m", "megatron_vlm.train", *args],
        cwd=REPO, env=train_env(), capture_output=True, text=True, timeout=timeout,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"train failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n"
                             f"{proc.stderr[-6000:]}")
    return proc


def run_example(script: str, env: dict[str, str] | None = None, args: list[str] = (),
                timeout: int = 600, check: bool = True) -> subprocess.CompletedProcess:
    """``bash examples/SCRIPT ARGS`` as a user runs it, with this interpreter as ``PYTHON``."""
    proc = subprocess.run(
        ["bash", str(REPO / "examples" / script), *args], cwd=REPO,
        env={**train_env(), "PYTHON": sys.executable, **(env or {})},
        capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{script} failed ({proc.returncode}):\n{proc.stdout[-4000:]}\n"
                             f"{proc.stderr[-6000:]}")
    return proc


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def train_steps(run_dir: Path) -> list[int]:
    """Steps of the run's train records so far ([] before the first one is written)."""
    if not (run_dir / "metrics.jsonl").exists():
        return []
    return [r["step"] for r in read_metrics(run_dir) if r["split"] == "train"]


@dataclass(frozen=True)
class TinyRun:
    """A finished training run (read-only for tests: copy what you need to change)."""

    run_dir: Path
    stdout: str

    @property
    def metrics(self) -> list[dict]:
        return read_metrics(self.run_dir)

    def checkpoint(self, step: int) -> Path:
        path = self.run_dir / "checkpoints" / f"step_{step:07d}"
        if not path.is_dir():
            raise FileNotFoundError(f"{path} was not kept (checkpoint.keep_last?)")
        return path

    def fork(self, dest: Path, step: int) -> Path:
        """A new run directory holding this run's job.yaml, tokenizer and checkpoint ``step`` --
        what an interrupted copy of this run would have left at that step."""
        dest.mkdir(parents=True)
        for item in self.run_dir.iterdir():
            if item.is_file() and item.suffix in (".yaml", ".model", ".vocab", ".json"):
                shutil.copy2(item, dest / item.name)
        shutil.copytree(self.checkpoint(step), dest / "checkpoints" / self.checkpoint(step).name)
        return dest


def load_tool(name: str):
    """``tools/<name>.py`` as a module (the command-line tools are scripts, not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
