"""Bad-input policy for media samples (SPEC §7): typed errors with a skip reason, and a counter.

A corrupt or truncated image or video, a missing file, a wrong-size grid, empty text or a sample
longer than the sequence is *skipped*, never a crashed run. Every decoder and checker in
``megatron_vlm.data`` raises a ``BadSampleError`` subclass whose ``reason`` names why; the loader
catches it, calls ``SkipCounter.record`` and moves on. The counter keeps ``reason -> count`` for the
metrics and logs ONE line every ``warn_every`` skips (no traceback spam: energon's default handler
prints a full traceback per failure, SPEC §10).

Counters are per process (each DataLoader worker has its own); summing them across workers and
ranks is the loader's job (``state_dict`` / ``merge``).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from typing import Any, TypeVar

logger = logging.getLogger("megatron_vlm.data")

T = TypeVar("T")


class SkipReason:
    """Skip reasons (metric names: ``data/skipped/<reason>``)."""

    IMAGE_DECODE = "image_decode"
    """Image bytes that PIL cannot decode: corrupt, truncated, not an image."""
    IMAGE_TOO_LARGE = "image_too_large"
    """More pixels than PIL's decompression-bomb limit."""
    VIDEO_DECODE = "video_decode"
    """Video that neither decord nor PyAV can decode completely."""
    VIDEO_EMPTY = "video_empty"
    """A video stream with no frames (or no video stream)."""
    MISSING_FILE = "missing_file"
    """A media path that does not exist."""
    BAD_GRID = "bad_grid"
    """A patch grid that breaks the model contract (odd h/w, t outside 1..4, budget exceeded)."""
    PLACEHOLDER_IN_TEXT = "placeholder_in_text"
    """Text that tokenised to a media placeholder id (would misalign vision features)."""
    EMPTY_TEXT = "empty_text"
    """A sample with no tokens."""
    TOO_LONG = "too_long"
    """A sample longer than the packed sequence or the ViT patch budget (a video only after
    fitting it: lower resolution, then lower fps, did not bring it under the budgets)."""
    BAD_TIMESTAMPS = "bad_timestamps"
    """A video whose frame timestamps are all zero or not increasing and whose stream has no
    frame rate to rebuild them from."""


class BadSampleError(Exception):
    """A sample that must be skipped; ``reason`` is a ``SkipReason`` value.

    Args:
        message: What is wrong, with the offending source when known.
        reason: Skip reason; defaults to the class's ``default_reason``.
        media: The media item at fault (a path, or ``<file>:<key/row>`` for bytes held inside
            a tar or parquet file) for reject logs; None when the record itself is at fault.
    """

    default_reason: str = "bad_sample"

    def __init__(self, message: str, *, reason: str | None = None,
                 media: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason or self.default_reason
        self.media = media


class MediaDecodeError(BadSampleError):
    """Corrupt, truncated or unsupported image/video data."""

    default_reason = SkipReason.IMAGE_DECODE


class MediaMissingError(BadSampleError):
    """A media file that does not exist."""

    default_reason = SkipReason.MISSING_FILE


class MediaGridError(BadSampleError):
    """A patch grid or budget that the model cannot take."""

    default_reason = SkipReason.BAD_GRID


class SkipCounter:
    """Counts skipped samples per reason and warns with one line every ``warn_every`` skips.

    Args:
        warn_every: Log a one-line summary after every this many skips (0 disables logging).
        name: Prefix of the log line (e.g. the dataset name).
    """

    def __init__(self, warn_every: int = 100, name: str = "data") -> None:
        if warn_every < 0:
            raise ValueError(f"warn_every must be >= 0, got {warn_every}")
        self.warn_every = warn_every
        self.name = name
        self.counts: Counter[str] = Counter()

    @property
    def total(self) -> int:
        """Skips so far, all reasons."""
        return sum(self.counts.values())

    def skip(self, reason: str, detail: str = "") -> None:
        """Count one skipped sample; log a one-line summary every ``warn_every`` skips."""
        self.counts[reason] += 1
        total = self.total
        if self.warn_every and total % self.warn_every == 0:
            summary = ", ".join(f"{r}={n}" for r, n in sorted(self.counts.items()))
            last = f"; last: {reason}: {detail}" if detail else f"; last: {reason}"
            logger.warning("%s: skipped %d samples (%s)%s", self.name, total, summary, last[:300])

    def record(self, exc: BaseException) -> str:
        """Count ``exc`` as a skip and return its reason.

        ``BadSampleError`` carries its reason; any other exception counts as
        ``error:<ExceptionType>`` so an unexpected bug still shows up in the metrics by name.
        """
        if isinstance(exc, BadSampleError):
            reason = exc.reason
        else:
            reason = f"error:{type(exc).__name__}"
        self.skip(reason, str(exc).splitlines()[0] if str(exc) else "")
        return reason

    def guard(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T | None:
        """``fn(*args, **kwargs)``, or None (counted) if it raises ``BadSampleError``.

        Other exceptions propagate: they are bugs, not bad data.
        """
        try:
            return fn(*args, **kwargs)
        except BadSampleError as exc:
            self.record(exc)
            return None

    def energon_handler(self, exc: Exception, sample: Any = None, sources: Any = None) -> None:
        """Drop-in ``WorkerConfig.global_error_handler``: count the failure, no traceback.

        energon skips the sample when the handler returns (and raises ``FatalSampleError`` after
        100 consecutive failures, which still stops a run fed only garbage).
        """
        del sample, sources
        self.record(exc)

    def as_metrics(self, prefix: str = "data/skipped/") -> dict[str, int]:
        """``{prefix + reason: count}`` plus ``prefix + "total"``."""
        out = {prefix + r: n for r, n in sorted(self.counts.items())}
        out[prefix + "total"] = self.total
        return out

    def merge(self, other: SkipCounter | dict[str, int]) -> None:
        """Add another counter's counts (e.g. from another worker) without logging."""
        counts = other.counts if isinstance(other, SkipCounter) else other
        self.counts.update(counts)

    def state_dict(self) -> dict[str, int]:
        """Counts, for checkpointing with the loader state."""
        return dict(self.counts)

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Restore counts saved by ``state_dict``."""
        self.counts = Counter({str(k): int(v) for k, v in state.items()})
