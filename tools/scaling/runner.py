"""Run a sweep here, one trainer process per phase, one run after another.

A run whose metrics already show its last step is skipped, so an interrupted sweep continues
where it stopped. Each phase's output goes to ``<run dir>/phase<k>.log``. ``in_process`` trains
in this interpreter instead (megatron imported once: what makes the smoke sweep fast).
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

from tqdm import tqdm

from tools.scaling.sweep import Run, Sweep

REPO = Path(__file__).resolve().parents[2]


def last_step(run_dir: str | Path) -> int:
    """The last training step ``metrics.jsonl`` records (0 when there is none)."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return 0
    step = 0
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut by a crash
            continue
        if record.get("split") == "train":
            step = max(step, int(record["step"]))
    return step


#: torch.distributed rendezvous variables: a trainer started from a process that has them (a
#: test that initialised its own world, a torchrun shell) must not join that world's store.
RENDEZVOUS_VARS = ("MASTER_ADDR", "MASTER_PORT", "RANK", "WORLD_SIZE", "LOCAL_RANK",
                   "LOCAL_WORLD_SIZE", "GROUP_RANK", "TORCHELASTIC_RUN_ID")


def trainer_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a single-process trainer: ``base`` (default ``os.environ``) without
    rendezvous variables, one thread unless set, no torch.compile."""
    env = {k: v for k, v in (os.environ if base is None else base).items()
           if k not in RENDEZVOUS_VARS}
    env.setdefault("OMP_NUM_THREADS", "1")
    env.update(TORCH_COMPILE_DISABLE="1", PYTHONUNBUFFERED="1")
    return env


def _train_in_process(args: list[str], log: Path) -> int:
    """``python -m megatron_vlm.train ARGS`` in this interpreter (megatron imported once for
    many short runs); output to ``log``."""
    from megatron_vlm.train import main as train_main

    with open(log, "w") as out, contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        try:
            return train_main(args)
        except Exception:  # noqa: BLE001 -- the log gets the traceback, the caller the code
            traceback.print_exc()
            return 1


def run_one(run: Run, env: dict[str, str] | None = None, timeout: float | None = None,
            in_process: bool = False) -> float:
    """Run (or finish) ``run``'s phases; returns the seconds spent.

    Args:
        run: the run.
        env: environment of the trainer processes (default: :func:`trainer_env`).
        timeout: seconds per phase (subprocess mode).
        in_process: train in this interpreter instead of one process per phase.

    Raises:
        RuntimeError: a phase failed (its log's tail included).
    """
    start = time.perf_counter()
    Path(run.output_dir).mkdir(parents=True, exist_ok=True)
    env = env or trainer_env()
    ran = False
    for k, phase in enumerate(run.phases):
        if last_step(run.output_dir) >= phase.end_step:
            continue
        ran = True
        log = Path(run.output_dir) / f"phase{k}.log"
        if in_process:
            code = _train_in_process(list(phase.args), log)
        else:
            with open(log, "w") as out:
                code = subprocess.run(
                    [sys.executable, "-m", "megatron_vlm.train", *phase.args], cwd=REPO,
                    env=env, stdout=out, stderr=subprocess.STDOUT, timeout=timeout,
                    check=False).returncode
        if code != 0:
            tail = "\n".join(log.read_text().splitlines()[-30:])
            raise RuntimeError(f"run {run.name} phase {k} failed ({code}); {log}:\n{tail}")
    seconds = time.perf_counter() - start
    if not ran:  # finished before: keep the record of the run that did the work
        return seconds
    (Path(run.output_dir) / "sweep_run.json").write_text(json.dumps(
        {"name": run.name, "tags": run.tags, "steps": run.steps, "seconds": seconds,
         "phases": [{"args": list(p.args), "end_step": p.end_step} for p in run.phases]},
        indent=1))
    return seconds


def run_local(sweep: Sweep, only: list[str] | None = None,
              in_process: bool = False) -> dict[str, float]:
    """Every run of ``sweep`` (or those named in ``only``), sequentially; seconds per run."""
    runs = [r for r in sweep.runs if not only or r.name in only]
    times = {}
    for run in tqdm(runs, desc=f"sweep {sweep.name}", unit="run"):
        times[run.name] = run_one(run, in_process=in_process)
        tqdm.write(f"{run.name}: {times[run.name]:.0f} s")
    return times
