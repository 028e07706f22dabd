"""Exact resume: stop mid-run, resume in a fresh process, and every later step equals an
uninterrupted run bit for bit (fp32, dropout 0, deterministic CPU kernels, shuffling on).

Also: SIGTERM saves a complete checkpoint and exits cleanly; a run whose loss/gradients turn
non-finite skips and counts those steps, then aborts with a message after N in a row.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, read_metrics, run_train
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

COMMON = ["--recipe", "tiny_cpu", "train.steps=60", "train.eval_interval=20",
          "checkpoint.save_interval=0", "train.log_interval=20"]
STOP_AT = 35  # 35 steps x 8 packed sequences = 280 sequences (thousands of documents)


def _tensors(ckpt: Path, tmp: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a torch_dist checkpoint (model and optimizer), read back independently."""
    out = tmp / f"{ckpt.parent.parent.name}.pt"
    dcp_to_torch_save(str(ckpt), str(out))
    state = torch.load(out, weights_only=True)
    return {k: v for k, v in state.items() if torch.is_tensor(v)}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("resume")
    full, split = base / "full", base / "split"
    run_train([*COMMON, f"train.output_dir={full}"])
    first = run_train([*COMMON, f"train.output_dir={split}", f"train.exit_after_steps={STOP_AT}"])
    second = run_train([*COMMON, f"train.output_dir={split}", "--resume"])
    return base, full, split, first, second


def test_interrupted_run_stops_with_checkpoint(runs):
    _, _, split, first, second = runs
    assert f"stopping at step {STOP_AT}" in first.stdout
    assert f"resumed from {split / 'checkpoints' / f'step_{STOP_AT:07d}'}" in second.stdout


def test_every_later_step_equals_uninterrupted_run(runs):
    _, full, split, _, _ = runs
    ref = {(r["split"], r["step"]): r for r in read_metrics(full)}
    got = [r for r in read_metrics(split) if r["step"] > STOP_AT]
    later_train = [r for r in got if r["split"] == "train"]
    assert [r["step"] for r in later_train] == list(range(STOP_AT + 1, 61))
    for r in got:
        expect = ref[(r["split"], r["step"])]
        for key in ("loss", "grad_norm", "lr", "loss/text"):
            if key in expect:
                assert r[key] == expect[key], (r["step"], key, r[key], expect[key])
        if r["split"] == "train":
            moe = [k for k in expect if k.endswith("bias_drift")]
            assert moe and all(r[k] == expect[k] for k in moe)


def test_final_checkpoints_bit_identical(runs, tmp_path):
    _, full, split, _, _ = runs
    a = _tensors(full / "checkpoints" / "step_0000060", tmp_path)
    b = _tensors(split / "checkpoints" / "step_0000060", tmp_path)
    assert a.keys() == b.keys()
    assert any("expert_bias" in k for k in a) and any("exp_avg_sq" in k for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    ra = torch.load(full / "checkpoints" / "step_0000060" / "rank_00000.pt", weights_only=True)
    rb = torch.load(split / "checkpoints" / "step_0000060" / "rank_00000.pt", weights_only=True)
    assert repr(ra["rng"]) == repr(rb["rng"])  # torch/numpy/python/megatron-tracker RNG states
    assert ra["extra_json"] == rb["extra_json"]  # data position, counters, bias at start


def test_sigterm_saves_and_exits_cleanly_then_resumes(tmp_path):
    run_dir = tmp_path / "sig"
    env = dict(os.environ, TORCH_COMPILE_DISABLE="1", OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "megatron_vlm.train", "--recipe", "tiny_cpu",
         "train.steps=100000", "train.eval_interval=0", f"train.output_dir={run_dir}"],
        cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline:
        if metrics.exists() and metrics.read_text().count('"split": "train"') >= 3:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-3000:]
    stop_step = max(r["step"] for r in read_metrics(run_dir) if r["split"] == "train")
    assert f"stopping at step {stop_step} (signal)" in out
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").iterdir())
    assert ckpts == [f"step_{stop_step:07d}"]  # one complete checkpoint, no leftovers
    again = run_train(["--recipe", "tiny_cpu", f"train.steps={stop_step + 2}",
                       "optim.warmup_steps=1", "train.eval_interval=0",
                       f"train.output_dir={run_dir}", "--resume"])
    assert f"at step {stop_step}" in again.stdout
    steps = [r["step"] for r in read_metrics(run_dir) if r["split"] == "train"]
    assert steps[-2:] == [stop_step + 1, stop_step + 2]


def test_nonfinite_steps_are_skipped_counted_then_abort(tmp_path):
    run_dir = tmp_path / "nan"
    # Weights of std 1e30 overflow the activations' squares: gradients become NaN/Inf.
    proc = run_train(["--recipe", "tiny_cpu", "train.steps=20", "model.llm.init_method_std=1e30",
                      "train.max_consecutive_nonfinite=3", "train.eval_interval=0",
                      f"train.output_dir={run_dir}"], check=False)
    assert proc.returncode != 0
    assert "3 consecutive steps had a non-finite loss or gradient" in proc.stderr
    train = [r for r in read_metrics(run_dir) if r["split"] == "train"]
    assert [r["skipped_steps"] for r in train] == [1, 2, 3]
