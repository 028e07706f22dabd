"""The transformers Kimi K2.5 processor fixture (tests/fixtures/kimi_k25_processor.{json,npz}),
written by tests/fixtures/make_kimi_processor_fixture.py in an environment that has torchvision.
The suite compares against it instead of importing transformers' torchvision-only processors."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import numpy as np

FIXTURES = Path(__file__).resolve().parent / "fixtures"


@lru_cache(maxsize=1)
def kimi_processor_fixture() -> dict:
    """The fixture's JSON (inputs and transformers' outputs; see the generator's docstring)."""
    return json.loads((FIXTURES / "kimi_k25_processor.json").read_text())


@lru_cache(maxsize=1)
def kimi_processor_arrays() -> dict[str, np.ndarray]:
    """The fixture's pixel arrays (``image_<k>_pixels``, ``video_<name>_pixels``)."""
    with np.load(FIXTURES / "kimi_k25_processor.npz") as data:
        return {k: data[k] for k in data.files}
