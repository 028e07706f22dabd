"""Recipes: functions returning a JobConfig. Import only ``megatron_vlm.config``."""

from __future__ import annotations

import importlib
from collections.abc import Callable

from megatron_vlm.config import JobConfig
from megatron_vlm.config.families import FAMILY_MODULES
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


def family_recipes() -> dict[str, Callable[[], JobConfig]]:
    """Recipes the registered families declare: ``<family package>.recipes.RECIPES`` for each
    family of ``config/families.py`` that has a ``recipes`` module (Kimi's stay above)."""
    out: dict[str, Callable[[], JobConfig]] = {}
    for module in FAMILY_MODULES.values():
        try:
            recipes = importlib.import_module(module + ".recipes")
        except ModuleNotFoundError as err:
            if err.name != module + ".recipes":
                raise
            continue
        out.update(getattr(recipes, "RECIPES", {}))
    return out


def recipe_names() -> list[str]:
    """Every recipe name: the ones above and the families'."""
    return sorted({**RECIPES, **family_recipes()})


def get_recipe(name: str) -> JobConfig:
    """The JobConfig of recipe ``name`` (here, else a family's), with a helpful error for
    unknown names."""
    if name in RECIPES:
        return RECIPES[name]()
    recipes = family_recipes()
    if name not in recipes:
        raise ValueError(f"unknown recipe {name!r}; choose one of {recipe_names()}")
    return recipes[name]()
