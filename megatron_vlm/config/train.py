"""Training-loop configuration."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(kw_only=True)
class TrainConfig:
    """Steps, logging, validation and failure policy."""

    steps: int = 100
    """Optimizer steps."""
    seed: int = 1234
    """Model init and dropout seed."""
    log_interval: int = 1
    """Steps between progress lines."""
    eval_interval: int = 25
    """Steps between validation passes (0 = only at the end)."""
    eval_batches: int = 4
    """Micro-batches per validation pass per dataset."""
    max_consecutive_nonfinite: int = 5
    """Abort after this many NaN/Inf steps in a row (each is skipped and counted)."""
    peak_tflops: float = 989.0
    """Per-device peak TFLOP/s for MFU (H100 bf16 dense: 989)."""
    output_dir: str = "runs/tiny"
    """Run directory: metrics, TensorBoard, plots, tokenizer; checkpoints default below it."""
    tensorboard: bool = True
    """Write TensorBoard scalars."""
    plot: bool = True
    """Write a loss-curve PNG at the end."""
    exit_after_steps: int | None = None
    """Stop (after saving) once this many steps are done in this process; for tests/preemption."""
    cpu_threads: int | None = None
    """torch intra-op CPU threads per rank (``torch.set_num_threads``); None keeps the
    environment's (``OMP_NUM_THREADS``; the SLURM launcher exports 1). On a shared node give each
    rank at most its cores: (cores of the job) / (ranks per node), minus the loader workers."""
    wandb: Literal["off", "online", "offline"] = "off"
    """Weights & Biases logging from rank 0 (``pip install '.[wandb]'``): ``offline`` writes the
    run under ``<output_dir>/wandb`` with no network (``wandb sync`` uploads it later)."""
    wandb_project: str = "megatron_vlm"
    """W&B project."""
    wandb_entity: str | None = None
    """W&B entity (team or user); None = the account's default."""
    wandb_run_name: str | None = None
    """W&B run name; None = the recipe name. A restarted job continues the same W&B run (its id
    is kept in ``<output_dir>/wandb_run_id``)."""

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ValueError("train.steps must be >= 1")
        if self.log_interval < 1:
            raise ValueError("train.log_interval must be >= 1")
        if self.max_consecutive_nonfinite < 1:
            raise ValueError("train.max_consecutive_nonfinite must be >= 1")
        if self.cpu_threads is not None and self.cpu_threads < 1:
            raise ValueError(f"train.cpu_threads={self.cpu_threads} must be >= 1 (or null to keep "
                             "OMP_NUM_THREADS)")
