"""Run conversion slices in local worker processes (``convert_hf.py --workers N``).

Each slice is a fresh Python process (nothing inherited from the parent, as for a SLURM array
task) that runs ``module:function(*args, **kwargs)`` (JSON arguments) -- what a task of the array
form runs too. All start at once; the first failure stops the others and is raised here, a
``ConversionError`` (any exception of that name) with its own message.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time


class WorkerError(RuntimeError):
    """A worker process failed (its last output is in the message)."""


# Run with ``python -c`` (not ``-m``, which would import this package and with it torch and
# megatron before the slice's own module): imports nothing but that module.
_ENTRY = """
import importlib, json, sys
job = json.loads(sys.argv[1])
module, name = job["fn"].split(":")
try:
    getattr(importlib.import_module(module), name)(*job["args"], **job["kwargs"])
except Exception as e:
    print(json.dumps({"error": type(e).__name__, "message": str(e)}), file=sys.stderr)
    raise
"""


def run_slices(fn: str, args_list: list[list], kwargs: dict) -> None:
    """``fn`` (``"module:function"``) with each ``args`` (JSON values) in its own process, all at
    once, with ``OMP_NUM_THREADS=1`` unless set; waits for all.

    Raises:
        ConversionError: a worker raised one (same message);
        WorkerError: a worker failed otherwise.
    """
    from megatron_vlm.convert.rules import ConversionError

    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")
    procs, logs = [], []
    for args in args_list:
        spec = json.dumps({"fn": fn, "args": args, "kwargs": kwargs})
        logs.append(tempfile.TemporaryFile("w+"))  # a pipe could fill up and stall the worker
        procs.append(subprocess.Popen([sys.executable, "-c", _ENTRY, spec],
                                      env=env, stderr=logs[-1]))
    failed = None
    try:
        while failed is None and any(p.poll() is None for p in procs):
            failed = next((p for p in procs if p.poll() not in (None, 0)), None)
            time.sleep(0.05)
        failed = failed or next((p for p in procs if p.returncode != 0), None)
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
            p.wait()
        errs = []
        for log in logs:
            log.seek(0)
            errs.append(log.read())
            log.close()
    if failed is None:
        return
    err = errs[procs.index(failed)]
    for line in reversed(err.strip().splitlines()):
        try:
            report = json.loads(line)
        except ValueError:
            continue
        if isinstance(report, dict) and report.get("error") == "ConversionError":
            raise ConversionError(report["message"])
        break
    raise WorkerError(f"a conversion worker exited with status {failed.returncode}:\n"
                      f"{err[-3000:]}")

