"""Per-rank RNG state as plain tensors/lists/ints, so it round-trips through
``torch.save`` / ``torch.load(weights_only=True)``.

Captured: python ``random``, numpy's global generator, torch's CPU generator, every CUDA device
generator (when CUDA is present), and megatron's model-parallel RNG tracker (dropout streams per
TP/EP rank). On CPU the tracker's states are CPU generator states (``parallel/cpu_shims.py``).
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def _tracker():
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    return get_cuda_rng_tracker()


def capture_rng_state() -> dict[str, Any]:
    """This process's RNG states (tensors, lists, ints, floats, strings, None only)."""
    py_version, py_internal, py_gauss = random.getstate()
    np_kind, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    state: dict[str, Any] = {
        "python": {
            "version": int(py_version),
            "internal": torch.tensor(py_internal, dtype=torch.int64),
            "gauss_next": py_gauss,
        },
        "numpy": {
            "kind": str(np_kind),
            "keys": torch.from_numpy(np_keys.astype(np.int64)),
            "pos": int(np_pos),
            "has_gauss": int(np_has_gauss),
            "cached_gaussian": float(np_gauss),
        },
        "torch_cpu": torch.get_rng_state(),
        # This rank's own device only: a checkpoint written by torchrun (every GPU visible) must
        # resume under SLURM's one-GPU-per-task and back.
        "cuda": [torch.cuda.get_rng_state().cpu()] if torch.cuda.is_available() else [],
        "tracker": {
            name: s.detach().cpu().clone() for name, s in _tracker().get_states().items()
        },
    }
    return state


def restore_rng_state(state: dict[str, Any]) -> None:
    """Inverse of :func:`capture_rng_state`.

    """
    py = state["python"]
    internal = tuple(int(x) for x in py["internal"].tolist())
    random.setstate((py["version"], internal, py["gauss_next"]))
    nps = state["numpy"]
    np.random.set_state(
        (
            nps["kind"],
            nps["keys"].numpy().astype(np.uint32),
            nps["pos"],
            nps["has_gauss"],
            nps["cached_gaussian"],
        )
    )
    torch.set_rng_state(state["torch_cpu"])
    if torch.cuda.is_available() and state["cuda"]:
        # Older checkpoints hold every visible device's state; this rank's device is the one
        # it generated on (device ``current_device()`` then as now).
        saved = state["cuda"]
        own = saved[0] if len(saved) == 1 else saved[torch.cuda.current_device() % len(saved)]
        torch.cuda.set_rng_state(own)
    _tracker().set_states(dict(state["tracker"]))
