"""End-to-end tests: runs in fresh processes. The helpers live in ``tests/tiny_runs.py`` and the
session's trained tiny VLM in ``tests/conftest.py`` (``tiny_vlm_run``); re-exported here for tests
that import them from ``conftest``."""

from __future__ import annotations

from tiny_runs import REPO, TinyRun, read_metrics, run_train, train_env  # noqa: F401
