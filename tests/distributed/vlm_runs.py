"""Runs the VLM layout workers once per pytest session; test_vlm_layouts.py and
test_resharding.py read the same results (two process starts in all: the one-process reference,
then one 2-rank torchrun for every layout, resharding and refusal case). Also the checks that
test_vlm_layouts.py and test_context_parallel.py both make of a layout against the reference."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from vlm_cases import relative_error

HERE = Path(__file__).resolve().parent


def run_worker(cmd: list[str], timeout: int = 600) -> None:
    """Run a worker command from the repository root; its output tail on failure."""
    env = dict(os.environ, TORCH_COMPILE_DISABLE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout,
                          cwd=HERE.parents[1])
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-6000:]


def vlm_results(tmp_path_factory) -> tuple[dict, dict]:
    """``(reference, layouts)``: ``vlm_worker.py``'s results, computed on first use."""
    out = tmp_path_factory.getbasetemp() / "vlm_layouts"
    if not (out / "layouts.pt").exists():
        out.mkdir(exist_ok=True)
        worker = str(HERE / "vlm_worker.py")
        run_worker([sys.executable, worker, str(out), "reference"])
        run_worker([sys.executable, "-m", "torch.distributed.run", "--standalone",
              "--nproc-per-node=2", worker, str(out), "layouts"])
    ref = torch.load(out / "reference.pt", weights_only=True)["ref"]
    return ref, torch.load(out / "layouts.pt", weights_only=True)


def check_routing(ref: dict, got: dict, layout: str) -> None:
    """3 MoE layers x 4 micro-batches, every token's top-2 experts (padding routed nowhere)."""
    assert sorted(got["routing"]) == sorted(ref["routing"]) and len(ref["routing"]) == 12
    for key, routing in ref["routing"].items():
        assert routing.shape == (128, 8) and routing.sum() > 0
        assert torch.equal(got["routing"][key], routing), (layout, key)


def check_loss_and_gradients(ref: dict, got: dict, layout: str) -> None:
    """Loss 1e-6 relative; each gradient's max error 1e-5 of its largest entry; grad norms 1e-5."""
    assert got["loss"] == pytest.approx(ref["loss"], rel=1e-6)
    assert got["grads"].keys() == ref["grads"].keys()
    assert any(k.startswith("vision_tower.") for k in ref["grads"])
    for name, g in ref["grads"].items():
        assert g.abs().max() > 0, f"{name} has no gradient in the reference"
        assert relative_error(got["grads"][name], g) < 1e-5, (layout, name)
    assert got["grad_norms"] == pytest.approx(ref["grad_norms"], rel=1e-5)


def check_three_steps(ref: dict, got: dict, layout: str) -> None:
    """Parameters after three steps within 1e-4, the whole update within 1e-4 relative
    (Frobenius), and the loss on the batch after them; the steps moved the weights and lowered
    the loss."""
    diff = num = den = 0.0
    for name, p in ref["params3"].items():
        q = got["params3"][name]
        diff = max(diff, (q - p).abs().max().item())
        num += float(((q - got["params0"][name]) - (p - ref["params0"][name])).norm() ** 2)
        den += float((p - ref["params0"][name]).norm() ** 2)
    assert den ** 0.5 > 0.1  # the three steps moved the weights
    assert diff < 1e-4, (layout, diff)
    assert (num / den) ** 0.5 < 1e-4, layout
    assert got["loss3"] == pytest.approx(ref["loss3"], rel=1e-5)
    assert ref["loss3"] < ref["loss"] - 0.5  # and lowered the loss on the batch
