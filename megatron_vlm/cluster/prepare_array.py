"""SLURM job array for data preparation: N tasks ``prepare_data --shard i/N``, then one merge.

:func:`render_prepare_scripts` returns two batch scripts; :func:`submit_prepare` submits the
array, then the merge with ``--dependency=afterok:<array job id>`` (it starts only when every
task succeeded). Each task is one process on one node with ``--cpus-per-task`` CPUs; the tool's
``--workers`` default is the CPUs it is given (``os.sched_getaffinity``), so a task uses its
allocation without being told. A task that fails can be re-run alone (``sbatch --array=7
<array script>``): slices already done return at once. ``--requeue`` is set: a preempted task
starts again and redoes only its own slice.

Everything user-supplied is shell-quoted; the scripts pass ``bash -n`` and are tested by running
them with stand-in ``srun``/``sbatch`` (``tests/cluster/test_prepare_array.py``).
"""

from __future__ import annotations

import argparse
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from megatron_vlm.cluster.slurm import _NAME, _q, time_limit_seconds


@dataclass(kw_only=True)
class PrepareArrayJob:
    """A sliced preparation: an array of ``num_tasks`` slices and a merge job."""

    name: str
    """Dataset name (job names are ``prep-<name>`` and ``merge-<name>``)."""
    prepare_args: list[str]
    """``tools/prepare_data.py`` arguments of the dataset (``--name ... --out ... --train ...``),
    absolute paths; each task adds ``--shard $SLURM_ARRAY_TASK_ID/<num_tasks>``."""
    out_dir: str
    """The dataset directory (``--out``), merged by the second job."""
    num_tasks: int
    """Slices = array tasks."""
    array_parallel: int | None = None
    """At most this many tasks at once (``--array=0-N%P``); None = no limit."""
    cpus_per_task: int = 16
    """CPUs of each task (its ``--workers``)."""
    mem: str | None = None
    """``--mem`` per task (e.g. ``32G``); None = the partition's default."""
    time: str = "04:00:00"
    """Wall-clock limit of each task and of the merge, ``[D-]HH:MM:SS``."""
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    container_image: str | None = None
    """pyxis/enroot image (``srun --container-image``); exclusive with ``venv``."""
    container_mounts: list[str] = field(default_factory=list)
    """``SRC:DST`` mounts: inputs, media and ``out_dir`` must be visible inside."""
    container_workdir: str = "/workspace/megatron_vlm"
    venv: str | None = None
    """A virtual environment to activate on the nodes."""
    system_python: bool = False
    """Run the nodes' own ``python`` (neither container nor venv)."""
    workdir: str | None = None
    """Repository checkout to ``cd`` into (outside a container); None = the submit directory."""
    log_dir: str | None = None
    """SLURM output files; None = ``<out_dir>/.slurm``."""
    python: str = "python"
    """Interpreter on the nodes (tests put this one here)."""

    def __post_init__(self) -> None:
        if not _NAME.match(self.name):
            raise ValueError(f"name={self.name!r}: letters, digits, '_', '.', '-' only")
        if self.num_tasks < 1:
            raise ValueError(f"num_tasks={self.num_tasks} (--slurm-array) must be >= 1")
        if self.array_parallel is not None and self.array_parallel < 1:
            raise ValueError(f"array_parallel={self.array_parallel} must be >= 1")
        if self.cpus_per_task < 1:
            raise ValueError(f"cpus_per_task={self.cpus_per_task} must be >= 1")
        time_limit_seconds(self.time)
        if sum(map(bool, (self.container_image, self.venv, self.system_python))) != 1:
            raise ValueError("choose one environment for the tasks: --container-image, --venv "
                             "or --system-python")
        if self.container_mounts and not self.container_image:
            raise ValueError("container_mounts need container_image")
        if any(a.startswith("--shard") for a in self.prepare_args):
            raise ValueError("prepare_args must not hold --shard: each task adds its own")

    @property
    def log_root(self) -> str:
        return self.log_dir or str(Path(self.out_dir) / ".slurm")


def slice_task_args(prepare_args: list[str]) -> tuple[str, str, list[str]]:
    """``(name, out_dir, args)`` of ``tools/prepare_data.py`` arguments for the array's tasks.

    The paths (``--out``, ``--train``, ``--val``, ``--media-root``) become absolute (the tasks
    run elsewhere); other arguments pass through verbatim.

    Raises:
        ValueError: No ``--name``/``--out``/``--train``, or an argument that is the array's own.
    """
    p = argparse.ArgumentParser(prog="prepare_data arguments", add_help=False)
    p.add_argument("--name")
    p.add_argument("--out")
    p.add_argument("--train", nargs="+", default=[])
    p.add_argument("--val", nargs="+", default=[])
    p.add_argument("--media-root")
    known, rest = p.parse_known_args(prepare_args)
    if not (known.name and known.out and known.train):
        raise ValueError("the preparation needs --name NAME --out DIR --train INPUT... "
                         "(tools/prepare_data.py arguments)")
    own = [a for a in rest if a.split("=")[0] in ("--shard", "--merge", "--slurm-array",
                                                    "--workers", "--bundled", "--verify")]
    if own:
        raise ValueError(f"{own[0]} is set by the array itself; remove it")
    out = str(Path(known.out).absolute())
    args = ["--name", known.name, "--out", out]
    for flag, paths in (("--train", known.train), ("--val", known.val)):
        if paths:
            args += [flag, *(str(Path(x).absolute()) for x in paths)]
    if known.media_root:
        args += ["--media-root", str(Path(known.media_root).absolute())]
    return known.name, out, args + rest


