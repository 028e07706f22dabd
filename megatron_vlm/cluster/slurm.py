"""SLURM batch scripts for training runs: ``srun`` + ``torchrun`` (c10d), preemption, requeue.

:func:`render_sbatch` turns a :class:`SlurmJob` into one self-contained batch script;
:func:`submit` writes it next to the logs and hands it to ``sbatch``. The script:

* ``#SBATCH`` header: nodes, one task (one ``torchrun``) per node with ``--cpus-per-task`` CPUs
  (its ranks and their data-loader workers; ``srun`` is given the same count, which it does not
  inherit on every SLURM version), GPUs per node, time, partition/account/QoS, ``--requeue``,
  ``--open-mode=append`` (a requeued job appends to the same log), ``--signal=B:USR1@<lead>``
  and, for sweeps, ``--array=0-(N-1)``. SLURM opens ``--output`` before the script runs, so its
  directory must exist at submission: :func:`submit` creates it.
* Rendezvous: ``MASTER_ADDR`` is the first host of ``SLURM_JOB_NODELIST`` (``scontrol show
  hostnames``), ``MASTER_PORT`` is derived from the job id (two jobs sharing a node do not
  collide) unless set; ``torchrun --rdzv-backend=c10d --rdzv-id=$SLURM_JOB_ID``, so node ranks
  are assigned by the rendezvous and one command line serves every node.
* Environment: NCCL/torch settings for megatron on H100 nodes (see ``DEFAULT_ENV``; one OpenMP
  thread per rank) plus the caller's; a container through pyxis/enroot (``srun
  --container-image``), a venv, or -- only when asked (``system_python``) -- the nodes' own
  ``python``.
* Preemption: SLURM sends SIGUSR1 to the batch shell ``<lead>`` seconds before the time limit
  (``B:``: the shell only -- an unhandled USR1 would kill ``torchrun``). The trap creates the
  stop file ``<run_dir>/STOP-<job id>`` (exported to the trainers as ``MEGATRON_VLM_STOP_FILE``;
  a stale one is removed at start). Every trainer checks it each step
  (``megatron_vlm.training.state.StopSignal``, one ``stat``), the ranks agree on it, checkpoint
  and exit 0, ``torchrun`` exits by itself, and the script runs ``scontrol requeue``. No signal
  is sent to ``torchrun``: it would forward it and SIGKILL the trainers 30 s later (torch before
  pytorch#172596, e.g. the NGC 25.10 container's 2.9, ignores
  ``TORCH_ELASTIC_SHUTDOWN_TIMEOUT``), sooner than one K2.5 step plus a save. The same script
  starts again later; a restart (``SLURM_RESTART_COUNT > 0``) gives the trainer
  ``--resume=require`` (continue from the newest complete checkpoint or fail, never silently
  from step 0), a first start ``--resume=auto``. A SIGTERM to the batch shell (``scancel``, a
  preemption by another job) also creates the stop file and waits for the trainers to save;
  only the time-limit signal requeues, at most ``max_requeues`` times. ``touch``-ing the stop
  file by hand ends a run cleanly (checkpoint, no requeue).

Everything user-supplied is shell-quoted (``shlex.quote``); the rendered script passes
``bash -n`` and is tested by running it with a stand-in ``srun``.
"""

from __future__ import annotations

import re
import shlex
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

#: Environment for every run, before the caller's ``env`` (which wins).
DEFAULT_ENV: dict[str, str] = {
    # megatron-core: TP/SP communication overlap relies on kernels being issued in order on one
    # hardware queue (Megatron-LM refuses sequence parallelism without it).
    "CUDA_DEVICE_MAX_CONNECTIONS": "1",
    # A failed/hung NCCL collective aborts the process (and the job) instead of hanging forever.
    "TORCH_NCCL_ASYNC_ERROR_HANDLING": "1",
    "NCCL_DEBUG": "WARN",
    "PYTHONUNBUFFERED": "1",
    # One OpenMP thread per rank: data work happens in loader workers, not in OpenMP.
    "OMP_NUM_THREADS": "1",
}

_TIME = re.compile(r"^(?:(\d+)-)?(\d{1,3}):(\d{2}):(\d{2})$")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_ENV_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def time_limit_seconds(limit: str) -> int:
    """``[D-]HH:MM:SS`` as seconds; ValueError naming the format otherwise."""
    m = _TIME.match(limit)
    if not m or int(m.group(3)) >= 60 or int(m.group(4)) >= 60:
        raise ValueError(f"time={limit!r}: use [D-]HH:MM:SS, e.g. 04:00:00 or 2-00:00:00")
    days, hours, minutes, seconds = (int(g or 0) for g in m.groups())
    return ((days * 24 + hours) * 60 + minutes) * 60 + seconds


