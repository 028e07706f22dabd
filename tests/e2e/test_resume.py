"""Exact resume: the session's tiny VLM run (``tiny_vlm_run``) continued in a fresh process from
its step-500 checkpoint equals the uninterrupted run bit for bit -- every later step's loss,
gradient norm, data mix and MoE bias drift, the validation losses, and every tensor and RNG state
of the final checkpoint (fp32, dropout 0, deterministic CPU kernels, energon loader with a worker
and shuffling restored from its saved state).

Also (on the text-only ``tiny_text_cpu``, seconds per run): SIGTERM saves a complete checkpoint
and exits cleanly, and ``exit_after_steps`` stops with one; a run whose loss/gradients turn
non-finite skips and counts those steps, then aborts with a message after N in a row.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from tiny_runs import REPO, read_metrics, run_train, train_env
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

RESUME_AT, END = 500, 600
TIMING_KEYS = {"time", "step_time_s", "tokens_per_s", "samples_per_s", "tflops_per_device",
               "mfu"}
"""Metrics that measure wall time; everything else must repeat exactly."""


def _tensors(ckpt: Path, tmp: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a torch_dist checkpoint (model and optimizer), read back independently
    (into ``tmp/<run dir name>.pt``)."""
    out = tmp / f"{ckpt.parent.parent.name}.pt"
    assert not out.exists(), out
    dcp_to_torch_save(str(ckpt), str(out))
    state = torch.load(out, weights_only=True)
    return {k: v for k, v in state.items() if torch.is_tensor(v)}


@pytest.fixture(scope="module")
def resumed(tiny_vlm_run, tmp_path_factory):
    fork = tiny_vlm_run.fork(tmp_path_factory.mktemp("resume") / "run", RESUME_AT)
    proc = run_train(["--config", str(fork / "job.yaml"), f"train.output_dir={fork}", "--resume"])
    return fork, proc


def test_resumes_from_the_checkpoint(resumed):
    fork, proc = resumed
    assert f"resumed from {fork / 'checkpoints' / f'step_{RESUME_AT:07d}'} at step {RESUME_AT}" \
        in proc.stdout, proc.stdout[-2000:]


def test_every_later_step_equals_uninterrupted_run(tiny_vlm_run, resumed):
    fork, _ = resumed
    ref = {(r["split"], r["step"]): r for r in tiny_vlm_run.metrics}
    # "checkpoint" records time the saves (wall-clock only): every other record must repeat.
    got = [r for r in read_metrics(fork) if r["split"] != "checkpoint"]
    assert [r["step"] for r in got if r["split"] == "train"] == list(range(RESUME_AT + 1, END + 1))
    assert {r["step"] for r in got if r["split"] == "valid"} == {END}
    for r in got:
        expect = ref[(r["split"], r["step"])]
        assert r.keys() == expect.keys(), r["step"]
        assert any(k.startswith("data/mix/") for k in r) or r["split"] == "valid"
        for key in r.keys() - TIMING_KEYS:
            assert r[key] == expect[key], (r["split"], r["step"], key, r[key], expect[key])


def test_final_checkpoints_bit_identical(tiny_vlm_run, resumed, tmp_path):
    fork, _ = resumed
    a = _tensors(tiny_vlm_run.checkpoint(END), tmp_path)
    b = _tensors(fork / "checkpoints" / f"step_{END:07d}", tmp_path)
    assert a.keys() == b.keys()
    assert any("expert_bias" in k for k in a) and any("exp_avg_sq" in k for k in a)
    assert any("vision_tower" in k for k in a) and any("projector" in k for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    ra = torch.load(tiny_vlm_run.checkpoint(END) / "rank_00000.pt", weights_only=True)
    rb = torch.load(fork / "checkpoints" / f"step_{END:07d}" / "rank_00000.pt", weights_only=True)
    assert repr(ra["rng"]) == repr(rb["rng"])  # torch/numpy/python/megatron-tracker RNG states
    assert ra["extra_json"] == rb["extra_json"]  # loader state, counters, bias at start


def test_sigterm_saves_and_exits_cleanly_then_resumes(tmp_path):
    run_dir = tmp_path / "sig"
    proc = subprocess.Popen(
        [sys.executable, "-m", "megatron_vlm.train", "--recipe", "tiny_text_cpu",
         "train.steps=100000", "train.eval_interval=0", f"train.output_dir={run_dir}"],
        cwd=REPO, env=train_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
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
    # Resume, then stop after 2 more steps with a checkpoint (exit_after_steps).
    again = run_train(["--recipe", "tiny_text_cpu", f"train.steps={stop_step + 10}",
                       "optim.warmup_steps=1", "train.eval_interval=0", "train.exit_after_steps=2",
                       f"train.output_dir={run_dir}", "--resume"])
    assert f"at step {stop_step}" in again.stdout
    assert f"stopping at step {stop_step + 2} (exit_after_steps)" in again.stdout
    steps = [r["step"] for r in read_metrics(run_dir) if r["split"] == "train"]
    assert steps[-2:] == [stop_step + 1, stop_step + 2]
    assert (run_dir / "checkpoints" / f"step_{stop_step + 2:07d}" / "manifest.json").is_file()


def test_nonfinite_steps_are_skipped_counted_then_abort(tmp_path):
    run_dir = tmp_path / "nan"
    # Weights of std 1e30 overflow the activations' squares: gradients become NaN/Inf.
    proc = run_train(["--recipe", "tiny_text_cpu", "train.steps=20",
                      "model.llm.init_method_std=1e30",
                      "train.max_consecutive_nonfinite=3", "train.eval_interval=0",
                      f"train.output_dir={run_dir}"], check=False)
    assert proc.returncode != 0
    assert "3 consecutive steps had a non-finite loss or gradient" in proc.stderr
    train = [r for r in read_metrics(run_dir) if r["split"] == "train"]
    assert [r["skipped_steps"] for r in train] == [1, 2, 3]