def _header(job: PrepareArrayJob, name: str, log_name: str, cpus: int) -> list[str]:
    lines = [
        "#!/bin/bash",
        f"#SBATCH --job-name={name}",
        "#SBATCH --nodes=1",
        "#SBATCH --ntasks=1",
        f"#SBATCH --cpus-per-task={cpus}",
        f"#SBATCH --time={job.time}",
        f"#SBATCH --output={_q(str(Path(job.log_root) / log_name))}",
        "#SBATCH --open-mode=append",
        "#SBATCH --requeue",
    ]
    if job.mem:
        lines.append(f"#SBATCH --mem={_q(job.mem)}")
    for opt, value in (("partition", job.partition), ("account", job.account),
                       ("qos", job.qos)):
        if value:
            lines.append(f"#SBATCH --{opt}={_q(value)}")
    return lines


def _body(job: PrepareArrayJob, cpus: int, tool_args: str) -> list[str]:
    lines = ["", "# Rendered by tools/prepare_data.py --slurm-array "
             "(megatron_vlm.cluster.prepare_array).", "set -euo pipefail"]
    if job.venv:
        lines.append(f"source {_q(str(Path(job.venv) / 'bin' / 'activate'))}")
    if job.workdir and not job.container_image:
        lines.append(f"cd {_q(job.workdir)}")
    lines += ["export OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1", ""]
    srun = ["srun", "--ntasks=1", f'--cpus-per-task="${{SLURM_CPUS_PER_TASK:-{cpus}}}"']
    if job.container_image:
        srun.append(f"--container-image={_q(job.container_image)}")
        if job.container_mounts:
            srun.append(f"--container-mounts={_q(','.join(job.container_mounts))}")
        srun += [f"--container-workdir={_q(job.container_workdir)}", "--no-container-mount-home"]
    lines.append(" \\\n    ".join([*srun, f"{_q(job.python)} tools/prepare_data.py {tool_args}"]))
    return lines + [""]


def render_prepare_scripts(job: PrepareArrayJob) -> tuple[str, str]:
    """(array script, merge script) of ``job`` (see the module docstring)."""
    throttle = f"%{job.array_parallel}" if job.array_parallel else ""
    array = _header(job, f"prep-{job.name}", "%x-%A_%a.out", job.cpus_per_task)
    array.append(f"#SBATCH --array=0-{job.num_tasks - 1}{throttle}")
    task = (" ".join(map(_q, job.prepare_args))
            + f' --shard "${{SLURM_ARRAY_TASK_ID:?an array task (sbatch --array)}}/'
            f'{job.num_tasks}" --no-progress')
    array += _body(job, job.cpus_per_task, task)
    merge = _header(job, f"merge-{job.name}", "%x-%j.out", job.cpus_per_task)
    merge += _body(job, job.cpus_per_task, f"--merge {_q(job.out_dir)}")
    return "\n".join(array), "\n".join(merge)


def sbatch_submit(path: Path, *extra: str) -> str:
    """``sbatch --parsable [extra] path``; returns the job id (also used by convert's arrays)."""
    try:
        proc = subprocess.run(["sbatch", "--parsable", *extra, str(path)], capture_output=True,
                              text=True, check=False)
    except FileNotFoundError as e:
        raise RuntimeError("sbatch not found: run on a SLURM login node, or use --dry-run") from e
    if proc.returncode != 0:
        raise RuntimeError(f"sbatch refused {path}: {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout.strip().split(";")[0]


def submit_prepare(job: PrepareArrayJob, array: str,
                   merge: str) -> tuple[tuple[Path, str], tuple[Path, str]]:
    """Write both scripts under ``log_root`` and submit: the array, then the merge after it.

    Returns ``((array script, array job id), (merge script, merge job id))``.

    Raises:
        RuntimeError: sbatch missing or refusing a script.
    """
    root = Path(job.log_root)
    root.mkdir(parents=True, exist_ok=True)  # --output's directory must exist at submission
    array_path, merge_path = root / f"prep-{job.name}.sbatch", root / f"merge-{job.name}.sbatch"
    array_path.write_text(array)
    merge_path.write_text(merge)
    array_id = sbatch_submit(array_path)
    merge_id = sbatch_submit(merge_path, f"--dependency=afterok:{array_id}",
                             "--kill-on-invalid-dep=yes")
    return (array_path, array_id), (merge_path, merge_id)


def launch_prepare_array(job: PrepareArrayJob, dry_run: bool) -> str:
    """Both scripts (``dry_run``) or, after submitting them, what was submitted: the text for
    the command line to print.

    Raises:
        RuntimeError: sbatch missing or refusing a script.
    """
    array, merge = render_prepare_scripts(job)
    if dry_run:
        return (f"# ---- array job ({job.num_tasks} tasks)\n{array}# ---- merge job "
                f"(sbatch --dependency=afterok:<array job id>)\n{merge}")
    (array_path, array_id), (merge_path, merge_id) = submit_prepare(job, array, merge)
    return (f"submitted array job {array_id} ({array_path}) and merge job {merge_id} "
            f"({merge_path}, after the array succeeds); logs in {job.log_root}\n")