@dataclass(kw_only=True)
class SlurmJob:
    """One batch job: a single training run, or a job array with one run per task."""

    job_name: str
    """SLURM job name (``%x`` in log names)."""
    train_args: list[str] = field(default_factory=list)
    """Arguments of ``python -m megatron_vlm.train`` for a single run (``--recipe NAME k=v ...``);
    ``train.output_dir`` and ``checkpoint.dir`` are added from ``run_dir``/``checkpoint_dir``."""
    array_runs: list[list[str]] | None = None
    """Job array: the arguments of each task's run (task ``i`` runs ``array_runs[i]``). A run
    without ``train.output_dir=`` gets ``<run_dir>/task_<i>``."""
    array_parallel: int | None = None
    """At most this many array tasks at once (``--array=0-N%P``); None = no limit."""
    run_dir: str
    """Run directory (``train.output_dir``) of a single run; base directory of array tasks."""
    checkpoint_dir: str | None = None
    """Checkpoint root of a single run; None = ``<run_dir>/checkpoints``."""
    log_dir: str | None = None
    """Directory of the SLURM output files; None = ``<run_dir>/slurm``."""
    nodes: int = 1
    """Nodes (one ``torchrun`` each)."""
    gpus_per_node: int = 8
    """GPUs per node = ``torchrun --nproc-per-node``."""
    cpus_per_task: int | None = None
    """CPUs of each node's task (``--cpus-per-task``): its ``gpus_per_node`` ranks and their
    data-loader workers (one OpenMP thread each, ``DEFAULT_ENV``); None = 8 per GPU."""
    time: str = "04:00:00"
    """Wall-clock limit, ``[D-]HH:MM:SS``."""
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    exclusive: bool | None = None
    """Whole nodes (``--exclusive``); None = yes for a single run, no for an array (sweep
    tasks are often smaller than a node)."""
    container_image: str | None = None
    """pyxis/enroot image (``srun --container-image``), e.g. ``nvcr.io#nvidia/pytorch:25.10-py3``
    or a ``.sqsh`` file built from our Dockerfile. Exclusive with ``venv``."""
    container_mounts: list[str] = field(default_factory=list)
    """``SRC:DST`` mounts (data, run and checkpoint directories must be visible inside)."""
    container_workdir: str = "/workspace/megatron_vlm"
    """Working directory inside the container (the Dockerfile's WORKDIR)."""
    venv: str | None = None
    """A virtual environment to activate on the nodes (instead of a container)."""
    system_python: bool = False
    """Run the nodes' own ``python`` (neither container nor venv); refused unless set, since the
    nodes' python rarely has this package, and the trainers would fail only after the queue."""
    train_module: str = "megatron_vlm.train"
    """Module each rank runs (``torchrun -m``); tests put a stand-in trainer here."""
    workdir: str | None = None
    """Directory to ``cd`` into before ``srun`` (outside a container); None = the submit dir."""
    env: dict[str, str] = field(default_factory=dict)
    """Extra environment (e.g. ``NCCL_IB_HCA``, ``NCCL_SOCKET_IFNAME``); overrides DEFAULT_ENV."""
    master_port: int | None = None
    """Rendezvous port; None = 20000 + job id mod 20000 (an exported MASTER_PORT wins)."""
    signal_lead_s: int = 300
    """SIGUSR1 to the batch shell this many seconds before the time limit (save + exit)."""
    max_requeues: int = 20
    """Stop requeueing after this many restarts (``SLURM_RESTART_COUNT``)."""
    extra_sbatch: list[str] = field(default_factory=list)
    """More ``#SBATCH`` options verbatim, e.g. ``--constraint=h100`` or ``--mem=0``."""

    def __post_init__(self) -> None:
        if not _NAME.match(self.job_name):
            raise ValueError(f"job_name={self.job_name!r}: letters, digits, '_', '.', '-' only")
        if self.nodes < 1:
            raise ValueError(f"nodes={self.nodes} must be >= 1")
        if self.gpus_per_node < 1:
            raise ValueError(f"gpus_per_node={self.gpus_per_node} must be >= 1")
        limit = time_limit_seconds(self.time)
        if not 0 < self.signal_lead_s < limit:
            raise ValueError(f"signal_lead_s={self.signal_lead_s} must be in (0, {limit}) "
                             f"(the time limit {self.time}); lower it or raise time")
        if self.container_image and self.venv:
            raise ValueError("choose container_image or venv, not both")
        if self.container_mounts and not self.container_image:
            raise ValueError("container_mounts need container_image")
        if not (self.container_image or self.venv or self.system_python):
            raise ValueError("no environment for the trainers: set container_image (tools/launch"
                             ".py --container-image), venv (--venv) or, to run the nodes' own "
                             "python, system_python=True (--system-python)")
        if self.system_python and (self.container_image or self.venv):
            raise ValueError("system_python=True excludes container_image and venv")
        if self.cpus_per_task is not None and self.cpus_per_task < self.gpus_per_node:
            raise ValueError(f"cpus_per_task={self.cpus_per_task} is fewer than one CPU per rank "
                             f"(gpus_per_node={self.gpus_per_node}); raise it")
        if not re.match(r"^[A-Za-z_][A-Za-z0-9_.]*$", self.train_module):
            raise ValueError(f"train_module={self.train_module!r} is not a module name")
        if self.array_runs is not None:
            if not self.array_runs:
                raise ValueError("array_runs is empty: a job array needs at least one run")
            if self.train_args:
                raise ValueError("give train_args (one run) or array_runs (a sweep), not both")
            if self.array_parallel is not None and self.array_parallel < 1:
                raise ValueError(f"array_parallel={self.array_parallel} must be >= 1")
        elif not self.train_args:
            raise ValueError("train_args is empty: give at least --recipe NAME")
        for key in self.env:
            if not _ENV_KEY.match(key):
                raise ValueError(f"env key {key!r} is not a valid variable name")
        if self.master_port is not None and not 1024 <= self.master_port < 65536:
            raise ValueError(f"master_port={self.master_port} must be in [1024, 65536)")
        if self.max_requeues < 0:
            raise ValueError(f"max_requeues={self.max_requeues} must be >= 0")
        for opt in self.extra_sbatch:
            if not opt.startswith("--") or "\n" in opt:
                raise ValueError(f"extra_sbatch option {opt!r}: one '--name[=value]' per entry")

    @property
    def log_root(self) -> str:
        return self.log_dir or str(Path(self.run_dir) / "slurm")

    @property
    def cpus(self) -> int:
        """``--cpus-per-task`` (``cpus_per_task`` or 8 per GPU)."""
        return self.cpus_per_task if self.cpus_per_task is not None else 8 * self.gpus_per_node

    def runs(self) -> list[list[str]]:
        """The argument list of each run (one for a single job), without a resume flag: the
        script adds ``--resume=auto`` or ``--resume=require`` at run time (any ``--resume`` of
        the caller's is dropped)."""
        if self.array_runs is None:
            ckpt = self.checkpoint_dir or str(Path(self.run_dir) / "checkpoints")
            runs = [[*self.train_args, f"train.output_dir={self.run_dir}",
                     f"checkpoint.dir={ckpt}"]]
        else:
            runs = []
            for i, args in enumerate(self.array_runs):
                args = list(args)
                if not any(a.startswith("train.output_dir=") for a in args):
                    args.append(f"train.output_dir={Path(self.run_dir) / f'task_{i}'}")
                runs.append(args)
        return [[a for a in args if a != "--resume" and not a.startswith("--resume=")]
                for args in runs]


