"""Tiny VLM pretraining on the bundled multimodal corpus (energon shards, two-budget packing):
it learns, and its vision path carries information -- held-out caption loss with the true pixels
is clearly lower than with the media shuffled between samples (a model that ignores pixels would
score the same)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from conftest import REPO, read_metrics, run_train

STEPS = 300

PROBE = r"""
import json, sys, torch
from pathlib import Path
from megatron_vlm.checkpoint import find_latest_checkpoint, load_checkpoint
from megatron_vlm.config import apply_overrides, load_yaml
from megatron_vlm.parallel.init import init_distributed
from megatron_vlm.training.data_setup import build_data
from megatron_vlm.training.model_setup import build_model_chunks
from megatron_vlm.training.probes import count_changed_items, reverse_frames, shuffle_media
from megatron_vlm.training.trainer import run_forward_backward

run = Path(sys.argv[1])
job = apply_overrides(load_yaml(str(run / "job.yaml")), ["train.eval_batches=8"])
init_distributed(job.parallel, job.train.seed)
data = build_data(job, 0, 1, run)
chunks = build_model_chunks(job)
load_checkpoint(find_latest_checkpoint(run / "checkpoints"), chunks, None, None,
                load_optimizer=False)
for c in chunks:
    c.eval()

def loss(batches):
    with torch.no_grad():
        total = run_forward_backward(chunks, batches, job.data.seq_length, forward_only=True)
    return (total[0] / total[1]).item()

out = {}
for name in ("image_caption", "video"):
    batches = data.valid[name]
    shuffled, reversed_ = shuffle_media(batches), reverse_frames(batches)
    out[name] = {"true": loss(batches), "shuffled": loss(shuffled),
                 "reversed": loss(reversed_),
                 "shuffled_items": count_changed_items(batches, shuffled),
                 "reversed_items": count_changed_items(batches, reversed_)}
data.close()
print("PROBE " + json.dumps(out))
"""


@pytest.fixture(scope="module")
def vlm_run(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("vlm")
    run_train(["--recipe", "tiny_vlm_cpu", f"train.steps={STEPS}", "train.eval_interval=100",
               "train.log_interval=50", "data.multimodal.stage=alignment",
               f"train.output_dir={run_dir}"], timeout=900)
    return run_dir


def test_vlm_learns_captions(vlm_run):
    valid = [r for r in read_metrics(vlm_run) if r["split"] == "valid"]
    first, last = valid[0], valid[-1]
    for name in ("image_caption", "video"):
        assert last[f"loss/{name}"] < 0.3 * first[f"loss/{name}"], (name, first, last)


def test_vision_path_carries_information(vlm_run):
    env = dict(os.environ, TORCH_COMPILE_DISABLE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run([sys.executable, "-c", PROBE, str(vlm_run)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.split("PROBE ", 1)[1])
    print(result)
    for name in ("image_caption", "video"):
        r = result[name]
        assert r["shuffled_items"] >= 10, r  # the probe really moved media between samples
        assert r["shuffled"] > 1.08 * r["true"], (name, r)
