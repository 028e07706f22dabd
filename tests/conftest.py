"""Session-wide fixtures (SPEC §13): the README's main job is trained once per test run and reused
by every test that needs a trained tiny VLM (pretraining checks, vision probes, resume, and later
conversion and stage tests)."""

from __future__ import annotations

import pytest
from tiny_runs import TinyRun, run_example


@pytest.fixture(scope="session")
def tiny_vlm_run(tmp_path_factory) -> TinyRun:
    """``bash examples/pretrain_tiny.sh`` (``python -m megatron_vlm.train --recipe tiny_cpu``) with
    the recipe's defaults (the tiny VLM, 600 steps on the bundled multimodal corpus, a checkpoint
    every 100 steps, the last 3 kept): the README's main job and the pretraining example at once.

    Treat the run directory as read-only; ``TinyRun.fork`` copies a checkpoint to continue from.
    """
    run_dir = tmp_path_factory.mktemp("tiny_vlm_run")
    # ~4-6 minutes on 2 cores; kept under pytest-timeout's 900 s for the first test using it.
    proc = run_example("pretrain_tiny.sh", env={"OUT": str(run_dir)}, timeout=850)
    return TinyRun(run_dir, proc.stdout)


@pytest.fixture(scope="session")
def tiny_keye_run(tmp_path_factory) -> TinyRun:
    """``python -m megatron_vlm.train --recipe tiny_keye_cpu`` with the recipe's defaults (the tiny
    Keye-VL 1.5-shaped VLM on the bundled multimodal corpus, a checkpoint at its middle and end):
    reused by the Keye probe, resume and export tests (tests/e2e/test_keye_pretrain.py).

    Treat the run directory as read-only; ``TinyRun.fork`` copies a checkpoint to continue from.
    """
    from tiny_runs import run_train

    run_dir = tmp_path_factory.mktemp("tiny_keye_run")
    # ~2 minutes on 2 idle cores (issue 19's CI budget: <= 150 s).
    proc = run_train(["--recipe", "tiny_keye_cpu", f"train.output_dir={run_dir}"], timeout=600)
    return TinyRun(run_dir, proc.stdout)


@pytest.fixture(scope="session")
def tiny_glm_run(tmp_path_factory) -> TinyRun:
    """``python -m megatron_vlm.train --recipe tiny_glm_cpu`` with the recipe's defaults (the tiny
    GLM-4.5V-shaped VLM on the bundled multimodal corpus, a checkpoint at its middle and end):
    reused by the GLM probe and export tests (tests/e2e/test_glm_pretrain.py).

    Treat the run directory as read-only; ``TinyRun.fork`` copies a checkpoint to continue from.
    """
    from tiny_runs import run_train

    run_dir = tmp_path_factory.mktemp("tiny_glm_run")
    # ~100 s on 2 idle cores (issue 20's CI budget).
    proc = run_train(["--recipe", "tiny_glm_cpu", f"train.output_dir={run_dir}"], timeout=600)
    return TinyRun(run_dir, proc.stdout)
