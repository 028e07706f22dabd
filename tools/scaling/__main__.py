"""Scaling sweeps: run locally or write SLURM job-array files, then fit loss vs compute.

    python -m tools.scaling run tools/scaling/sweeps/early_fusion_tiny.yaml     # run + analyze
    python -m tools.scaling run SWEEP.yaml --smoke                              # seconds-long
    python -m tools.scaling array SWEEP.yaml --out runs/sweep_arrays            # SLURM arrays
    python -m tools.scaling analyze SWEEP.yaml [--plot docs/scaling_x.png]      # table, fits, PNG
    python -m tools.scaling list SWEEP.yaml                                     # the runs

``array`` writes ``<name>.phase<k>.txt`` (one line of train arguments per run) and prints the
``tools/launch.py`` commands: phase k+1 waits for phase k (``--dependency=afterok``).
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

from tools.scaling.analyze import fit_groups, plot_fits, write_fits
from tools.scaling.collect import collect, write_table
from tools.scaling.runner import run_local
from tools.scaling.sweep import load_sweep, write_array_files


def analyze(sweep, plot: str | None = None, method: str = "wald") -> dict:
    """Table (CSV + JSON), fits (JSON) and the plot of a sweep's finished runs."""
    rows = collect(sweep)
    if not rows:
        raise ValueError(f"sweep {sweep.name}: no finished run under {sweep.output_dir}")
    out = Path(sweep.output_dir)
    csv_path, _ = write_table(rows, out, "table")
    fits = fit_groups(rows, sweep.metrics, sweep.group_by, method=method)
    write_fits(fits, out / "fits.json")
    png = plot_fits(fits, plot or out / f"{sweep.name}.png", sweep.name)
    print(f"{len(rows)} runs -> {csv_path}, {out / 'fits.json'}, {png}")
    for metric, groups in fits.items():
        for group, g in sorted(groups.items()):
            f = g.get("fit")
            what = (f"b={f['b']:.3f} [{f['ci']['b'][0]:.3f}, {f['ci']['b'][1]:.3f}] "
                    f"c={f['c']:.3f} [{f['ci']['c'][0]:.3f}, {f['ci']['c'][1]:.3f}]"
                    if f else f"not fitted ({g.get('why')})")
            last = g["points"][-1]
            print(f"  {metric} {group}: {what}; largest run {last[1]:.4f} at {last[0]:.3g} FLOPs")
    return {"rows": rows, "fits": fits, "plot": str(png)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.scaling",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("command", choices=("run", "array", "analyze", "list"))
    p.add_argument("sweep", help="sweep YAML")
    p.add_argument("--smoke", action="store_true", help="apply the file's smoke section")
    p.add_argument("--output-dir", default=None, help="run directories here (default: the file's)")
    p.add_argument("--only", nargs="+", help="run only these run names")
    p.add_argument("--out", default=None, help="array: directory for the array files")
    p.add_argument("--plot", default=None, help="analyze: PNG path (default in the sweep dir)")
    p.add_argument("--ci", choices=("wald", "bootstrap"), default="wald")
    p.add_argument("--no-analyze", action="store_true", help="run: skip the fit and plot")
    p.add_argument("--in-process", action="store_true",
                   help="run: train in this process (no process per phase; quick sweeps)")
    args = p.parse_args(argv)
    try:
        sweep = load_sweep(args.sweep, smoke=args.smoke, out_dir=args.output_dir)
    except (ValueError, KeyError) as err:
        print(f"sweep error: {err}", file=sys.stderr)
        return 2
    if args.command == "list":
        for run in sweep.runs:
            print(run.name)
            for phase in run.phases:
                print(f"  -> step {phase.end_step}: {shlex.join(phase.args)}")
        return 0
    if args.command == "array":
        paths = write_array_files(sweep, args.out or Path(sweep.output_dir) / "arrays")
        print("\n".join(f"wrote {p}" for p in paths))
        print("submit (phase k+1 after phase k):")
        prev = None
        for k, path in enumerate(paths):
            dep = f" --sbatch=--dependency=afterok:${prev}" if prev else ""
            job_id = "sed -n 's/^submitted job \\([0-9]*\\).*/\\1/p'"
            print(f"  JOB{k}=$(python tools/launch.py --array-file {path} --gpus-per-node 1 "
                  f"--venv .venv --run-dir {sweep.output_dir}{dep} | {job_id})")
            prev = f"JOB{k}"
        return 0
    if args.command == "run":
        start = time.perf_counter()
        run_local(sweep, only=args.only, in_process=args.in_process)
        print(f"sweep {sweep.name}: {len(sweep.runs)} runs in {time.perf_counter() - start:.0f} s")
        if args.no_analyze:
            return 0
    analyze(sweep, plot=args.plot, method=args.ci)
    return 0


if __name__ == "__main__":
    sys.exit(main())
