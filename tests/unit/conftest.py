"""Fixtures shared by the unit tests."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def megatron_groups():
    """World-size-1 process groups; reused when another test module already made them."""
    from megatron_vlm.parallel.init import ensure_single_process_groups

    ensure_single_process_groups()
