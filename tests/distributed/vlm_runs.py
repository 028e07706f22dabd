"""Runs the VLM layout workers once per pytest session; test_vlm_layouts.py and
test_resharding.py read the same results (two process starts in all: the one-process reference,
then one 2-rank torchrun for every layout, resharding and refusal case)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent


def _run(cmd: list[str]) -> None:
    env = dict(os.environ, TORCH_COMPILE_DISABLE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600,
                          cwd=HERE.parents[1])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-6000:]


def vlm_results(tmp_path_factory) -> tuple[dict, dict]:
    """``(reference, layouts)``: ``vlm_worker.py``'s results, computed on first use."""
    out = tmp_path_factory.getbasetemp() / "vlm_layouts"
    if not (out / "layouts.pt").exists():
        out.mkdir(exist_ok=True)
        worker = str(HERE / "vlm_worker.py")
        _run([sys.executable, worker, str(out), "reference"])
        _run([sys.executable, "-m", "torch.distributed.run", "--standalone",
              "--nproc-per-node=2", worker, str(out), "layouts"])
    ref = torch.load(out / "reference.pt", weights_only=True)["ref"]
    return ref, torch.load(out / "layouts.pt", weights_only=True)
