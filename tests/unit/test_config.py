"""Config validation: errors name the field and the fix; overrides are typed; YAML round-trips."""

from __future__ import annotations

import subprocess
import sys

import pytest

from megatron_vlm.config import JobConfig, apply_overrides, load_yaml
from megatron_vlm.recipes import RECIPES, get_recipe


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
        apply_overrides(job, ["parallel.pp=3", "model.llm.num_layers=3"]).parallel.data_parallel_size(4)
    assert isinstance(job, JobConfig)


def test_warmup_longer_than_run_is_a_config_error():
    with pytest.raises(ValueError, match="optim.warmup_steps=10 must be < train.steps=6"):
        apply_overrides(get_recipe("tiny_text_cpu"), ["train.steps=6"])
