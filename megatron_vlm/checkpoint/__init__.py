"""Checkpoints: megatron dist_checkpointing (torch_dist) written atomically with a manifest.

Sees models only through (sharded) state dicts. See ``dist.py`` for the on-disk layout.
"""

from megatron_vlm.checkpoint.async_save import CheckpointSaver, SaveReport
from megatron_vlm.checkpoint.dist import (
    find_latest_checkpoint,
    load_checkpoint,
    prune_checkpoints,
    save_checkpoint,
    step_dir_name,
    wait_for_pruning,
)
from megatron_vlm.checkpoint.manifest import CheckpointError, read_manifest, verify_checkpoint

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
