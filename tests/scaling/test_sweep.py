"""Sweeps: the YAML expands into the runs and phases the trainer accepts, SLURM array files
that ``tools/launch.py`` reads, and the shipped early-fusion sweep's smoke version runs both arms
end to end (the late arm switching from text to vision data mid-run)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from megatron_vlm.cluster.launch import _check_run
from megatron_vlm.cluster.slurm import read_array_file
from megatron_vlm.recipes import get_recipe
from tools.scaling.runner import trainer_env
from tools.scaling.sweep import load_sweep, write_array_files

REPO = Path(__file__).resolve().parents[2]
SWEEP = REPO / "tools/scaling/sweeps/early_fusion_tiny.yaml"


def _arg(args, key: str) -> str | None:
    hits = [a.split("=", 1)[1] for a in args if a.startswith(key + "=")]
    return hits[-1] if hits else None


def test_early_fusion_sweep_expands_into_equal_budget_arms() -> None:
    sweep = load_sweep(SWEEP)
    assert len(sweep.runs) == 8
    by_arm: dict[str, list] = {}
    for run in sweep.runs:
        by_arm.setdefault(run.tags["fusion"], []).append(run)
    assert sorted(r.steps for r in by_arm["early10"]) == [30, 60, 120, 240]
    for run in by_arm["early10"]:
        (phase,) = run.phases
        assert _arg(phase.args, "data.multimodal.stage") == "early10"
        assert "--resume" not in phase.args
    for run in by_arm["late50"]:
        first, second = run.phases
        switch = round(0.8 * run.steps)
        assert first.end_step == switch and second.end_step == run.steps
        assert _arg(first.args, "train.exit_after_steps") == str(switch)
        assert _arg(first.args, "data.multimodal.stage") == "text_only"
        assert second.args[0] == "--resume"
        assert _arg(second.args, "data.multimodal.stage") == "late50"
        assert _arg(second.args, "checkpoint.load_data_state") == "false"
        assert _arg(second.args, "train.output_dir") == _arg(first.args, "train.output_dir")
        # Same token budget as the early arm: same steps, batch and sequence length.
        assert _arg(second.args, "train.steps") == str(run.steps)
    # K2.5's arms, equal vision share overall: 10:90 from step 0 vs 50:50 over the last 20%.
    mixes = json.loads(_arg(sweep.runs[0].phases[0].args, "data.multimodal.mixes"))
    assert mixes["early10"]["vision_token_fraction"] == pytest.approx(0.10)
    assert mixes["late50"]["vision_token_fraction"] == pytest.approx(0.50)
    assert mixes["early10"]["vision_token_fraction"] * 1.0 == pytest.approx(
        mixes["late50"]["vision_token_fraction"] * (1 - 0.8))
    assert "joint" in mixes  # the recipe's own mixes are kept


def test_array_files_are_what_launch_reads(tmp_path) -> None:
    sweep = load_sweep(SWEEP)
    paths = write_array_files(sweep, tmp_path)
    assert [p.name for p in paths] == ["early_fusion_tiny.phase0.txt",
                                       "early_fusion_tiny.phase1.txt"]
    phase0, phase1 = (read_array_file(p) for p in paths)
    assert phase0 == [list(r.phases[0].args) for r in sweep.runs]
    assert phase1 == [list(r.phases[1].args) for r in sweep.runs if len(r.phases) > 1]
    for i, args in enumerate(phase0 + phase1):
        assert _check_run(args, f"line {i}") == get_recipe(sweep.recipe).name


def _write(tmp_path, spec: dict) -> Path:
    path = tmp_path / "sweep.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path


@pytest.mark.parametrize(("axes", "needle"), [
    ({"lr": [1e-3, 3e-3]}, "needs a config path"),
    ({"arm": {"a": {"phases": [{"until": 1.5, "overrides": []}, {"overrides": []}]}}},
     "until=1.5 must be in (0, 1)"),
    ({"arm": {"a": {"phases": [{"until": 0.5}, {"until": 0.9}]}}}, "drop its 'until'"),
    ({"arm": {"a": {"phases": [{"until": 0.01}, {}]}}}, "would run no step"),
    ({"optim.lr": [-1.0]}, "optim.lr"),
    ({"arm": {"a": {"overide": []}}}, "unknown keys ['overide']"),
])
def test_malformed_sweeps_are_refused(tmp_path, axes, needle) -> None:
    path = _write(tmp_path, {"name": "bad", "recipe": "tiny_vlm_cpu", "axes": axes,
                             "overrides": ["train.steps=20"]})
    with pytest.raises(ValueError) as err:
        load_sweep(path)
    assert needle in str(err.value)


def test_smoke_sweep_runs_both_arms(tmp_path) -> None:
    """The shipped sweep's smoke section, in one process (--in-process), through the example
    script (examples/scaling_sweep.sh, SMOKE=1): both arms train, the late arm sees text only,
    then resumes on the vision mix with a fresh data stream."""
    # No rendezvous variables from this process's own world (tests before may have set them).
    env = {**trainer_env(), "PYTHON": sys.executable, "SMOKE": "1", "SWEEP": str(SWEEP),
           "OUT": str(tmp_path)}
    proc = subprocess.run(["bash", str(REPO / "examples" / "scaling_sweep.sh")],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
                          check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = {r["fusion"]: r for r in json.loads((tmp_path / "table.json").read_text())}
    assert set(rows) == {"early10", "late50"}
    assert all(r["steps"] == 5 and r["compute"] > r["llm_flops"] > 0 for r in rows.values())
    # The realised vision share per phase: none on text, some after the switch.
    late_row = rows["late50"]
    assert late_row["vision_fraction/phase0"] == 0.0
    assert late_row["vision_fraction/phase1"] > late_row["vision_fraction"] > 0.0
    assert "vision_fraction/phase0" not in rows["early10"]  # one phase: the run's share only
    assert (tmp_path / "early_fusion_tiny.png").stat().st_size > 10_000
    late = next(tmp_path.glob("fusion=late50*"))
    records = [json.loads(line) for line in (late / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["split"] == "train"]
    assert [r["step"] for r in train] == [1, 2, 3, 4, 5]
    text_phase, vision_phase = train[2], train[4]
    assert text_phase["data/vision_token_fraction"] == 0.0
    assert vision_phase["data/vision_token_fraction"] > 0.0
    assert "data stream started afresh" in (late / "phase1.log").read_text()
    # One learning-rate schedule across both phases: the resumed phase continues it.
    assert train[3]["lr"] < train[2]["lr"]
    early = next(tmp_path.glob("fusion=early10*"))
    early_train = [json.loads(line) for line in (early / "metrics.jsonl").read_text().splitlines()]
    assert all(r["data/vision_token_fraction"] > 0.0 for r in early_train
               if r["split"] == "train")
