"""JobConfig joins the per-concern configs; dotted overrides and YAML for saving what ran."""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from typing import Any

import yaml

from megatron_vlm.config.checkpoint import CheckpointConfig
from megatron_vlm.config.data import DataConfig
from megatron_vlm.config.model import ModelConfig, adopt_legacy_qk_clip_tau
from megatron_vlm.config.optim import OptimConfig
from megatron_vlm.config.parallel import ParallelConfig
from megatron_vlm.config.train import TrainConfig


@dataclass(kw_only=True)
class JobConfig:
    """Everything one run needs; built by a recipe, edited by overrides, saved as YAML."""

    name: str = "job"
    """Recipe name (for logs)."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """Model."""
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    """Parallel layout."""
    data: DataConfig = field(default_factory=DataConfig)
    """Data and packing."""
    optim: OptimConfig = field(default_factory=OptimConfig)
    """Optimizer and schedule."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Loop, logging, failure policy."""
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    """Checkpointing."""

    def __post_init__(self) -> None:
        llm = self.model.llm
        # Layouts the model cannot run (heads, widths, experts, layers per stage, ViT heads,
        # sequence alignment) are refused here, before any process group or model exists.
        self.parallel.check_model(self.model, seq_length=self.data.seq_length,
                                  pad_to_multiple=self.data.pad_to_multiple)
        # QK-Clip's one tau is model.llm.qk_clip_threshold; fold the legacy optim field into it.
        adopt_legacy_qk_clip_tau(self.model.llm, self.optim.qk_clip_tau, "optim.qk_clip_tau")
        self.optim.qk_clip_tau = None
        if self.data.multimodal is not None and not self.model.is_vlm:
            raise ValueError("data.multimodal needs a VLM: set model.vision and model.projector "
                             "(e.g. --recipe tiny_cpu)")
        if not self.model.is_vlm and (self.optim.vision_lr_mult != 1.0
                                      or self.optim.projector_lr_mult != 1.0
                                      or self.optim.llm_lr_mult != 1.0):
            raise ValueError("optim.*_lr_mult apply to a VLM's modules; for a text-only model "
                             "set optim.lr instead")
        if self.data.seq_length > llm.max_position_embeddings:
            raise ValueError(
                f"data.seq_length={self.data.seq_length} exceeds model.llm.max_position_embeddings="
                f"{llm.max_position_embeddings}; raise the latter or enable YaRN"
            )
        if self.optim.warmup_steps >= self.train.steps:
            raise ValueError(
                f"optim.warmup_steps={self.optim.warmup_steps} must be < train.steps="
                f"{self.train.steps}; lower optim.warmup_steps or raise train.steps")

    def check_inputs(self) -> None:
        """Refuse a real-size run that lacks its tokenizer or data (``data.require_inputs``).

        Called at start-up (and by the launcher), not in ``__post_init__``, so ``--print-config``
        and the planner still read real recipes without their data.
        """
        missing = self.data.missing_inputs()
        if missing:
            raise ValueError(
                f"recipe {self.name} trains on real data and needs {' and '.join(missing)}, e.g. "
                "data.tokenizer=/ckpt/Kimi-K2.5 (tiktoken.model + tokenizer_config.json) "
                "data.multimodal.root=/data/shards (made by tools/prepare_data.py); real-size "
                "recipes never fall back to the bundled toy corpus")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


