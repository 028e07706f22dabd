"""``tools/launch.py``: render (``--dry-run``) or submit a SLURM batch job for a recipe or a sweep.

Examples::

    # 128 nodes x 8 H100 (the 1,024 GPUs kimi_k25 is laid out for), NGC-based image
    # through pyxis; overrides after the options
    python tools/launch.py --recipe kimi_k25 --nodes 128 --gpus-per-node 8 --time 04:00:00 \\
        --partition batch --account myproj --container-image /lustre/images/megatron_vlm.sqsh \\
        --container-mounts /lustre:/lustre --run-dir /lustre/runs/k25 checkpoint.save_interval=250
    # a sweep as a job array: one line of train arguments per task
    python tools/launch.py --array-file sweep.txt --gpus-per-node 1 --venv /shared/venv \\
        --run-dir /lustre/sweep
    # print the script instead of submitting it
    python tools/launch.py --recipe tiny_cpu --gpus-per-node 4 --venv .venv --dry-run
    # data preparation: an array of 64 slices (prepare_data --shard i/64) and a merge job after
    # it; the arguments after -- are tools/prepare_data.py's (megatron_vlm/cluster/prepare_array.py)
    python tools/launch.py --prepare-slices 64 --cpus-per-task 16 --partition cpu \
        --venv /shared/venv -- --name laion --train /lustre/laion/pairs.jsonl \
        --media-root /lustre/laion --out /lustre/prepared/laion

Every run is checked before anything is queued: the recipe exists and the overrides apply
(the same code path as ``python -m megatron_vlm.train``), the world size suits its parallel
layout and the planner says it fits in GPU memory (``megatron_vlm/cluster/preflight.py``; a
refusal names the nearest node counts that work), and the trainers have an environment
(``--container-image``, ``--venv``, or ``--system-python`` for the nodes' own python).
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

from megatron_vlm.cluster.preflight import check_launch
from megatron_vlm.cluster.slurm import SlurmJob, read_array_file, render_sbatch, submit


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tools/launch.py", description="Render and submit a SLURM job for a training run.",
        epilog="Trailing KEY=VALUE arguments are train overrides (train.steps=1000 parallel.tp=8).")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--recipe", help="recipe name (one run)")
    what.add_argument("--array-file", type=Path,
                      help="a sweep: each non-empty line is one run's train arguments "
                           "(e.g. --recipe tiny_cpu optim.lr=1e-3 train.steps=100); task i runs "
                           "line i")
    what.add_argument("--prepare-slices", type=int, metavar="N",
                      help="data preparation as a job array of N slices plus a merge job; the "
                           "arguments after -- are tools/prepare_data.py's (--name --out "
                           "--train ...)")
    p.add_argument("--job-name", help="SLURM job name (default: the recipe, or 'sweep')")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=8)
    p.add_argument("--gpu-memory", type=float, default=80.0, metavar="GIB",
                   help="memory per GPU for the planner's fit check (default 80: H100)")
    p.add_argument("--cpus-per-task", type=int,
                   help="CPUs per node task: its ranks plus their data-loader workers "
                        "(default 8 per GPU)")
    p.add_argument("--time", default="04:00:00", help="[D-]HH:MM:SS (default 04:00:00)")
    p.add_argument("--partition")
    p.add_argument("--account")
    p.add_argument("--qos")
    p.add_argument("--exclusive", action=argparse.BooleanOptionalAction, default=None,
                   help="whole nodes (default: yes for one run, no for an array)")
    env = p.add_mutually_exclusive_group()
    env.add_argument("--container-image", help="pyxis/enroot image (srun --container-image)")
    env.add_argument("--venv", help="virtual environment to activate on the nodes")
    env.add_argument("--system-python", action="store_true",
                     help="run the nodes' own python (no container, no venv)")
    p.add_argument("--container-mounts", nargs="+", default=[], metavar="SRC:DST")
    p.add_argument("--container-workdir", default="/workspace/megatron_vlm")
    p.add_argument("--workdir", help="cd here on the nodes (no container; default: the submit "
                                     "directory)")
    p.add_argument("--run-dir", help="train.output_dir (arrays: base of task_<i>); "
                                     "default runs/<job name>")
    p.add_argument("--checkpoint-dir", help="checkpoint.dir (default <run dir>/checkpoints)")
    p.add_argument("--log-dir", help="SLURM output files (default <run dir>/slurm)")
    p.add_argument("--env", nargs="+", default=[], metavar="KEY=VALUE",
                   help="extra environment, e.g. NCCL_SOCKET_IFNAME=ib0")
    p.add_argument("--master-port", type=int, help="rendezvous port (default from the job id)")
    p.add_argument("--signal-lead", type=int, default=300, metavar="SECONDS",
                   help="checkpoint and requeue this long before the time limit (default 300)")
    p.add_argument("--max-requeues", type=int, default=20)
    p.add_argument("--array-parallel", type=int, help="at most N array tasks at once")
    p.add_argument("--sbatch", nargs="+", default=[], metavar="--OPT[=V]",
                   help="more #SBATCH options verbatim, e.g. --sbatch=--constraint=h100")
    p.add_argument("--dry-run", action="store_true", help="print the script, submit nothing")
    p.add_argument("overrides", nargs="*", help="train overrides for --recipe (section.key=value)")
    return p


def _check_run(args: list[str], where: str, ns: argparse.Namespace | None = None) -> str:
    """The run's job name; ValueError naming ``where`` if the train CLI would refuse it or (with
    the launch options ``ns``) its layout cannot use, or does not fit in, ``ns.nodes x
    ns.gpus_per_node`` GPUs."""
    from megatron_vlm.recipes.kimi import H100_GPUS
    from megatron_vlm.train import build_job, parse_args

    try:
        parsed = parse_args(args)
    except SystemExit as e:  # argparse already printed why
        raise ValueError(f"{where}: not valid train arguments: {' '.join(args)}") from e
    try:
        job = build_job(parsed)
        job.check_inputs()  # a real recipe without its tokenizer or data never queues
    except (ValueError, KeyError) as e:
        raise ValueError(f"{where}: {e}") from e
    if ns is not None and ns.nodes >= 1 and ns.gpus_per_node >= 1:  # else SlurmJob refuses
        recipe = None if parsed.config else parsed.recipe
        try:
            check_launch(job, recipe=recipe, nodes=ns.nodes, gpus_per_node=ns.gpus_per_node,
                         gpu_memory_gib=ns.gpu_memory, planned_gpus=H100_GPUS.get(recipe))
        except ValueError as e:
            raise ValueError(f"{where}: {e}") from e
    return job.name


def build_slurm_job(ns: argparse.Namespace) -> SlurmJob:
    """Check every run and build the SlurmJob (ValueError with the reason otherwise)."""
    if ns.array_file is not None:
        if ns.overrides:
            raise ValueError("overrides go into the array file's lines with --array-file")
        runs = read_array_file(ns.array_file)
        for i, run in enumerate(runs):
            _check_run(run, f"{ns.array_file} run {i}", ns)
        name, train_args = ns.job_name or "sweep", []
    else:
        runs, train_args = None, ["--recipe", ns.recipe, *ns.overrides]
        name = _check_run(train_args, "--recipe", ns)  # checked with --job-name too
        name = ns.job_name or name
    env = {}
    for item in ns.env:
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"--env {item!r}: use KEY=VALUE")
        env[key] = value
    run_dir = Path(ns.run_dir or Path("runs") / name).absolute()
    return SlurmJob(
        job_name=name, train_args=train_args, array_runs=runs, array_parallel=ns.array_parallel,
        run_dir=str(run_dir),
        checkpoint_dir=str(Path(ns.checkpoint_dir).absolute()) if ns.checkpoint_dir else None,
        log_dir=str(Path(ns.log_dir).absolute()) if ns.log_dir else None,
        nodes=ns.nodes, gpus_per_node=ns.gpus_per_node, cpus_per_task=ns.cpus_per_task,
        time=ns.time, partition=ns.partition, account=ns.account, qos=ns.qos,
        exclusive=ns.exclusive, container_image=ns.container_image,
        container_mounts=ns.container_mounts, container_workdir=ns.container_workdir,
        venv=str(Path(ns.venv).absolute()) if ns.venv else None, system_python=ns.system_python,
        workdir=str(Path(ns.workdir or ".").absolute()), env=env, master_port=ns.master_port,
        signal_lead_s=ns.signal_lead, max_requeues=ns.max_requeues, extra_sbatch=ns.sbatch)


def _prepare_slices(ns: argparse.Namespace) -> int:
    """``--prepare-slices N``: the preparation array and its merge job (no GPUs, no torchrun)."""
    from megatron_vlm.cluster.prepare_array import (
        PrepareArrayJob,
        launch_prepare_array,
        slice_task_args,
    )

    try:
        name, out, task_args = slice_task_args(ns.overrides)
        job = PrepareArrayJob(
            name=name, prepare_args=task_args, out_dir=out, num_tasks=ns.prepare_slices,
            array_parallel=ns.array_parallel, cpus_per_task=ns.cpus_per_task or 16,
            time=ns.time, partition=ns.partition, account=ns.account, qos=ns.qos,
            container_image=ns.container_image, container_mounts=ns.container_mounts,
            container_workdir=ns.container_workdir,
            venv=str(Path(ns.venv).absolute()) if ns.venv else None,
            system_python=ns.system_python, workdir=str(Path(ns.workdir or ".").absolute()),
            log_dir=str(Path(ns.log_dir).absolute()) if ns.log_dir else None)
        print(launch_prepare_array(job, ns.dry_run), end="")
    except ValueError as e:
        print(f"launch: {e}", file=sys.stderr)
        return 2
    except RuntimeError as e:
        print(f"launch: {e}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    ns = _parser().parse_args(argv)
    if ns.prepare_slices is not None:
        return _prepare_slices(ns)
    try:
        job = build_slurm_job(ns)
    except ValueError as e:
        print(f"launch: {e}", file=sys.stderr)
        return 2
    script = render_sbatch(job)
    if ns.dry_run:
        print(script, end="")
        print(f"launch: dry run; before sbatch-ing this script yourself, mkdir -p {job.log_root} "
              "(SLURM opens --output before the script runs)", file=sys.stderr)
        return 0
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    try:
        path, job_id = submit(job, script, stamp)
    except RuntimeError as e:
        print(f"launch: {e}", file=sys.stderr)
        return 1
    print(f"submitted job {job_id}: {path}; logs in {job.log_root}")
    return 0
