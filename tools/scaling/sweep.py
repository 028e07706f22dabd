"""Sweep definitions (YAML) expanded into training runs, each one or more phases of
``python -m megatron_vlm.train`` arguments.

A sweep file::

    name: early_fusion_tiny
    recipe: tiny_vlm_cpu             # every run starts from this recipe
    output_dir: runs/scaling/early_fusion_tiny
    mixes:                           # extra data.multimodal stage mixes (StageMix fields)
      early10: {weights: {image_caption: 0.5, text: 1.0}, vision_token_fraction: 0.10}
    overrides: [train.eval_interval=0, ...]     # every run
    axes:                            # the runs are the cartesian product of the axes
      fusion:                        # a named axis: value name -> overrides and/or phases
        early10: [data.multimodal.stage=early10]
        late30:
          phases:                    # vision injected at 2/3 of the run
            - {until: 0.6667, overrides: [data.multimodal.stage=text_only]}
            - {overrides: [data.multimodal.stage=late30]}
      train.steps: [30, 60, 120]     # a config path: one run per value
    metrics: [valid/loss/text, valid/loss/image_caption]   # fitted and plotted
    group_by: [fusion]               # one curve per group
    smoke:                           # a seconds-long version (tests, first try)
      overrides: [data.global_batch_size=2]
      axes: {train.steps: [4]}

Axes cover model sizes (named values setting ``model.llm.*``), token budgets
(``train.steps``), the vision:text ratio and the injection point (mixes and phases), the learning
rate (``optim.lr``). A phase other than the last stops at ``until`` x the run's steps
(``train.exit_after_steps``); the next phase resumes its checkpoint with
``checkpoint.load_data_state=false`` (a fresh data stream for the new mix, seed shifted) while
the model, optimizer and LR schedule continue.
"""

from __future__ import annotations

import itertools
import json
import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import yaml


@dataclass(frozen=True)
class Phase:
    """One invocation of the trainer."""

    args: tuple[str, ...]
    """Arguments of ``python -m megatron_vlm.train``."""
    end_step: int
    """Step this phase stops at."""


@dataclass(frozen=True)
class Run:
    """One point of the sweep."""

    name: str
    tags: dict[str, str]
    """Axis name -> value name."""
    output_dir: str
    steps: int
    phases: tuple[Phase, ...]


@dataclass
class Sweep:
    """A parsed sweep file."""

    name: str
    recipe: str
    output_dir: str
    runs: list[Run]
    metrics: list[str] = field(default_factory=lambda: ["valid/loss/text"])
    group_by: list[str] = field(default_factory=list)
    source: dict = field(default_factory=dict, repr=False)


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=+-]", "_", text)


def _axis_values(axis: str, spec) -> list[tuple[str, dict]]:
    """``[(value name, {"overrides": [...], "phases": [...] | None}), ...]`` of one axis."""
    if isinstance(spec, list):
        if "." not in axis:
            raise ValueError(f"axis {axis!r}: a list of values needs a config path as the axis "
                             "name (e.g. train.steps); use a mapping for named values")
        return [(str(v), {"overrides": [f"{axis}={v}"], "phases": None}) for v in spec]
    if not isinstance(spec, dict) or not spec:
        raise ValueError(f"axis {axis!r}: give a list of values or a mapping name -> overrides")
    out = []
    for name, value in spec.items():
        if isinstance(value, list):
            out.append((str(name), {"overrides": [str(v) for v in value], "phases": None}))
        elif isinstance(value, dict):
            unknown = set(value) - {"overrides", "phases"}
            if unknown:
                raise ValueError(f"axis {axis!r} value {name!r}: unknown keys {sorted(unknown)}")
            out.append((str(name), {"overrides": [str(v) for v in value.get("overrides", [])],
                                    "phases": value.get("phases")}))
        else:  # a user's file: ValueError like every other malformed entry
            msg = f"axis {axis!r} value {name!r}: give a list of overrides or a mapping"
            raise ValueError(msg + " with overrides/phases")  # noqa: TRY004
    return out


def _phases(spec: list | None, steps: int, where: str) -> list[tuple[int, list[str]]]:
    """``[(end step, overrides)]``; one phase to ``steps`` when ``spec`` is None."""
    if not spec:
        return [(steps, [])]
    out, previous = [], 0
    for i, phase in enumerate(spec):
        last = i == len(spec) - 1
        if last:
            if "until" in phase:
                raise ValueError(f"{where}: the last phase runs to the end; drop its 'until'")
            end = steps
        else:
            until = float(phase["until"])
            if not 0.0 < until < 1.0:
                raise ValueError(f"{where}: phase {i} until={until} must be in (0, 1)")
            end = round(until * steps)
        if end <= previous:
            raise ValueError(f"{where}: phase {i} would run no step ({previous} -> {end} of "
                             f"{steps}); raise train.steps or move 'until'")
        out.append((end, [str(v) for v in phase.get("overrides", [])]))
        previous = end
    return out