def _q(value: object) -> str:
    return shlex.quote(str(value))


def _header(job: SlurmJob) -> list[str]:
    log_name = "%x-%A_%a.out" if job.array_runs is not None else "%x-%j.out"
    lines = [
        "#!/bin/bash",
        f"#SBATCH --job-name={job.job_name}",
        f"#SBATCH --nodes={job.nodes}",
        "#SBATCH --ntasks-per-node=1",
        f"#SBATCH --gpus-per-node={job.gpus_per_node}",
        f"#SBATCH --cpus-per-task={job.cpus}",
        f"#SBATCH --time={job.time}",
        f"#SBATCH --output={_q(str(Path(job.log_root) / log_name))}",
        "#SBATCH --open-mode=append",
        "#SBATCH --requeue",
        f"#SBATCH --signal=B:USR1@{job.signal_lead_s}",
    ]
    for opt, value in (("partition", job.partition), ("account", job.account),
                       ("qos", job.qos)):
        if value:
            lines.append(f"#SBATCH --{opt}={_q(value)}")
    if job.exclusive or (job.exclusive is None and job.array_runs is None):
        lines.append("#SBATCH --exclusive")
    if job.array_runs is not None:
        throttle = f"%{job.array_parallel}" if job.array_parallel else ""
        lines.append(f"#SBATCH --array=0-{len(job.array_runs) - 1}{throttle}")
    lines += [f"#SBATCH {opt}" for opt in job.extra_sbatch]
    return lines


