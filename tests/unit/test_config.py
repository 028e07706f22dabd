"""Config validation: errors name the field and the fix; overrides are typed; YAML round-trips."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from megatron_vlm.config import JobConfig, ModelConfig, apply_overrides, load_yaml
from megatron_vlm.config.families import FAMILY_MODULES, family_config_types
from megatron_vlm.config.job import _dataclass_of
from megatron_vlm.recipes import RECIPES, get_recipe

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipes_validate_and_roundtrip_yaml(name, tmp_path):
    job = get_recipe(name)
    path = tmp_path / "job.yaml"
    path.write_text(job.to_yaml())
    assert load_yaml(str(path)) == job


def test_overrides_apply_with_types():
    job = apply_overrides(get_recipe("tiny_text_cpu"), [
        "train.steps=17", "optim.lr=0.01", "model.llm.q_lora_rank=null",
        "optim.schedule=wsd", "model.llm.yarn.factor=4",
    ])
    assert job.train.steps == 17 and job.optim.lr == 0.01 and job.model.llm.q_lora_rank is None
    assert job.optim.schedule == "wsd" and job.model.llm.yarn.factor == 4.0


@pytest.mark.parametrize(
    "override, must_contain",
    [
        ("parallel.tp=3", ["parallel.tp=3", "num_attention_heads=4", "choose tp in [1, 2, 4]"]),
        ("parallel.ep=3", ["parallel.ep=3", "num_experts=8"]),
        ("parallel.tp=2", ["sequence_parallel=true"]),
        ("model.llm.moe_router_topk=9", ["moe_router_topk=9", "num_experts=8"]),
        ("optim.min_lr=1.0", ["min_lr", "lr"]),
        ("data.seq_length=4096", ["seq_length=4096", "max_position_embeddings"]),
        ("optim.schedule=linear", ["choose one of", "cosine", "wsd"]),
        ("train.stepz=3", ["train.stepz", "steps"]),
        ("train.steps=abc", ["train.steps", "integer"]),
        ("model.llm.num_dense_layers=9", ["num_dense_layers=9", "num_layers=3"]),
    ],
)
def test_config_errors_name_field_and_fix(override, must_contain):
    with pytest.raises(ValueError) as err:
        apply_overrides(get_recipe("tiny_text_cpu"), [override])
    for text in must_contain:
        assert text in str(err.value), (text, str(err.value))


def test_cli_reports_config_error_without_traceback():
    proc = subprocess.run(
        [sys.executable, "-m", "megatron_vlm.train", "--recipe", "tiny_text_cpu", "parallel.tp=3"],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2
    assert "config error: parallel.tp=3 does not divide" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_data_parallel_size_derivation():
    job = get_recipe("tiny_text_cpu")
    assert job.parallel.data_parallel_size(4) == 4
    with pytest.raises(ValueError, match="not divisible by tp\\*pp\\*cp"):
        apply_overrides(
            job, ["parallel.pp=3", "model.llm.num_layers=3"]).parallel.data_parallel_size(4)
    assert isinstance(job, JobConfig)


def test_warmup_longer_than_run_is_a_config_error():
    with pytest.raises(ValueError, match="optim.warmup_steps=10 must be < train.steps=6"):
        apply_overrides(get_recipe("tiny_text_cpu"), ["train.steps=6"])


def test_overrides_reach_dict_entries():
    """``dict[str, X]`` fields are walked by key (stage mixes, their weights, dataset paths)."""
    job = apply_overrides(get_recipe("tiny_cpu"), [
        "data.multimodal.mixes.joint.weights.text=0.5", "data.multimodal.datasets.video=/d/v",
        "data.multimodal.mixes.late={weights: {text: 1.0}, unit: samples}",
        "data.multimodal.stage=late"])
    mm = job.data.multimodal
    assert mm.mixes["joint"].weights["text"] == 0.5 and mm.datasets == {"video": "/d/v"}
    assert mm.mixes["late"].weights == {"text": 1.0} and mm.mixes["late"].unit == "samples"
    assert mm.mix is mm.mixes["late"]
    with pytest.raises(ValueError, match=r"mixes has no entry 'nope' \(it has \['alignment'"):
        apply_overrides(get_recipe("tiny_cpu"), ["data.multimodal.mixes.nope.weights.text=1"])
    with pytest.raises(ValueError, match="expected a number"):
        apply_overrides(get_recipe("tiny_cpu"), ["data.multimodal.mixes.joint.weights.text=[1]"])


def test_override_under_a_null_section_is_a_config_error_and_can_create_it():
    text = get_recipe("tiny_text_cpu")
    with pytest.raises(ValueError, match=r"data.multimodal is null.*data.multimodal=\{\}"):
        apply_overrides(text, ["data.multimodal.num_workers=0"])
    with pytest.raises(ValueError, match="model.vision is null"):
        apply_overrides(text, ["model.vision.hidden_size=8"])
    vlm = get_recipe("tiny_cpu")
    # Creating a section validates it with its defaults; removing it with null.
    with pytest.raises(ValueError, match="data.multimodal needs a VLM"):
        apply_overrides(text, ["data.multimodal={}"])
    assert apply_overrides(vlm, ["data.multimodal=null", "model.vision=null",
                                 "model.projector=null"]).data.multimodal is None


def test_a_list_for_a_string_field_is_refused():
    with pytest.raises(ValueError, match="expected a single string, got a list"):
        apply_overrides(get_recipe("tiny_text_cpu"), ["train.output_dir=[a, b]"])
    with pytest.raises(ValueError, match="is a section"):
        apply_overrides(get_recipe("tiny_text_cpu"), ["model.llm=3"])
    assert apply_overrides(get_recipe("tiny_text_cpu"),
                           ["train.output_dir=123"]).train.output_dir == "123"


_KEY = re.compile(r"(?<![\w./])(?:model|parallel|data|optim|train|checkpoint)"
                  r"(?:\.[a-z_][a-z0-9_]*)+(?![\w/])")
_FILE = re.compile(r"\.(?:py|txt|yaml|json|jsonl|model)$")


def _is_config_key(path: str, tp=JobConfig) -> bool:
    """Whether ``a.b.c`` walks JobConfig's fields (and dict entries); ``model.vision`` and
    ``model.projector`` are any registered family's types (``config/families.py``)."""
    parts = path.split(".")
    for i, part in enumerate(parts):
        sub = _dataclass_of(tp)
        if sub is ModelConfig and part in ("vision", "projector"):
            rest = ".".join(parts[i + 1:])
            types = [family_config_types(name)[part != "vision"] for name in FAMILY_MODULES]
            return not rest or any(_is_config_key(rest, t) for t in types)
        if sub is not None:
            hints = typing.get_type_hints(sub)
            if part not in hints:
                return False
            tp = hints[part]
        elif typing.get_origin(tp) is dict:
            tp = typing.get_args(tp)[1]
        else:
            return False
    return True


def test_error_messages_name_real_config_keys():
    """Every ``section.field`` written in a raised error's text is a real config key (messages
    once said ``data_mm.root`` and ``model.yarn.factor``, which are not)."""
    assert not _is_config_key("data_mm.root") and not _is_config_key("model.yarn.factor")
    assert _is_config_key("data.multimodal.mixes.joint.weights")
    bad = []
    for path in sorted((ROOT / "megatron_vlm").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Raise):
                continue
            for const in ast.walk(node):
                if isinstance(const, ast.Constant) and isinstance(const.value, str):
                    bad += [f"{path.relative_to(ROOT)}:{const.lineno}: {key}"
                            for key in _KEY.findall(const.value)
                            if not _FILE.search(key) and not _is_config_key(key)]
    assert not bad, bad


def test_literal_words_that_yaml_reads_as_booleans_stay_words():
    job = apply_overrides(get_recipe("tiny_text_cpu"), ["train.wandb=off"])
    assert job.train.wandb == "off"
    assert apply_overrides(job, ["train.wandb=offline"]).train.wandb == "offline"
    with pytest.raises(ValueError, match="choose one of"):
        apply_overrides(job, ["train.wandb=yes"])
