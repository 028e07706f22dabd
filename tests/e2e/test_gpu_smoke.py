"""The GPU smoke's CPU form (``benchmarks/gpu_smoke.py --cpu``): everything the lent GPU machine
runs except CUDA itself.

Pre-packed micro-batches are written here from the real multimodal loader (``--prepare``), then
the smoke's stage 1 (``torchrun --nproc-per-node 1 -m megatron_vlm.train`` on gloo, 3 steps, local
spec) runs in a child whose imports of energon, PyAV, decord and the other packages the GPU
machine lacks fail -- as there -- and writes its JSON. Its losses, grad norms and validation
losses must equal a normal in-process training of the same job on the same file (run meanwhile,
on the other core).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from tiny_runs import REPO, read_metrics, train_env

BLOCKER = '''
import importlib.abc, os, sys
_BLOCK = ("megatron.energon", "av", "decord", "webdataset", "multistorageclient", "s3fs",
          "botocore", "wandb", "pydantic")
class _Absent(importlib.abc.MetaPathFinder):
    """What the lent GPU machine lacks (SPEC 12; device KINDS.md's package list) and this
    environment has: importing it fails."""
    def find_spec(self, name, path, target=None):
        if any(name == b or name.startswith(b + ".") for b in _BLOCK):
            raise ModuleNotFoundError(f"No module named {name!r} (absent on the GPU machine)")
sys.meta_path.insert(0, _Absent())
open(os.path.join(os.path.dirname(__file__), f"active_{os.getpid()}"), "w").close()
'''


def test_cpu_form_of_the_gpu_smoke_trains_like_an_in_process_run(tmp_path):
    from benchmarks import gpu_smoke
    from megatron_vlm.config import apply_overrides
    from megatron_vlm.recipes import get_recipe
    from megatron_vlm.training.trainer import train

    smoke_dir, out = tmp_path / "smoke", tmp_path / "out"
    written = gpu_smoke.prepare(smoke_dir, steps=3)
    assert written["bytes"]["tiny_vlm_packs.pt"] < 16 * 2**20  # travels with the tree

    block = tmp_path / "block"
    block.mkdir()
    (block / "sitecustomize.py").write_text(BLOCKER)
    env = {k: v for k, v in train_env().items() if k != "OUT"}
    env["PYTHONPATH"] = os.pathsep.join([str(block), str(REPO)])
    child = subprocess.Popen(
        [sys.executable, "-m", "benchmarks.gpu_smoke", "--cpu", "--stages", "train",
         "--dir", str(smoke_dir), "--out-dir", str(out)],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        ref_dir = tmp_path / "reference"
        job = apply_overrides(get_recipe(gpu_smoke.RECIPE),
                              gpu_smoke.run_overrides(smoke_dir, ref_dir, 3, cpu=True))
        train(job)
        ref = read_metrics(ref_dir)
    finally:
        log, _ = child.communicate(timeout=300)
    assert child.returncode == 0, log[-6000:]

    (report_path,) = out.glob("gpu_smoke_*_smoke.json")
    report = json.loads(report_path.read_text())
    assert report["device_kind"] == "cpu" and report["ok"] is True
    stage = report["stages"]["train"]
    assert stage["status"] == "done" and stage["returncode"] == 0
    assert stage["command"][2:7] == ["torch.distributed.run", "--standalone", "--nproc-per-node",
                                     "1", "-m"]
    assert "parallel.backend=gloo" in stage["command"]
    assert "model.kernels.backend=local" in stage["command"]
    assert "data: pre-packed" in stage["stdout_tail"]
    assert "backend=local" in stage["stdout_tail"]
    # The blocker was live in the launcher and the worker: none needed what it hides.
    assert len(list(block.glob("active_*"))) >= 3  # smoke driver, torchrun, worker
    ref_train = [r for r in ref if r["split"] == "train"]
    assert stage["steps"] == [1, 2, 3]
    assert stage["loss"] == [r["loss"] for r in ref_train]
    assert stage["grad_norm"] == [r["grad_norm"] for r in ref_train]
    ref_valid = [{k: v for k, v in r.items() if k == "step" or k.startswith("loss/")}
                 for r in ref if r["split"] == "valid"]
    assert stage["valid"] == ref_valid and len(ref_valid) == 2  # before and after training
    assert stage["checkpoints"] == ["step_0000003"]
    assert (out / "train_log.txt").is_file()