def _train_args_block(job: SlurmJob) -> list[str]:
    runs = job.runs()
    if job.array_runs is None:
        return [f"TRAIN_ARGS=({' '.join(map(_q, runs[0]))})"]
    lines = ['case "${SLURM_ARRAY_TASK_ID:?this script is a job array (sbatch --array)}" in']
    for i, args in enumerate(runs):
        lines.append(f"  {i}) TRAIN_ARGS=({' '.join(map(_q, args))}) ;;")
    lines += ['  *) echo "no run for array task ${SLURM_ARRAY_TASK_ID}" >&2; exit 2 ;;', "esac"]
    return lines


def _srun_command(job: SlurmJob) -> list[str]:
    """srun (one task per node: torchrun, not a shell, so the signals reach it) + torchrun."""
    srun = ["srun", "--nodes=${SLURM_NNODES}", "--ntasks-per-node=1",
            f'--cpus-per-task="${{SLURM_CPUS_PER_TASK:-{job.cpus}}}"', "--kill-on-bad-exit=1"]
    if job.container_image:
        srun.append(f"--container-image={_q(job.container_image)}")
        if job.container_mounts:
            srun.append(f"--container-mounts={_q(','.join(job.container_mounts))}")
        srun += [f"--container-workdir={_q(job.container_workdir)}", "--no-container-mount-home"]
    torchrun = [
        "python -m torch.distributed.run",
        '--nnodes="${SLURM_NNODES}"', f"--nproc-per-node={job.gpus_per_node}",
        "--rdzv-backend=c10d", '--rdzv-endpoint="${MASTER_ADDR}:${MASTER_PORT}"',
        '--rdzv-id="${SLURM_JOB_ID}"', "--max-restarts=0",
        f'-m {job.train_module} "${{TRAIN_ARGS[@]}}"',
    ]
    return srun + torchrun


def _stop_file_block(job: SlurmJob) -> list[str]:
    """The stop file and the signal traps that create it (see the module docstring)."""
    return [
        "# Preemption: USR1 (time limit near) -> the stop file; every trainer checks it each step,",
        "# checkpoints and exits; torchrun then exits by itself and this script requeues. No",
        "# signal goes to torchrun: it would SIGKILL the trainers 30 s after forwarding it.",
        "# SIGTERM to this shell: the stop file too, and wait for the save (no requeue).",
        f'STOP_FILE={_q(job.run_dir)}/"STOP-${{SLURM_JOB_ID}}"',
        'rm -f "${STOP_FILE}"  # a stale request must not stop this run',
        "export MEGATRON_VLM_STOP_FILE=${STOP_FILE}",
        "PREEMPTED=0",
        "on_time_limit() {",
        "  PREEMPTED=1",
        (f'  echo "[$(date -Is)] SIGUSR1: time limit in {job.signal_lead_s} s;'
         ' asking the trainers to checkpoint and stop (${STOP_FILE})"'),
        '  touch "${STOP_FILE}"',
        "}",
        "on_term() {",
        '  echo "[$(date -Is)] SIGTERM: asking the trainers to checkpoint and stop; waiting"',
        '  touch "${STOP_FILE}"',
        "}",
        "trap on_time_limit USR1",
        "trap on_term TERM",
    ]


