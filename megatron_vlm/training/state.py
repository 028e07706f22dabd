"""Loop state that is checkpointed, and the SIGTERM flag (SLURM preemption)."""

from __future__ import annotations

import dataclasses
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

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainState:
        return cls(**data)


class StopSignal:
    """Records SIGTERM/SIGUSR1 so the loop can save and exit at the next step boundary."""

    def __init__(self, signals: tuple[int, ...] = (signal.SIGTERM, signal.SIGUSR1)) -> None:
        self.received: int | None = None
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
        return self.received is not None

    def restore(self) -> None:
        for sig, prev in self._previous.items():
            signal.signal(sig, prev)
