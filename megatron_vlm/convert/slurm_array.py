"""SLURM array form of ``tools/convert_hf.py import|export --slurm-array N``: N tasks
``--slice $SLURM_ARRAY_TASK_ID/N`` (each one process on one node, converting its whole
layers/experts into files of its own under the shared output), then one ``--finish N`` job
submitted with ``--dependency=afterok:<array>`` (it joins the slices only when every task
succeeded). The pattern of ``cluster/prepare_array.py``: a failed task can be re-run alone
(``sbatch --array=7 <script>``), a finished slice returns at once, ``--requeue`` is set.

Paths become absolute (the tasks run elsewhere: the input and the output must be on a file
system every node sees). ``--dry-run`` prints both scripts instead of submitting them.
"""

from __future__ import annotations

import argparse
import shlex
from pathlib import Path


def add_slurm_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("SLURM array (--slurm-array N)")
    g.add_argument("--slurm-cpus", type=int, default=8, help="--cpus-per-task of each task")
    g.add_argument("--slurm-time", default="04:00:00", help="time limit of each job")
    g.add_argument("--slurm-mem", default=None, help="--mem of each task, e.g. 64G")
    g.add_argument("--slurm-partition", default=None)
    g.add_argument("--slurm-account", default=None)
    g.add_argument("--venv", default=None, help="virtual environment to activate on the nodes")
    g.add_argument("--dry-run", action="store_true", help="print the scripts, submit nothing")


def _tool_args(args: argparse.Namespace) -> list[str]:
    """The conversion's own arguments, absolute paths, without the array's."""
    if args.command == "import":
        out = ["import", str(Path(args.hf_dir).absolute()), str(Path(args.out).absolute()),
               "--params-dtype", args.params_dtype]
    else:
        out = ["export", str(Path(args.checkpoint).absolute()), str(Path(args.out).absolute()),
               "--dtype", args.dtype, "--max-shard-gb", str(args.max_shard_gb)]
        if args.family:
            out += ["--family", args.family]
        if args.int4_experts:
            out.append("--int4-experts")
        if args.tokenizer:
            out += ["--tokenizer", str(Path(args.tokenizer).absolute())]
    return out + ["--threads", str(args.threads), "--quiet"]


def render_scripts(args: argparse.Namespace, repo: Path) -> tuple[str, str]:
    """(array script, finishing script) for ``args`` (parsed ``convert_hf.py`` arguments)."""
    n = args.slurm_array
    if n < 1:
        raise ValueError(f"--slurm-array {n}: give at least 1 task")
    name = f"convert-{args.command}-{Path(args.out).name}"
    logs = Path(args.out).absolute().parent / f".slurm-{Path(args.out).name}"
    tool = " ".join(shlex.quote(a) for a in _tool_args(args))

    def script(job: str, log: str, extra: list[str], tail: str) -> str:
        lines = ["#!/bin/bash", f"#SBATCH --job-name={shlex.quote(job)}", "#SBATCH --nodes=1",
                 "#SBATCH --ntasks=1", f"#SBATCH --cpus-per-task={args.slurm_cpus}",
                 f"#SBATCH --time={shlex.quote(args.slurm_time)}",
                 f"#SBATCH --output={shlex.quote(str(logs / log))}", "#SBATCH --requeue", *extra]
        for opt, value in (("mem", args.slurm_mem), ("partition", args.slurm_partition),
                           ("account", args.slurm_account)):
            if value:
                lines.append(f"#SBATCH --{opt}={shlex.quote(value)}")
        lines += ["", "# Rendered by tools/convert_hf.py --slurm-array.", "set -euo pipefail"]
        if args.venv:
            lines.append(f"source {shlex.quote(str(Path(args.venv) / 'bin' / 'activate'))}")
        lines += [f"cd {shlex.quote(str(repo))}", "export OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1",
                  f"srun --ntasks=1 python tools/convert_hf.py {tool} {tail}", ""]
        return "\n".join(lines)

    array = script(name, "%x-%A_%a.out", [f"#SBATCH --array=0-{n - 1}"],
                   f'--slice "${{SLURM_ARRAY_TASK_ID:?an array task (sbatch --array)}}/{n}"')
    finish = script(f"{name}-finish", "%x-%j.out", [], f"--finish {n}")
    return array, finish


def slurm_array(args: argparse.Namespace, argv: list[str]) -> int:
    """Print (``--dry-run``) or write and submit the two scripts; the finishing job depends on
    the array (``afterok``)."""
    from megatron_vlm.cluster.prepare_array import sbatch_submit

    repo = Path(__file__).resolve().parents[2]
    try:
        array, finish = render_scripts(args, repo)
    except ValueError as e:
        print(f"error: {e}")
        return 2
    if args.dry_run:
        print(array)
        print("# --- then, submitted with --dependency=afterok:<array job id> ---")
        print(finish)
        return 0
    logs = Path(args.out).absolute().parent / f".slurm-{Path(args.out).name}"
    logs.mkdir(parents=True, exist_ok=True)
    (logs / "array.sbatch").write_text(array)
    (logs / "finish.sbatch").write_text(finish)
    array_id = sbatch_submit(logs / "array.sbatch")
    finish_id = sbatch_submit(logs / "finish.sbatch", f"--dependency=afterok:{array_id}",
                        "--kill-on-invalid-dep=yes")
    print(f"submitted array {array_id} ({args.slurm_array} slices) and finishing job "
          f"{finish_id} (after all succeeded); scripts and logs in {logs}")
    return 0
