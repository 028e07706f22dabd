"""SLURM launch: rendered batch scripts for 1, 2 and 64 nodes, job arrays, submission, and the
script run for real on this machine with stand-ins for ``srun``/``scontrol``/``sbatch`` on PATH
(``slurm_stand_ins.py``).

The stand-in ``srun`` drops srun's own options and runs the task command line (``python -m
torch.distributed.run ... -m megatron_vlm.train ...``) right here. So the preemption path runs
end to end: SIGUSR1 to the batch shell -> the stop file -> the trainer saves and exits ->
torchrun exits -> the script requeues; the same script run again resumes and finishes.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from slurm_stand_ins import slurm_env as _env
from tiny_runs import train_steps

from megatron_vlm.checkpoint import verify_checkpoint
from megatron_vlm.cluster import SlurmJob, render_sbatch
from megatron_vlm.cluster.launch import main as launch_main
from megatron_vlm.parallel.init import free_port

REPO = Path(__file__).resolve().parents[2]


def _job(tmp_path: Path, **kw) -> SlurmJob:
    defaults = {"job_name": "tiny", "train_args": ["--recipe", "tiny_text_cpu", "train.steps=20"],
                "run_dir": str(tmp_path / "run"), "gpus_per_node": 8, "time": "01:00:00",
                "system_python": not (kw.get("venv") or kw.get("container_image"))}
    return SlurmJob(**{**defaults, **kw})


@pytest.mark.parametrize("nodes", [1, 2, 64])
def test_rendered_script_parses_and_runs_the_right_torchrun(tmp_path, fake_slurm, nodes):
    job = _job(tmp_path, nodes=nodes, partition="batch", account="proj",
               container_image="nvcr.io#nvidia/pytorch:25.10-py3",
               container_mounts=["/lustre:/lustre"], env={"NCCL_SOCKET_IFNAME": "ib0"})
    script = tmp_path / "job.sbatch"
    script.write_text(render_sbatch(job))
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    for line in (f"#SBATCH --nodes={nodes}", "#SBATCH --gpus-per-node=8", "#SBATCH --requeue",
                 "#SBATCH --cpus-per-task=64", "#SBATCH --signal=B:USR1@300",
                 "#SBATCH --partition=batch", "#SBATCH --account=proj", "#SBATCH --exclusive",
                 "trap on_time_limit USR1", 'scontrol requeue "${SLURM_JOB_ID}"'):
        assert line in text, line
    assert "scancel" not in text  # nothing signals torchrun (see test_stop_file.py)

    # Run it (the stand-in srun only records the task command line here).
    hosts = [f"gpu-{i:03d}" for i in range(1, nodes + 1)]
    env = _env(fake_slurm, SLURM_JOB_ID="123456", SLURM_NNODES=str(nodes), FAKE_SRUN_PRINT="1",
               SLURM_JOB_NODELIST=f"gpu-[001-{nodes:03d}]", FAKE_HOSTS=" ".join(hosts),
               SLURM_CPUS_PER_TASK="64")
    proc = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True,
                          timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    task = (fake_slurm / "srun_task").read_text().splitlines()
    port = 20000 + 123456 % 20000
    assert task[:3] == ["python", "-m", "torch.distributed.run"]
    assert f"--nnodes={nodes}" in task and "--nproc-per-node=8" in task
    assert "--rdzv-backend=c10d" in task and "--rdzv-id=123456" in task
    assert f"--rdzv-endpoint=gpu-001:{port}" in task  # first node of the list hosts the store
    train = task[task.index("megatron_vlm.train") + 1:]
    args = ["--recipe", "tiny_text_cpu", "train.steps=20", f"train.output_dir={tmp_path / 'run'}",
            f"checkpoint.dir={tmp_path / 'run' / 'checkpoints'}"]
    assert train == [*args, "--resume=auto"]  # a first start: a checkpoint if there is one
    options = (fake_slurm / "srun_options").read_text().splitlines()
    assert f"--nodes={nodes}" in options and "--ntasks-per-node=1" in options
    assert "--cpus-per-task=64" in options  # srun does not inherit it on every SLURM version
    assert "--container-image=nvcr.io#nvidia/pytorch:25.10-py3" in options
    assert "--container-mounts=/lustre:/lustre" in options
    assert not (fake_slurm / "requeued").exists()  # no signal, no requeue

    # The requeued job must continue from a checkpoint, never silently from step 0.
    proc = subprocess.run(["bash", str(script)], env={**env, "SLURM_RESTART_COUNT": "1"},
                          capture_output=True, text=True, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    task = (fake_slurm / "srun_task").read_text().splitlines()
    assert task[task.index("megatron_vlm.train") + 1:] == [*args, "--resume=require"]


def test_job_array_runs_line_i_in_task_i(tmp_path, fake_slurm, capsys):
    lines = ["--recipe tiny_text_cpu optim.lr=1e-3 train.steps=100",
             "",
             "# a comment",
             (f"--recipe tiny_text_cpu optim.lr=3e-3 train.steps=100 "
              f"train.output_dir={tmp_path / 'custom'}"),
             "--recipe tiny_cpu 'optim.lr=1e-2' train.steps=50"]
    sweep = tmp_path / "sweep.txt"
    sweep.write_text("\n".join(lines) + "\n")
    assert launch_main(["--array-file", str(sweep), "--gpus-per-node", "1", "--array-parallel",
                        "2", "--run-dir", str(tmp_path / "sweep"), "--venv", sys.prefix,
                        "--dry-run"]) == 0
    script = tmp_path / "sweep.sbatch"
    script.write_text(capsys.readouterr().out)
    subprocess.run(["bash", "-n", str(script)], check=True)
    assert "#SBATCH --array=0-2%2" in script.read_text()
    assert "--exclusive" not in script.read_text()  # sweep tasks share nodes by default
    assert "%x-%A_%a.out" in script.read_text()
    assert "#SBATCH --cpus-per-task=8" in script.read_text()  # 8 per GPU
    expected = {
        0: ["--recipe", "tiny_text_cpu", "optim.lr=1e-3", "train.steps=100",
            f"train.output_dir={tmp_path / 'sweep' / 'task_0'}"],
        1: ["--recipe", "tiny_text_cpu", "optim.lr=3e-3", "train.steps=100",
            f"train.output_dir={tmp_path / 'custom'}"],
        2: ["--recipe", "tiny_cpu", "optim.lr=1e-2", "train.steps=50",
            f"train.output_dir={tmp_path / 'sweep' / 'task_2'}"],
    }
    for task, args in expected.items():
        env = _env(fake_slurm, SLURM_JOB_ID=str(900 + task), SLURM_ARRAY_TASK_ID=str(task),
                   SLURM_NNODES="1", SLURM_JOB_NODELIST="localhost", FAKE_SRUN_PRINT="1")
        proc = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True,
                              timeout=60, check=False)
        assert proc.returncode == 0, proc.stderr
        got = (fake_slurm / "srun_task").read_text().splitlines()
        assert got[got.index("megatron_vlm.train") + 1:] == [*args, "--resume=auto"], task
    env = _env(fake_slurm, SLURM_JOB_ID="1", SLURM_ARRAY_TASK_ID="3", SLURM_NNODES="1",
               SLURM_JOB_NODELIST="localhost", FAKE_SRUN_PRINT="1")
    proc = subprocess.run(["bash", str(script)], env=env, capture_output=True, text=True,
                          check=False)
    assert proc.returncode == 2 and "no run for array task 3" in proc.stderr


@pytest.mark.parametrize("argv, message", [
    (["--recipe", "no_such_recipe"], "no_such_recipe"),
    (["--recipe", "tiny_text_cpu", "optim.nope=1"], "nope"),
    (["--recipe", "tiny_text_cpu", "--time", "4h"], "[D-]HH:MM:SS"),
    (["--recipe", "tiny_text_cpu", "--time", "00:04:00"], "signal_lead_s=300"),
    (["--recipe", "tiny_text_cpu", "--nodes", "0"], "nodes=0"),
    (["--recipe", "tiny_text_cpu", "--env", "NCCL_DEBUG"], "KEY=VALUE"),
])
def test_bad_requests_are_refused_before_anything_is_queued(argv, message, capsys):
    assert launch_main([*argv, "--system-python", "--dry-run"]) == 2
    assert message in capsys.readouterr().err


def test_bad_array_line_names_the_run(tmp_path, capsys):
    sweep = tmp_path / "sweep.txt"
    sweep.write_text("--recipe tiny_text_cpu\n--recipe tiny_text_cpu train.stepz=3\n")
    assert launch_main(["--array-file", str(sweep), "--system-python", "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert f"{sweep} run 1" in err and "stepz" in err


def test_submit_writes_the_script_and_calls_sbatch(tmp_path, fake_slurm, capsys, monkeypatch):
    monkeypatch.setenv("PATH", f"{fake_slurm / 'bin'}:{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_SLURM", str(fake_slurm))
    argv = ["--recipe", "tiny_text_cpu", "--nodes", "2", "--gpus-per-node", "4", "--run-dir",
            str(tmp_path / "r" / "new"), "--system-python", "train.steps=30"]
    assert launch_main([*argv, "--dry-run"]) == 0
    dry = capsys.readouterr().out
    assert not (tmp_path / "r").exists()  # a dry run creates nothing
    assert launch_main(argv) == 0
    assert "submitted job 777" in capsys.readouterr().out
    (call,) = (fake_slurm / "sbatch_calls").read_text().splitlines()
    assert call.startswith("--parsable ") and call.endswith(".sbatch")
    assert Path(call.split()[1]).parent == tmp_path / "r" / "new" / "slurm"
    assert (fake_slurm / "submitted.sbatch").read_text() == dry
    # SLURM opens --output before the script runs: its directory existed when sbatch ran.
    assert (fake_slurm / "output_dir_at_submit").read_text().strip() == "exists"


def test_preempted_job_checkpoints_requeues_and_the_rerun_resumes(tmp_path, fake_slurm):
    """The batch script on this machine: 1 node x 1 process, tiny recipe, async checkpoints."""
    run_dir, steps = tmp_path / "run", 20
    job = _job(tmp_path, gpus_per_node=1, venv=sys.prefix, workdir=str(REPO), train_args=[
        "--recipe", "tiny_text_cpu", f"train.steps={steps}", "optim.warmup_steps=1",
        "train.eval_interval=0", "train.log_interval=1", "train.tensorboard=false",
        "train.plot=false", "checkpoint.save_interval=2", "checkpoint.async_save=true"])
    script = tmp_path / "job.sbatch"
    script.write_text(render_sbatch(job))
    env = _env(fake_slurm, SLURM_JOB_ID="4242", SLURM_NNODES="1",
               SLURM_JOB_NODELIST="localhost", MASTER_PORT=str(free_port()))

    first = subprocess.Popen(["bash", str(script)], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while len(train_steps(run_dir)) < 3 and first.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert first.poll() is None, first.communicate()[1][-4000:]
    first.send_signal(signal.SIGUSR1)  # what --signal=B:USR1@300 does before the time limit
    out, err = first.communicate(timeout=300)
    assert first.returncode == 0, out[-3000:] + err[-3000:]
    stop = max(train_steps(run_dir))
    assert stop < steps and f"stopping at step {stop} (signal)" in out
    assert "SIGUSR1: time limit" in out and "requeueing job 4242" in out
    assert (fake_slurm / "requeued").read_text().split() == ["4242"]
    assert not (fake_slurm / "scancel").exists()  # the stop file asked, no signal
    assert not (run_dir / "STOP-4242").exists()  # removed once the trainers exited
    ckpts = run_dir / "checkpoints"
    names = sorted(p.name for p in ckpts.iterdir())
    assert names[-1] == f"step_{stop:07d}" and not [n for n in names if n.startswith(".")]
    verify_checkpoint(ckpts / names[-1], full=True)

    # The requeued job: same script, SLURM counts the restart.
    again = subprocess.run(["bash", str(script)], env={**env, "SLURM_RESTART_COUNT": "1"},
                           capture_output=True, text=True, timeout=300, check=False)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert f"resumed from {ckpts / names[-1]} at step {stop}" in again.stdout
    assert "training exited with 0" in again.stdout
    assert train_steps(run_dir)[-(steps - stop):] == list(range(stop + 1, steps + 1))
    assert verify_checkpoint(ckpts / f"step_{steps:07d}")["step"] == steps
    assert (fake_slurm / "requeued").read_text().split() == ["4242"]  # finished: no requeue
