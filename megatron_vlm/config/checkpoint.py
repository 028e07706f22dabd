"""Checkpoint configuration."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

RESUME_MODES = ("never", "auto", "require")


@dataclass(kw_only=True)
class CheckpointConfig:
    """Where and when to save; whether to resume."""

    dir: str | None = None
    """Checkpoint root; None = <train.output_dir>/checkpoints."""
    save_interval: int = 0
    """Steps between saves (0 = only at the end and on SIGTERM)."""
    resume: Literal["never", "auto", "require"] | bool = "never"
    """``never``: a fresh run; refused when the run directory holds a previous run's checkpoints
    or metrics (see ``overwrite``). ``auto``: continue from the newest complete checkpoint under
    ``dir``, or start at step 0 (saying so) when there is none. ``require``: continue from it,
    and exit with an error naming the directory when there is none (a requeued job: a mistyped
    ``dir`` must not restart from step 0). Legacy booleans: true = auto, false = never."""
    overwrite: bool = False
    """A fresh run (``resume=never``) into a run directory that holds a previous run: move that
    run's checkpoints, ``metrics.jsonl``, TensorBoard files and plot into
    ``<train.output_dir>/replaced-<UTC time>/`` (a rename: nothing is deleted) and start afresh.
    Ignored (with a message) when the run resumes."""
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
    checkpoint (``resume``/``load``), so a preempted stage continues where it stopped. This is
    the way to change the model between stages (RoPE base, YaRN, freezing): a resume refuses a
    changed model."""
    async_save: bool = False
    """Write checkpoints in the background (megatron's async dist_checkpointing): the step loop
    is blocked only to snapshot and to finalize; the checkpoint appears (renamed into place,
    manifest written) once the write is done. At most one save is in flight."""

    def __post_init__(self) -> None:
        if isinstance(self.resume, bool):  # job.yaml files and overrides of older versions
            self.resume = "auto" if self.resume else "never"
        if self.resume not in RESUME_MODES:
            raise ValueError(f"checkpoint.resume={self.resume!r}: choose one of "
                             f"{list(RESUME_MODES)} (true = auto, false = never)")
        if self.save_interval < 0:
            raise ValueError("checkpoint.save_interval must be >= 0")
        if self.keep_last < 1:
            raise ValueError("checkpoint.keep_last must be >= 1")
