"""Loop state that is checkpointed, and the stop request (SIGTERM/SIGUSR1 or a stop file)."""

from __future__ import annotations

import dataclasses
import os
import signal
from dataclasses import dataclass
from typing import Any


@dataclass
class TrainState:
    """Counters that must survive a resume (stored in the checkpoint's ``extra``)."""

    step: int = 0
    """Optimizer steps attempted (successful + skipped)."""
    consumed_sequences: int = 0
    """Packed sequences consumed over all DP ranks."""
    consumed_tokens: int = 0
    """Real (non-padding) tokens with a loss, over all DP ranks."""
    skipped_steps: int = 0
    """Steps skipped for a non-finite loss."""
    consecutive_nonfinite: int = 0
    """Non-finite steps in a row (abort past the configured limit)."""

    def record(self, tokens: int, skipped: bool, global_batch_size: int) -> None:
        """Count one attempted step."""
        self.step += 1
        self.consumed_sequences += global_batch_size
        self.consumed_tokens += tokens
        self.skipped_steps += int(skipped)
        self.consecutive_nonfinite = self.consecutive_nonfinite + 1 if skipped else 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainState:
        return cls(**data)


#: Environment variable naming the stop file (set by the SLURM batch script, see
#: ``megatron_vlm/cluster/slurm.py``): once the file exists, the run saves and exits.
STOP_FILE_ENV = "MEGATRON_VLM_STOP_FILE"


class StopSignal:
    """A stop request for the loop: SIGTERM/SIGUSR1 arrived, or the stop file exists.

    The loop saves and exits at the next step boundary when :attr:`requested`. The stop file is
    how the SLURM batch script asks (its SIGUSR1 trap creates it): no signal has to pass through
    ``torchrun``, which SIGKILLs the trainers a grace period after forwarding one, possibly in
    the middle of the save: a fixed 30 s in every torch before pytorch#172596 (2026-03; the NGC
    25.10 container's 2.9 included), ``TORCH_ELASTIC_SHUTDOWN_TIMEOUT`` after it.
    """

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGUSR1),
                 stop_file: str | None = None) -> None:
        """Install the handlers; ``stop_file`` None = the path in ``$MEGATRON_VLM_STOP_FILE``
        (no file checked when that is unset or empty)."""
        self.received: int | None = None
        self.stop_file = stop_file if stop_file is not None else os.environ.get(STOP_FILE_ENV)
        self._previous = {}
        for sig in signals:
            try:
                self._previous[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread (e.g. inside some test runners)
                pass

    def _handler(self, signum, frame) -> None:
        self.received = signum

    @property
    def requested(self) -> bool:
        """A signal arrived, or the stop file exists (one ``stat`` per call)."""
        return self.received is not None or bool(self.stop_file
                                                   and os.path.exists(self.stop_file))

    def restore(self) -> None:
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)