def render_sbatch(job: SlurmJob) -> str:
    """The batch script for ``job`` (see the module docstring)."""
    # torchrun's grace between forwarding a signal and SIGKILL, for signals SLURM sends to every
    # process (scancel, preemption); honoured only by torch with pytorch#172596 (see above).
    env = {**DEFAULT_ENV, "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": str(job.signal_lead_s), **job.env}
    port = (f"{job.master_port}" if job.master_port is not None
            else "$((20000 + SLURM_JOB_ID % 20000))")
    dirs = [job.run_dir]
    if job.array_runs is None:
        dirs += [job.checkpoint_dir or str(Path(job.run_dir) / "checkpoints")]
    lines = _header(job) + [
        "",
        "# Rendered by tools/launch.py (megatron_vlm.cluster.slurm); safe to edit and resubmit.",
        f"# SLURM opens --output before this script runs: {job.log_root} must exist at sbatch",
        "# time (tools/launch.py creates it).",
        "set -uo pipefail",
        f"mkdir -p {' '.join(map(_q, dirs))}",
        "",
    ]
    if job.venv:
        lines += [f"source {_q(str(Path(job.venv) / 'bin' / 'activate'))}"]
    if job.workdir and not job.container_image:
        lines += [f"cd {_q(job.workdir)}"]
    lines += [f"export {k}={_q(v)}" for k, v in env.items()]
    lines += [
        "",
        "# Rendezvous: the first node hosts the c10d store.",
        'MASTER_ADDR=$(scontrol show hostnames "${SLURM_JOB_NODELIST}" | head -n 1)',
        f'MASTER_PORT=${{MASTER_PORT:-{port}}}',
        "export MASTER_ADDR MASTER_PORT",
        "",
        *_train_args_block(job),
        "# A restart must continue from a checkpoint: never silently from step 0.",
        ('if (( ${SLURM_RESTART_COUNT:-0} > 0 )); then RESUME=--resume=require; '
         'else RESUME=--resume=auto; fi'),
        'TRAIN_ARGS+=("${RESUME}")',
        "",
        *_stop_file_block(job),
        "",
        ('echo "[$(date -Is)] job ${SLURM_JOB_ID} restart ${SLURM_RESTART_COUNT:-0}:'
         ' ${SLURM_NNODES} node(s), rendezvous ${MASTER_ADDR}:${MASTER_PORT}"'),
        " \\\n    ".join(_srun_command(job)) + " &",
        "SRUN_PID=$!",
        "# wait returns early when a trapped signal arrives: keep waiting until srun is done,",
        "# then take its exit status (bash keeps it for a second wait).",
        'while kill -0 "${SRUN_PID}" 2>/dev/null; do wait "${SRUN_PID}"; done',
        'wait "${SRUN_PID}"',
        "RC=$?",
        'rm -f "${STOP_FILE}"',
        "",
        'if [[ "${PREEMPTED}" == 1 ]]; then',
        f'  if (( ${{SLURM_RESTART_COUNT:-0}} >= {job.max_requeues} )); then',
        f'    echo "not requeueing: {job.max_requeues} restarts already" >&2',
        "    exit 1",
        "  fi",
        '  echo "[$(date -Is)] trainers exited (${RC}); requeueing job ${SLURM_JOB_ID}"',
        '  scontrol requeue "${SLURM_JOB_ID}"',
        "  exit 0",
        "fi",
        'echo "[$(date -Is)] training exited with ${RC}"',
        'exit "${RC}"',
        "",
    ]
    return "\n".join(lines)


def read_array_file(path: Path) -> list[list[str]]:
    """The runs of a sweep: each non-empty line (``#`` comments skipped) is one run's
    ``python -m megatron_vlm.train`` arguments, split like a shell would (``shlex``)."""
    runs = []
    for num, line in enumerate(Path(path).read_text().splitlines(), 1):
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        try:
            runs.append(shlex.split(stripped))
        except ValueError as e:
            raise ValueError(f"{path}:{num}: cannot split {stripped!r}: {e}") from e
    if not runs:
        raise ValueError(f"{path}: no runs (every line is empty or a comment)")
    return runs


def submit(job: SlurmJob, script: str, stamp: str) -> tuple[Path, str]:
    """Write ``script`` to ``<log_dir>/<job_name>-<stamp>.sbatch`` and submit it.

    Returns the script path and the job id ``sbatch --parsable`` printed.

    Raises:
        RuntimeError: sbatch is missing or refused the script (its message included).
    """
    log_root = Path(job.log_root)
    log_root.mkdir(parents=True, exist_ok=True)  # --output's directory must exist at submit
    path = log_root / f"{job.job_name}-{stamp}.sbatch"
    path.write_text(script)
    try:
        proc = subprocess.run(["sbatch", "--parsable", str(path)], capture_output=True,
                              text=True, check=False)
    except FileNotFoundError as e:
        raise RuntimeError("sbatch not found: run on a SLURM login node, or use --dry-run") from e
    if proc.returncode != 0:
        raise RuntimeError(f"sbatch refused {path}: {proc.stderr.strip() or proc.stdout.strip()}")
    return path, proc.stdout.strip().split(";")[0]
