"""examples/ in smoke form, reusing the session's tiny run (SPEC §13):

- ``pretrain_tiny.sh`` is the session run itself (tests/conftest.py trains through it);
- ``hf_roundtrip.sh``: the session run exported to HF, imported, trained 2 steps, exported, loaded
  in transformers with its tokenizer;
- ``staged_pretraining.sh``: stage (c) for 2 steps from the session run's checkpoint;
- ``slurm_kimi_k25.sh``: the rendered, pre-checked batch script for kimi_k25 on 128 nodes;
- ``scaling_sweep.sh``: run by tests/scaling/test_sweep.py (its smoke sweep goes through it).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from tiny_runs import REPO, run_example, train_env

EXAMPLES = REPO / "examples"


def test_every_example_is_a_shell_checked_script():
    scripts = sorted(p.name for p in EXAMPLES.glob("*.sh"))
    assert scripts == ["hf_roundtrip.sh", "pretrain_tiny.sh", "scaling_sweep.sh",
                       "slurm_kimi_k25.sh", "staged_pretraining.sh"]
    for name in scripts:
        subprocess.run(["bash", "-n", str(EXAMPLES / name)], check=True)


def test_pretrain_example_is_the_session_run(tiny_vlm_run):
    assert "=== tiny_cpu: 600 steps" in tiny_vlm_run.stdout
    assert tiny_vlm_run.checkpoint(600).is_dir()


@pytest.fixture(scope="module")
def exported_tiny_run(tiny_vlm_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny_hf") / "hf"
    subprocess.run([sys.executable, str(REPO / "tools/convert_hf.py"), "export",
                    str(tiny_vlm_run.checkpoint(600)), str(out)],
                   cwd=REPO, env=train_env(), check=True, capture_output=True, timeout=300)
    return out


def test_hf_roundtrip_example(exported_tiny_run, tmp_path):
    work = tmp_path / "rt"
    proc = run_example("hf_roundtrip.sh", env={"HF_DIR": str(exported_tiny_run),
                                               "WORK": str(work), "SMOKE": "1"})
    out = proc.stdout
    assert out.index("== 1. import") < out.index("== 2. train") < out.index("== 3. export") \
        < out.index("== 4. load")
    assert f"initialised from {work / 'imported' / 'step_0000000'}" in out
    assert "step 2/2 | loss" in out
    config = json.loads((work / "exported" / "config.json").read_text())
    source = json.loads((exported_tiny_run / "config.json").read_text())
    assert config["image_token_id"] == source["image_token_id"] != 163605
    assert (f"image_token_id {config['image_token_id']} = '<|media_pad|>' in the tokenizer"
            in out)
    assert "greedy: " in out


def test_staged_example_runs_stage_c_from_the_session_run(tiny_vlm_run, tmp_path):
    proc = run_example("staged_pretraining.sh", env={
        "SMOKE": "1", "OUT": str(tmp_path / "stages"),
        "INIT_FROM": str(tiny_vlm_run.run_dir / "checkpoints")})
    assert "=== stage 1/1: tiny_stage_joint" in proc.stdout
    # The main job trains with Muon, stage (c) with AdamW: the weights carry over, the optimizer
    # state cannot (it would not even load).
    assert "the optimizer changed: optim.optimizer=muon in the checkpoint, adamw now" \
        in proc.stdout
    assert (tmp_path / "stages" / "tiny_stage_joint" / "checkpoints" / "step_0000002").is_dir()


def test_slurm_example_renders_a_checked_script():
    proc = run_example("slurm_kimi_k25.sh", env={"DRY_RUN": "1", "RUN_DIR": "/lustre/runs/k"})
    script = proc.stdout
    assert "#SBATCH --nodes=128" in script and "#SBATCH --gpus-per-node=8" in script
    assert "data.tokenizer=/lustre/ckpt/Kimi-K2.5" in script
    assert "--resume=require" in script  # a requeued job never restarts from step 0
    # The same launch on 1 node is refused before anything is queued.
    bad = run_example("slurm_kimi_k25.sh", env={"DRY_RUN": "1", "NODES": "1"}, check=False)
    assert bad.returncode == 2 and "tp*pp*cp=128" in bad.stderr
