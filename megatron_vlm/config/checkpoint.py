"""Checkpoint configuration."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(kw_only=True)
class CheckpointConfig:
    """Where and when to save; whether to resume."""

    dir: str | None = None
    """Checkpoint root; None = <train.output_dir>/checkpoints."""
    save_interval: int = 0
    """Steps between saves (0 = only at the end and on SIGTERM)."""
    resume: bool = False
    """Resume from the newest complete checkpoint under ``dir`` if one exists."""
    load: str | None = None
    """Load this specific checkpoint directory (overrides ``resume``'s search)."""
    keep_last: int = 3
    """Complete checkpoints kept; older ones are deleted after a successful save."""
    save_on_exit: bool = True
    """Save when training ends or on SIGTERM."""
    load_data_state: bool = True
    """On resume, continue the data stream where the checkpoint left it. False starts the
    stream afresh (model, optimizer, schedule and step still resume): for a new data mix or
    dataset from this step on, e.g. vision data injected late in a run."""
    init_from: str | None = None
    """Start from this checkpoint's model weights (a checkpoint directory, or a checkpoint root
    whose newest complete checkpoint is taken): e.g. one written by ``tools/convert_hf.py
    import`` or the previous training stage's. Step, LR schedule and data start fresh; the
    optimizer state is kept only if the checkpoint's trainable parameter set equals this run's
    (else a fresh optimizer, with a log line saying why). Ignored when this run resumes its own
    checkpoint (``resume``/``load``), so a preempted stage continues where it stopped."""
    async_save: bool = False
    """Write checkpoints in the background (megatron's async dist_checkpointing): the step loop
    is blocked only to snapshot and to finalize; the checkpoint appears (renamed into place,
    manifest written) once the write is done. At most one save is in flight."""

    def __post_init__(self) -> None:
        if self.save_interval < 0:
            raise ValueError("checkpoint.save_interval must be >= 0")
        if self.keep_last < 1:
            raise ValueError("checkpoint.keep_last must be >= 1")
