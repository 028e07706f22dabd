"""A family defined only under tests/ (``tests/fixtures/toy_family``: a patch-MLP tower and a
Linear projector) goes through the family interface end to end, with no change to the package:
registered by ``MEGATRON_VLM_FAMILIES``, read from overrides, trained on the bundled corpus by
``python -m megatron_vlm.train``, checkpointed, resumed from its ``job.yaml`` and probed by
``tools/vision_probe.py``."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import yaml
from tiny_runs import REPO, read_metrics, train_env
from torch.distributed.checkpoint import FileSystemReader

TOY_ENV = {"PYTHONPATH": str(REPO / "tests"), "MEGATRON_VLM_FAMILIES": "toy=fixtures.toy_family"}
TOY_ARGS = ["model.family=toy", "model.vision={hidden_size: 16}",
            "model.projector={vision_hidden_size: 16, output_size: 64}",
            "optim.warmup_steps=1", "train.eval_interval=4", "train.eval_batches=1",
            "train.log_interval=1", "checkpoint.save_interval=4",
            # small: the captions' datasets only, 2 packs a step (the interface is what is tested)
            "data.multimodal.stage=alignment", "data.global_batch_size=2"]


def _run(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run(args, cwd=REPO, env={**train_env(), **TOY_ENV}, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return proc


def test_toy_family_trains_resumes_and_probes(tmp_path):
    run_dir = tmp_path / "toy"
    train = [sys.executable, "-m", "megatron_vlm.train", "--recipe", "tiny_vlm_cpu",
             f"train.output_dir={run_dir}", *TOY_ARGS]
    _run([*train, "train.steps=4"])
    saved = yaml.safe_load((run_dir / "job.yaml").read_text())["model"]
    assert saved["family"] == "toy" and saved["vision"] == {
        "hidden_size": 16, "patch_size": 14, "in_channels": 3}
    saved_keys = FileSystemReader(run_dir / "checkpoints/step_0000004").read_metadata()
    assert {"vision_tower.embed.weight", "projector.linear.weight"} <= set(
        saved_keys.state_dict_metadata)
    # Resumed from job.yaml + checkpoint (the toy types are rebuilt from the YAML).
    _run([*train, "train.steps=5", "--resume"])
    records = read_metrics(run_dir)
    steps = [r["step"] for r in records if r["split"] == "train"]
    assert steps == [1, 2, 3, 4, 5], steps
    valid = {r["step"]: r for r in records if r["split"] == "valid"}
    before = [v for k, v in valid[0].items() if k.startswith("loss/")]
    after = [v for k, v in valid[4].items() if k.startswith("loss/")]
    assert before and all(math.isfinite(v) for v in before + after)
    assert sum(after) / len(after) < sum(before) / len(before) - 0.2, (before, after)
    # The probes run on any family's model (scores are not asserted: 5 steps learn nothing).
    proc = _run([sys.executable, "tools/vision_probe.py", str(run_dir), "--batches", "1"])
    probe = json.loads(proc.stdout.split("PROBE ", 1)[1])
    assert probe["image_caption"]["items"] > 0 and math.isfinite(probe["video"]["true"])
