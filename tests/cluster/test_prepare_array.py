"""Sliced data preparation as a SLURM array (issue 17 item 2): ``prepare_data --slurm-array N``
submits an array of N tasks (``--shard $SLURM_ARRAY_TASK_ID/N``) and a merge job that waits for
it (``--dependency=afterok:<array id>``); the submitted scripts pass ``bash -n`` and, run here with
the stand-in ``srun`` (``slurm_stand_ins.py``), produce the dataset one process produces."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from slurm_stand_ins import slurm_env
from tiny_runs import load_tool

from megatron_vlm.cluster.prepare_array import PrepareArrayJob
from megatron_vlm.data.prepare import prepare_dataset

REPO = Path(__file__).resolve().parents[2]


def _tool():
    return load_tool("prepare_data")


def _files(out: Path) -> dict[str, bytes]:
    names = [*sorted(out.glob("*/shard_*.tar")), out / "mm_dataset.json", out / "rejects.jsonl",
             out / ".nv-meta/split.yaml"]
    return {str(p.relative_to(out)): p.read_bytes() for p in names}


def test_prepare_array_submits_runs_and_merges(tmp_path, fake_slurm, monkeypatch, capsys):
    train, val = tmp_path / "web.jsonl", tmp_path / "web_val.txt"
    records = [{"id": f"d{i}", "text": f"document {i}."} for i in range(7)]
    records.insert(5, {"id": "d1", "text": "a duplicate id, in the other slice"})
    train.write_text("".join(json.dumps(r) + "\n" for r in records) + "{broken\n")
    val.write_text("held out.\n")
    out = tmp_path / "prepared" / "web"
    monkeypatch.chdir(REPO)  # the scripts cd to the submit directory (the checkout)
    monkeypatch.setenv("PATH", f"{fake_slurm / 'bin'}:{__import__('os').environ['PATH']}")
    monkeypatch.setenv("FAKE_SLURM", str(fake_slurm))
    argv = ["--name", "web", "--train", str(train), "--val", str(val), "--out", str(out),
            "--samples-per-shard", "2", "--slurm-array", "2", "--cpus-per-task", "4",
            "--partition", "cpu", "--array-parallel", "8", "--time", "02:00:00",
            "--venv", sys.prefix]
    tool = _tool()
    assert tool.main(argv) == 0
    assert "submitted array job 777" in capsys.readouterr().out
    calls = (fake_slurm / "sbatch_calls").read_text().splitlines()
    array, merge = out / ".slurm/prep-web.sbatch", out / ".slurm/merge-web.sbatch"
    assert calls == [f"--parsable {array}",
                     f"--parsable --dependency=afterok:777 --kill-on-invalid-dep=yes {merge}"]
    for script in (array, merge):
        subprocess.run(["bash", "-n", str(script)], check=True)
    text = array.read_text()
    for line in ("#SBATCH --array=0-1%8", "#SBATCH --cpus-per-task=4", "#SBATCH --partition=cpu",
                 "#SBATCH --time=02:00:00", "#SBATCH --requeue", '--shard "${SLURM_ARRAY_TASK_ID'):
        assert line in text, line
    assert "--workers" not in text  # a task uses the CPUs SLURM gives it (sched_getaffinity)

    # Run the tasks (any order) and then the merge, for real, through the stand-in srun.
    for task in (1, 0):
        env = slurm_env(fake_slurm, SLURM_ARRAY_TASK_ID=str(task), SLURM_CPUS_PER_TASK="1")
        proc = subprocess.run(["bash", str(array)], env=env, capture_output=True, text=True,
                              timeout=120, check=False)
        assert proc.returncode == 0, proc.stderr
        assert f"slice {task}/2" in proc.stdout
    assert "--cpus-per-task=1" in (fake_slurm / "srun_options").read_text().splitlines()
    proc = subprocess.run(["bash", str(merge)], env=slurm_env(fake_slurm), capture_output=True,
                          text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert "rejected 2" in proc.stdout  # the broken line and the duplicate id

    one = tmp_path / "one"
    prepare_dataset({"train": [train], "val": [val]}, one, name="web", samples_per_shard=2,
                    progress=False, verbose=False, workers=1)
    assert _files(out) == _files(one)


@pytest.mark.parametrize("kw, message", [
    ({"num_tasks": 0}, "num_tasks=0"),
    ({"venv": None}, "choose one environment"),
    ({"prepare_args": ["--name", "x", "--shard", "0/2"]}, "must not hold --shard"),
    ({"time": "2h"}, "[D-]HH:MM:SS"),
])
def test_bad_prepare_arrays_are_refused(kw, message):
    base = {"name": "x", "prepare_args": ["--name", "x"], "out_dir": "/tmp/x", "num_tasks": 2,
            "venv": "/venv"}
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        PrepareArrayJob(**{**base, **kw})


def test_launcher_renders_the_same_preparation_array(tmp_path, capsys, monkeypatch):
    """tools/launch.py --prepare-slices N -- <prepare_data arguments> (relative paths made
    absolute) renders the array and merge scripts prepare_data --slurm-array renders."""
    from megatron_vlm.cluster.launch import main as launch_main

    monkeypatch.chdir(tmp_path)
    (tmp_path / "in.jsonl").write_text('{"id": "a", "text": "x."}\n')
    opts = ["--cpus-per-task", "8", "--partition", "cpu", "--venv", sys.prefix, "--dry-run"]
    data = ["--name", "web", "--train", "in.jsonl", "--out", "prepared/web",
            "--samples-per-shard", "500"]
    assert launch_main(["--prepare-slices", "3", *opts, "--", *data]) == 0
    launched = capsys.readouterr().out
    assert _tool().main([*data, "--slurm-array", "3", *opts]) == 0
    assert capsys.readouterr().out == launched
    array, merge = (part.split("\n", 1)[1] for part in launched.split("# ---- ")[1:])
    for script in (array, merge):
        assert script.startswith("#!/bin/bash\n")
        path = tmp_path / "s.sbatch"
        path.write_text(script)
        subprocess.run(["bash", "-n", str(path)], check=True)
    assert "#SBATCH --array=0-2" in array and "#SBATCH --cpus-per-task=8" in array
    assert f"--train {tmp_path / 'in.jsonl'}" in array  # absolute: tasks run elsewhere
    assert '--shard "${SLURM_ARRAY_TASK_ID:?an array task (sbatch --array)}/3"' in array
    assert f"--merge {tmp_path / 'prepared/web'}" in merge
    assert launch_main(["--prepare-slices", "3", *opts, "--", "--name", "web"]) == 2
    assert "needs --name NAME --out DIR --train" in capsys.readouterr().err
    assert launch_main(["--prepare-slices", "3", *opts, "--", *data, "--shard", "0/3"]) == 2
    assert "--shard is set by the array itself" in capsys.readouterr().err
