"""The loop's checkpoint component: when to save, what a training checkpoint holds, and the log
line of every completed save (how long it blocked the loop).

Policy (``maybe_save``): every ``checkpoint.save_interval`` steps, and whenever forced (a stop, the
end of the run with ``checkpoint.save_on_exit``), never twice for one step (a run resumed at a
step counts that step as saved). The save itself is ``checkpoint.CheckpointSaver``'s (synchronous
or in the background writer process).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from megatron_vlm.checkpoint import CheckpointSaver, SaveReport, step_dir_name
from megatron_vlm.training.metrics import MetricsLogger


class Checkpointer:
    """Saves this run's checkpoints under ``root`` (see the module docstring).

    Args:
        root: checkpoint root.
        save_interval: steps between saves (0 = only forced saves).
        keep_last: complete checkpoints kept.
        async_save: write in the background.
        state: ``(model_chunks, optimizer, scheduler)`` to save.
        extra_fn: the ``extra`` dict of a save (train state, loader state, ...), built at save
            time.
        config_yaml: the run's config, recorded in every manifest.
        metrics: where completed saves are logged.
        saved_step: a step already on disk (the resume point), or None.
        layout: this run's parallel sizes for the manifests (``Runtime.layout()``; None: the
            process's groups).
    """

    def __init__(self, root: Path, *, save_interval: int, keep_last: int, async_save: bool,
                 state: tuple, extra_fn: Callable[[], dict], config_yaml: str,
                 metrics: MetricsLogger, saved_step: int | None = None,
                 layout: dict[str, int] | None = None) -> None:
        self.root = Path(root)
        self.saver = CheckpointSaver(self.root, keep_last, async_save, layout)
        self.save_interval = save_interval
        self.state, self.extra_fn, self.config_yaml = state, extra_fn, config_yaml
        self.metrics = metrics
        self.last_saved_step = saved_step

    @property
    def last_checkpoint(self) -> Path | None:
        """The newest checkpoint this run saved or resumed from."""
        if self.last_saved_step is None:
            return None
        return self.root / step_dir_name(self.last_saved_step)

    def due(self, step: int) -> bool:
        return bool(self.save_interval) and step % self.save_interval == 0

    def maybe_save(self, step: int, force: bool = False) -> bool:
        """Save ``step`` if it is due or forced and not saved yet; whether a save started."""
        if not (force or self.due(step)) or step == self.last_saved_step:
            return False
        chunks, optimizer, scheduler = self.state
        self._log(self.saver.save(step, chunks, optimizer, scheduler, self.extra_fn(),
                                  self.config_yaml), step)
        self.last_saved_step = step
        return True

    def poll(self, step: int) -> None:
        """Log an async save that completed (called once per step)."""
        self._log(self.saver.poll(), step)

    def finish(self, step: int) -> None:
        """Wait for a save in flight and log it."""
        self._log(self.saver.finish(), step)

    def close(self) -> None:
        self.saver.close()

    def _log(self, reports: list[SaveReport], step: int) -> None:
        for r in reports:
            self.metrics.log(r.step, "checkpoint", {**r.metrics(), "completed_at_step": step})
            if not r.async_save:
                self.metrics.message(
                    f"checkpoint {r.path} (sync): blocked the step loop {r.blocked_s:.2f} s")
                continue
            waited = f", waited {r.wait_s:.2f} s for the writer" if r.wait_s else ""
            self.metrics.message(
                f"checkpoint {r.path} (async): written in the background in "
                f"{r.write_end_unix - r.write_start_unix:.2f} s, complete at step {step}; "
                f"blocked the step loop {r.blocked_s:.2f} s (snapshot {r.schedule_s:.2f}, "
                f"finalize {r.finalize_s:.2f}{waited})")
