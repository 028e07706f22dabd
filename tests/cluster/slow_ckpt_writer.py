"""A slowed checkpoint bucket writer for ``test_async_checkpoint_training``.

The test puts :func:`slow_write_buckets` in place of ``async_writer.write_buckets_to_queue`` in
the trainer; the write request names it, so the writer process (a fresh interpreter, given the
trainer's ``sys.path``) imports this module and runs it: sleep, SIGTERM the trainer (first save
only), sleep, then the real write. The trainer's pid and the signal log come through the
environment, which the writer inherits.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

from megatron_vlm.checkpoint import async_writer

BEFORE_SIGNAL_S = 2.0
AFTER_SIGNAL_S = 1.0
PID_ENV = "SLOW_CKPT_WRITER_TRAINER_PID"
LOG_ENV = "SLOW_CKPT_WRITER_SIGNAL_LOG"

_write = async_writer.write_buckets_to_queue  # the real one, whatever the test replaces later


def slow_write_buckets(*args, **kwargs):
    time.sleep(BEFORE_SIGNAL_S)
    log = Path(os.environ[LOG_ENV])
    if not log.exists():  # the first save only
        log.write_text(json.dumps({"time": time.time(), "writer_pid": os.getpid()}))
        os.kill(int(os.environ[PID_ENV]), signal.SIGTERM)
    time.sleep(AFTER_SIGNAL_S)
    return _write(*args, **kwargs)