def _field_types(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _dataclass_of(tp: Any) -> type | None:
    """The dataclass type in an annotation (``X`` or ``X | None``), else None."""
    if dataclasses.is_dataclass(tp):
        return tp
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        for arg in typing.get_args(tp):
            if dataclasses.is_dataclass(arg):
                return arg
    return None


def _section_class(cls: type, key: str, data: dict[str, Any], annotation: Any) -> type | None:
    """The dataclass of field ``key`` of ``cls``: what ``cls.section_type`` says from the
    section's own dict ``data`` (``ModelConfig``: the family's tower and projector types), else
    the one in the annotation."""
    hook = getattr(cls, "section_type", None)
    chosen = hook(key, data) if hook is not None else None
    return chosen if chosen is not None else _dataclass_of(annotation)


def from_dict(cls: type, data: dict[str, Any]) -> Any:
    """Build dataclass ``cls`` from a nested dict, rejecting unknown keys by name."""
    hints = _field_types(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ValueError(f"unknown config field(s) {sorted(unknown)} for {cls.__name__}; "
                         f"valid: {sorted(names)}")
    kwargs = {}
    for key, value in data.items():
        sub = _section_class(cls, key, data, hints[key])
        if sub is not None and isinstance(value, dict):
            value = from_dict(sub, value)
        elif typing.get_origin(hints[key]) is dict and isinstance(value, dict):
            item = typing.get_args(hints[key])[1]  # dict[str, SomeConfig] (e.g. stage mixes)
            if dataclasses.is_dataclass(item):
                value = {k: from_dict(item, v) if isinstance(v, dict) else v
                         for k, v in value.items()}
        kwargs[key] = value
    return cls(**kwargs)


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check/convert a YAML-parsed override value against the field annotation."""
    args = typing.get_args(tp)
    origin = typing.get_origin(tp)
    if value is None:
        if type(None) in args:
            return None
        raise ValueError(f"override {key}=null but the field is not optional")
    if isinstance(tp, types.UnionType) or origin is typing.Union:
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, key)
            except ValueError:
                continue
        raise ValueError(f"override {key}={value!r} does not match type {_type_name(tp)}")
    if origin is typing.Literal:
        if value not in args:
            raise ValueError(f"override {key}={value!r}: choose one of {list(args)}")
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ValueError(f"override {key}={value!r}: {key} is a section; set its fields "
                             f"({key}.<field>=...) or give a mapping such as {key}={{}}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ValueError(f"override {key}={value!r}: expected true or false")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"override {key}={value!r}: expected an integer")
        return value
    if tp is float:
        if isinstance(value, str):  # YAML 1.1 reads "1e30" (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"override {key}={value!r}: expected a number")
        return float(value)
    if tp is str:
        if isinstance(value, (list, dict)):
            raise ValueError(f"override {key}={value!r}: expected a single string, got a "
                             f"{type(value).__name__}")
        return str(value)
    if origin is list:
        if not isinstance(value, list):
            raise ValueError(f"override {key}={value!r}: expected a list like [1,2]")
        (item,) = args or (Any,)
        return [_coerce(v, item, f"{key}[{i}]") for i, v in enumerate(value)] if args else value
    if origin is dict:
        if not isinstance(value, dict):
            raise ValueError(f"override {key}={value!r}: expected a mapping like {{a: 1}}")
        kt, vt = args or (Any, Any)
        return {k: _coerce(v, vt, f"{key}.{k}") for k, v in value.items()}
    return value


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _literal_strings(tp: Any) -> set[str]:
    """The string choices of a ``Literal`` annotation (also inside ``X | None``)."""
    if typing.get_origin(tp) is typing.Literal:
        return {a for a in typing.get_args(tp) if isinstance(a, str)}
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        return set().union(*(_literal_strings(a) for a in typing.get_args(tp)))
    return set()


def _parse_value(raw: str, tp: Any) -> Any:
    """The override's value as YAML, except that a word naming one of a ``Literal`` field's
    choices stays that word (YAML 1.1 reads ``off``/``on``/``no``/``yes`` as booleans)."""
    if raw.strip() in _literal_strings(tp):
        return raw.strip()
    return yaml.safe_load(raw)


def _step(tp: Any, node: Any, part: str, path: str) -> tuple[Any, Any]:
    """One level down the override path: (annotation of the child, the child's dict node).

    ``tp`` is the annotation of ``node`` (a dataclass, ``X | None``, or ``dict[str, V]``);
    ``node`` its dict in ``JobConfig.to_dict()`` form.
    """
    sub = _dataclass_of(tp)
    if sub is not None:
        hints = _field_types(sub)
        if part not in hints:
            valid = sorted(f.name for f in dataclasses.fields(sub))
            raise ValueError(f"unknown config field {path!r}; valid here: {valid}")
        chosen = _section_class(sub, part, node if isinstance(node, dict) else {}, None)
        if chosen is not None:  # ModelConfig's vision/projector: the family's types
            return chosen | None, node
        return hints[part], node
    if typing.get_origin(tp) is dict:
        return typing.get_args(tp)[1] if typing.get_args(tp) else Any, node
    raise ValueError(f"{path.rsplit('.', 1)[0]!r} is a value, not a config section")


def apply_overrides(job: JobConfig, overrides: list[str]) -> JobConfig:
    """Apply ``a.b.c=value`` overrides (values parsed as YAML) and re-validate.

    A path walks dataclass fields and, through ``dict[str, X]`` fields, their keys
    (``data.multimodal.mixes.joint.weights.text=0.5``). An optional section that is null in the
    recipe is created with ``section={}`` (then set its fields), and removed with ``section=null``.
    """
    data = job.to_dict()
    for item in overrides:
        if "=" not in item:
            raise ValueError(f"override {item!r} must look like section.field=value")
        key, raw = item.split("=", 1)
        key = key.strip()
        parts = key.split(".")
        tp: Any = JobConfig
        node: Any = data
        for i, part in enumerate(parts):
            path = ".".join(parts[: i + 1])
            in_dict = typing.get_origin(tp) is dict
            tp, _ = _step(tp, node, part, path)
            if i == len(parts) - 1:
                value = _coerce(_parse_value(raw, tp), tp, key)
                sub = _dataclass_of(tp)
                if sub is not None and isinstance(value, dict):
                    # Validate now, with defaults for what the mapping leaves out.
                    value = dataclasses.asdict(from_dict(sub, value))
                node[part] = value
                break
            child = node.get(part) if isinstance(node, dict) else None
            if child is None:
                if in_dict:
                    parent = path.rsplit(".", 1)[0]
                    raise ValueError(f"{parent} has no entry {part!r} (it has "
                                     f"{sorted(node)}); add the whole entry with {path}={{...}}")
                raise ValueError(f"{path} is null in this config; create it with {path}={{}} "
                                 f"(defaults) before setting {key}, or pick a recipe that has it")
            node = child
    return from_dict(JobConfig, data)


def load_yaml(path: str) -> JobConfig:
    """Load a JobConfig saved with :meth:`JobConfig.to_yaml`."""
    with open(path) as f:
        return from_dict(JobConfig, yaml.safe_load(f))
