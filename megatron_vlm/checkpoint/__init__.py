"""Checkpoints: megatron dist_checkpointing (torch_dist) written atomically with a manifest.

Sees models only through (sharded) state dicts. See ``dist.py`` for the on-disk layout.
The names below are imported on first use (PEP 562), so the background writer process
(``async_writer.py``) imports this package without megatron-core.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "CheckpointSaver": "async_save",
    "SaveReport": "async_save",
    "find_latest_checkpoint": "dist",
    "load_checkpoint": "dist",
    "prune_checkpoints": "dist",
    "save_checkpoint": "dist",
    "step_dir_name": "dist",
    "wait_for_pruning": "dist",
    "CheckpointError": "manifest",
    "read_manifest": "manifest",
    "verify_checkpoint": "manifest",
}

__all__ = [
    "CheckpointError",
    "CheckpointSaver",
    "SaveReport",
    "find_latest_checkpoint",
    "load_checkpoint",
    "prune_checkpoints",
    "read_manifest",
    "save_checkpoint",
    "step_dir_name",
    "verify_checkpoint",
    "wait_for_pruning",
]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"{__name__}.{module}"), name)
    globals()[name] = value
    return value
