"""Recipes: functions returning a JobConfig. Import only ``megatron_vlm.config``."""

from __future__ import annotations

from collections.abc import Callable

from megatron_vlm.config import JobConfig
from megatron_vlm.recipes.kimi import (
    kimi_k25,
    kimi_k25_32k,
    kimi_k25_128k,
    kimi_k25_512,
    kimi_vl_a3b,
)
from megatron_vlm.recipes.stages import TINY_STAGES
from megatron_vlm.recipes.tiny import tiny_cpu, tiny_text_cpu, tiny_vlm_cpu

RECIPES: dict[str, Callable[[], JobConfig]] = {
    "tiny_cpu": tiny_cpu,
    "tiny_text_cpu": tiny_text_cpu,
    "tiny_vlm_cpu": tiny_vlm_cpu,
    "kimi_vl_a3b": kimi_vl_a3b,
    "kimi_k25": kimi_k25,
    "kimi_k25_512": kimi_k25_512,
    "kimi_k25_32k": kimi_k25_32k,
    "kimi_k25_128k": kimi_k25_128k,
    **TINY_STAGES,  # staged pretraining (a)->(d) of the tiny VLM (tools/run_stages.py)
}


def get_recipe(name: str) -> JobConfig:
    """The JobConfig of recipe ``name``, with a helpful error for unknown names."""
    if name not in RECIPES:
        raise ValueError(f"unknown recipe {name!r}; choose one of {sorted(RECIPES)}")
    return RECIPES[name]()
