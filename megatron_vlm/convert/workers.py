"""Run conversion slices in local worker processes (``convert_hf.py --workers N``).

Each slice is a fresh process (``spawn``: no state inherited from the parent, the same as a
SLURM array task) calling ``fn(*args, **kwargs)``; the first failure is raised here after the
other workers are stopped.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import traceback
from collections.abc import Callable


def _run(fn: Callable, args: tuple, kwargs: dict, errors) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    try:
        fn(*args, **kwargs)
    except BaseException as e:  # reported to the parent, which raises it
        errors.put((type(e).__name__, str(e), traceback.format_exc()))
        raise SystemExit(1) from e


class WorkerError(RuntimeError):
    """A worker process failed (its traceback is in the message)."""


def run_slices(fn: Callable, args_list: list[tuple], kwargs: dict) -> None:
    """``fn(*args, **kwargs)`` for each ``args`` in its own process, all at once; waits for all.

    Raises:
        ConversionError: a worker raised one (same message);
        WorkerError: a worker failed otherwise.
    """
    from megatron_vlm.convert.rules import ConversionError

    ctx = mp.get_context("spawn")
    errors = ctx.SimpleQueue()
    procs = [ctx.Process(target=_run, args=(fn, a, kwargs, errors), daemon=True)
             for a in args_list]
    for p in procs:
        p.start()
    try:
        for p in procs:
            p.join()
            if p.exitcode != 0:
                break
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
            p.join()
    if not errors.empty():
        name, message, tb = errors.get()
        if name == "ConversionError":
            raise ConversionError(message)
        raise WorkerError(f"a conversion worker failed:\n{tb}")
    bad = [p.exitcode for p in procs if p.exitcode != 0]
    if bad:
        raise WorkerError(f"a conversion worker exited with status {bad[0]}")
