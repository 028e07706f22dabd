"""Model families: each a package declaring its parts (``base.ModelFamily``), found by name.

``get_family(model.family)`` is how the trainer, converter and planner reach a family; the
names are registered in ``megatron_vlm/config/families.py`` (one line per family).
"""

from __future__ import annotations

import importlib

from megatron_vlm.config.families import FAMILY_MODULES, family_module
from megatron_vlm.families.base import ModelFamily


def get_family(name: str) -> ModelFamily:
    """The declared family ``name`` (``FAMILY`` of its package's ``family`` module; the package
    itself stays light so reading its ``config`` builds nothing)."""
    module = importlib.import_module(family_module(name) + ".family")
    family = getattr(module, "FAMILY", None)
    if not isinstance(family, ModelFamily):
        raise ValueError(f"{module.__name__} declares no FAMILY (a families.base.ModelFamily)")
    if family.name != name:
        raise ValueError(f"{module.__name__}.FAMILY is named {family.name!r}, registered as "
                         f"{name!r}; make them equal")
    return family


def family_media_rules(name: str, multimodal=None):
    """The data-side rules (``data/media_rules.py``) of family ``name`` for the data config
    ``multimodal`` (None: the family's defaults); Kimi K2.5's for a family that declares none."""
    from megatron_vlm.data.media_rules import kimi_media_rules

    return (get_family(name).media_rules or kimi_media_rules)(multimodal)


def family_costs(name: str):
    """The FLOPs and memory model of family ``name`` (its light ``costs`` module: importing
    it builds no model, so the planner stays fast)."""
    return importlib.import_module(family_module(name) + ".costs")


def family_names() -> list[str]:
    """Registered family names, sorted."""
    return sorted(FAMILY_MODULES)


__all__ = ["ModelFamily", "family_costs", "family_media_rules", "family_names", "get_family"]
