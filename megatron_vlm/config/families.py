"""The registry of model families: the one line a new family adds.

``model.family`` names one entry. Each entry is the import path of the family's package under
``megatron_vlm/families/``; that package's ``config`` module declares the dataclasses of
``model.vision`` and ``model.projector`` (``VISION_CONFIG``, ``PROJECTOR_CONFIG``) and imports
nothing but ``megatron_vlm.config``, so reading a job's YAML never builds a model. The family
itself (tower, projector, position ids, media rules, template, HF table, recipes) is declared in
the package's ``family`` module as ``FAMILY`` (``megatron_vlm.families.get_family``).

Families defined outside the package (a team's own tower; the test suite's toy family) are added
with :func:`register_family`, or for every process of a run with the environment variable
``MEGATRON_VLM_FAMILIES="name=package[,name=package]"`` (read when a name is looked up).
"""

from __future__ import annotations

import importlib
import os

FAMILY_MODULES: dict[str, str] = {
    "kimi": "megatron_vlm.families.kimi",
    "keye": "megatron_vlm.families.keye",
    "glm": "megatron_vlm.families.glm",
    "internvl": "megatron_vlm.families.internvl",
}
"""Family name -> its package. Kimi K2.5 / Kimi-VL is the default family."""

DEFAULT_FAMILY = "kimi"
"""``model.family`` when a config does not name one (every config before families existed)."""


def register_family(name: str, module: str) -> None:
    """Add a family at run time (tests' toy families; plugins). Refuses to rebind a name."""
    if FAMILY_MODULES.get(name, module) != module:
        raise ValueError(f"model family {name!r} is already registered as "
                         f"{FAMILY_MODULES[name]}; choose another name")
    FAMILY_MODULES[name] = module


PLUGIN_ENV = "MEGATRON_VLM_FAMILIES"
"""Environment variable naming families outside the package: ``name=package,...``."""


def _register_from_env() -> None:
    for entry in filter(None, (e.strip() for e in os.environ.get(PLUGIN_ENV, "").split(","))):
        name, sep, module = entry.partition("=")
        if not (sep and name.strip() and module.strip()):
            raise ValueError(f"{PLUGIN_ENV}={os.environ[PLUGIN_ENV]!r}: each entry is "
                             "name=package (e.g. myvit=my_pkg.families.myvit)")
        register_family(name.strip(), module.strip())


def family_module(name: str) -> str:
    """The package of family ``name``; a clear error naming the registered ones."""
    if name not in FAMILY_MODULES:
        _register_from_env()
    try:
        return FAMILY_MODULES[name]
    except KeyError:
        raise ValueError(f"model.family={name!r} is not a registered family; choose one of "
                         f"{sorted(FAMILY_MODULES)} (megatron_vlm/config/families.py)") from None


def family_config_types(name: str) -> tuple[type, type]:
    """(``model.vision`` dataclass, ``model.projector`` dataclass) of family ``name``."""
    module = importlib.import_module(family_module(name) + ".config")
    return module.VISION_CONFIG, module.PROJECTOR_CONFIG
