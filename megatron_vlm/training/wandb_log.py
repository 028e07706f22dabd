"""Optional Weights & Biases logging (``train.wandb``): rank 0 mirrors every metrics record.

``offline`` needs no network: the run is written under ``<output_dir>/wandb`` and uploaded later
with ``wandb sync``. A restarted job (SLURM requeue, ``--resume``) continues the same W&B run: its
id is kept in ``<output_dir>/wandb_run_id``.
"""

from __future__ import annotations

import importlib.util
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from megatron_vlm.config.job import JobConfig

RUN_ID_FILE = "wandb_run_id"


def check_wandb(job: JobConfig) -> None:
    """Start-up check: ``train.wandb`` on needs the package (ValueError naming the fix)."""
    if job.train.wandb != "off" and importlib.util.find_spec("wandb") is None:
        raise ValueError(f"train.wandb={job.train.wandb} needs the wandb package: "
                         "pip install '.[wandb]' (or set train.wandb=off)")


class WandbSink:
    """One W&B run, logged from the writer rank (see the module docstring)."""

    def __init__(self, job: JobConfig, run_dir: Path) -> None:
        import wandb

        run_dir.mkdir(parents=True, exist_ok=True)
        id_file = run_dir / RUN_ID_FILE
        if id_file.is_file():
            run_id = id_file.read_text().strip()
        else:
            run_id = secrets.token_hex(4)  # W&B ids: short, lowercase alphanumeric
            id_file.write_text(run_id + "\n")
        self._run = wandb.init(
            project=job.train.wandb_project, entity=job.train.wandb_entity,
            name=job.train.wandb_run_name or job.name, id=run_id, resume="allow",
            mode=job.train.wandb, dir=str(run_dir), config=job.to_dict(),
            # Our own console line already reports progress; W&B's console capture and system
            # stats would add a thread and noise to every log.
            settings=wandb.Settings(console="off", silent=True, x_disable_stats=True))

    def log(self, step: int, split: str, flat: Mapping[str, float | None]) -> None:
        values: dict[str, Any] = {f"{split}/{k}": v for k, v in flat.items() if v is not None}
        if values:
            self._run.log(values, step=int(step))

    def close(self) -> None:
        if self._run is not None:
            self._run.finish()
            self._run = None