def _steps_of(recipe: str, overrides: list[str]) -> int:
    from megatron_vlm.train import build_job, parse_args

    return build_job(parse_args(["--recipe", recipe, *overrides])).train.steps


def load_sweep(path: str | Path, smoke: bool = False, out_dir: str | None = None) -> Sweep:
    """Parse a sweep file into runs (``smoke``: with its ``smoke`` section applied;
    ``out_dir`` replaces the file's output directory).

    Raises:
        ValueError: a malformed file, or a run the train CLI would refuse (checked here,
            before anything runs).
    """
    source = yaml.safe_load(Path(path).read_text())
    name = source["name"]
    recipe = source["recipe"]
    output_dir = source.get("output_dir", f"runs/scaling/{name}")
    axes = dict(source.get("axes", {}))
    overrides = [str(v) for v in source.get("overrides", [])]
    if smoke:
        smoke_spec = source.get("smoke") or {}
        overrides += [str(v) for v in smoke_spec.get("overrides", [])]
        axes.update(smoke_spec.get("axes", {}))
        output_dir = smoke_spec.get("output_dir", output_dir + "_smoke")
    output_dir = str(out_dir) if out_dir is not None else output_dir
    if source.get("mixes"):
        mixes = json.dumps(source["mixes"], separators=(",", ":"))
        # Extra stage mixes join the recipe's (the override replaces the whole mapping).
        overrides.insert(0, f"data.multimodal.mixes={_merged_mixes(recipe, mixes)}")
    expanded = [[(axis, *value) for value in _axis_values(axis, spec)]
                for axis, spec in axes.items()]
    runs = []
    for combo in itertools.product(*expanded) if expanded else [()]:
        tags = {axis: value for axis, value, _ in combo}
        run_name = ",".join(f"{a}={v}" for a, v in tags.items()) or "run"
        run_dir = str(Path(output_dir) / _safe(run_name))
        common = list(overrides)
        phase_spec = None
        for _axis, _value, spec in combo:
            common += spec["overrides"]
            if spec["phases"]:
                if phase_spec is not None:
                    raise ValueError(f"run {run_name}: two axes define phases")
                phase_spec = spec["phases"]
        steps = _steps_of(recipe, common)
        phases = []
        for i, (end, extra) in enumerate(_phases(phase_spec, steps, run_name)):
            args = ["--resume"] if i else []
            args += ["--recipe", recipe, *common, *extra, f"train.output_dir={run_dir}"]
            if i:  # continue model/optimizer/schedule; the new mix starts a fresh stream
                args += ["checkpoint.load_data_state=false", f"data.seed={1234 + i}"]
            if end < steps:
                args.append(f"train.exit_after_steps={end - (phases[-1].end_step if i else 0)}")
            _steps_of(recipe, [a for a in args if a not in ("--resume", "--recipe", recipe)])
            phases.append(Phase(args=tuple(args), end_step=end))
        runs.append(Run(name=run_name, tags=tags, output_dir=run_dir, steps=steps,
                        phases=tuple(phases)))
    return Sweep(name=name, recipe=recipe, output_dir=output_dir, runs=runs,
                 metrics=list(source.get("metrics", ["valid/loss/text"])),
                 group_by=list(source.get("group_by", [])), source=source)


def _merged_mixes(recipe: str, extra_json: str) -> str:
    """The recipe's stage mixes plus ``extra_json``'s, as one JSON override value."""
    import dataclasses

    from megatron_vlm.recipes import get_recipe

    job = get_recipe(recipe)
    if job.data.multimodal is None:
        raise ValueError(f"recipe {recipe!r} has no multimodal data: 'mixes' needs a VLM recipe")
    mixes = {k: dataclasses.asdict(v) for k, v in job.data.multimodal.mixes.items()}
    mixes.update(json.loads(extra_json))
    return json.dumps(mixes, separators=(",", ":"))


def write_array_files(sweep: Sweep, directory: str | Path) -> list[Path]:
    """One SLURM array file per phase: ``<name>.phase<k>.txt``, line ``i`` = the ``k``-th
    invocation of the ``i``-th run that has one (``tools/launch.py --array-file``); returns
    the files written. Submit phase ``k+1`` after phase ``k`` (``--sbatch
    --dependency=afterok:<job id>``)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    depth = max(len(r.phases) for r in sweep.runs)
    paths = []
    for k in range(depth):
        lines = [(f"# {sweep.name} phase {k}: python -m megatron_vlm.train arguments, one run "
                  "per line")]
        lines += [shlex.join(r.phases[k].args) for r in sweep.runs if len(r.phases) > k]
        path = directory / f"{sweep.name}.phase{k}.txt"
        path.write_text("\n".join(lines) + "\n")
        paths.append(path)
    return paths
