"""What a model family declares, in one place (the interface the trainer, converter and
planner use).

A family is the unit our users pick: Kimi K2.5 / Kimi-VL, Keye-VL 1.5, GLM-4.5V, InternVL3.5.
Each lives in its own package ``megatron_vlm/families/<name>/`` with

* ``config.py``: the dataclasses of ``model.vision`` and ``model.projector``
  (``VISION_CONFIG``, ``PROJECTOR_CONFIG``; imports only ``megatron_vlm.config``);
* ``family.py``: ``FAMILY``, a :class:`ModelFamily` naming its parts (the package's
  ``__init__.py`` stays light);

* ``costs.py``: its FLOPs and memory model (imports only config and planning, so the planner
  never builds a model);

and one line in ``megatron_vlm/config/families.py``. Everything else in the package reaches a
family through :func:`megatron_vlm.families.get_family`, never by its name.

The LLM is not a family part of its own: every family's LLM is a megatron ``GPTModel`` built
from ``model.llm`` (``models/llm.py``), whose options (MLA or GQA, MoE, RoPE or M-RoPE) cover
the families' language models.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Literal

from megatron_vlm.config.model import ModelConfig
from megatron_vlm.config.parallel import ParallelConfig

TowerBuilder = Callable[..., Any]
"""``(model: ModelConfig, parallel: ParallelConfig, *, pg_collection, choice) -> tower``: the
vision tower of the first pipeline stage; ``tower(pixel_values, grid_thw)`` returns one feature
row per patch, in the order the projector merges them."""
ProjectorBuilder = Callable[..., Any]
"""``(model: ModelConfig, parallel: ParallelConfig, *, pg_collection) -> projector``:
``projector(features)`` returns one LLM-width row per placeholder token, item order."""


@dataclass(frozen=True, kw_only=True)
class ModelFamily:
    """The parts of one model family. Names are the values of ``model.family``."""

    name: str
    """Registry name (``model.family``)."""
    summary: str
    """One line for banners and ``--help``: the released models it covers."""
    vision_config: type
    """Dataclass of ``model.vision`` (MoonViT's ``VisionConfig``, SigLIP's, ...)."""
    projector_config: type
    """Dataclass of ``model.projector``."""
    build_vision_tower: TowerBuilder
    """The vision tower of a pipeline's first stage (see :data:`TowerBuilder`)."""
    build_projector: ProjectorBuilder
    """The vision -> LLM projector (see :data:`ProjectorBuilder`)."""
    llm_tokens_per_item: Callable[[Any, Any], Any]
    """``(model.vision, grid_thw [M, 3]) -> [M]``: LLM placeholder tokens each media item
    becomes (Kimi: ``h*w/4``, frames pooled; Keye: ``t*h*w/4``, one block per frame). The data
    side plans the same counts; the model checks them."""
    costs: ModuleType
    """The FLOPs and memory model of the tower and projector (the family's ``costs`` module,
    light: config and planning imports only), for the planner, banner and MFU: ``vision_flops
    (vision, projector, budget) -> dict``, ``vision_tensors(vision, projector, dtype, tp, ...)
    -> list[ParamTensor]``, ``vision_bytes(vision, projector, budget, ...)`` (activations) and
    ``step_flops(vision, llm_hidden_size, grid_thw) -> float``."""
    position_ids: Literal["rope", "mrope"] = "rope"
    """1D RoPE ids per document, or 3-axis M-RoPE ids built by the family's position rule."""
    media_rules: Callable[[Any], Any] | None = None
    """``(data.multimodal config or None) -> MediaRules`` (``data/media_rules.py``): the data
    side's template, media sizing, video items, special tokens and position rule, which the
    trainer hands to the tokenizer and the multimodal loader. None: Kimi K2.5's
    (``media_rules.kimi_media_rules``)."""
    hf_architectures: tuple[str, ...] = ()
    """HF ``architectures`` this family imports and exports (``convert/tables.py``)."""
    recipes: tuple[str, ...] = ()
    """Names of its recipes (``recipes/``), real sizes and the tiny CPU ones."""
    notes: dict[str, Any] | None = None
    """Free-form facts for docs and banners (sources, what differs from the paper)."""

    def __post_init__(self) -> None:
        if not self.name.isidentifier():
            raise ValueError(f"family name {self.name!r} must be an identifier")

    def check_model(self, model: ModelConfig) -> None:
        """Refuse a model config that is not this family's (a clear error, not a crash)."""
        if model.family != self.name:
            raise ValueError(f"model.family={model.family!r} handed to family {self.name!r}")

    def build_vlm(self, model: ModelConfig, parallel: ParallelConfig, **stage: Any):
        """One pipeline stage of this family's VLM (``models/vlm.py``'s
        ``VisionLanguageModel`` with this family's tower and projector); ``stage``:
        ``pre_process``, ``post_process``, ``vp_stage``, ``pg_collection``, ``choice``."""
        from megatron_vlm.models.vlm import VisionLanguageModel

        self.check_model(model)
        return VisionLanguageModel(model, parallel, build_vision_tower=self.build_vision_tower,
                                   build_projector=self.build_projector,
                                   llm_tokens_per_item=self.llm_tokens_per_item, **stage)
