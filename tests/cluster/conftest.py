"""Fixtures of the cluster tests."""

from __future__ import annotations

from pathlib import Path

import pytest
from slurm_stand_ins import install


@pytest.fixture
def fake_slurm(tmp_path) -> Path:
    """A directory with the SLURM stand-ins in ``bin/`` (see ``slurm_stand_ins.py``)."""
    return install(tmp_path / "fake_slurm")
