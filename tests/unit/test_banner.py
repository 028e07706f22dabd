"""The start-up banner's numbers against the models actually built, and its lines."""

from __future__ import annotations

from pathlib import Path

import pytest

from megatron_vlm.config import apply_overrides
from megatron_vlm.recipes import get_recipe
from megatron_vlm.training.banner import param_summary, startup_banner


def _unique_numel(module) -> int:
    seen, total = set(), 0
    for p in module.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            total += p.numel()
    return total


@pytest.mark.parametrize("recipe", ["tiny_cpu", "tiny_text_cpu"])
def test_param_counts_equal_the_built_model(recipe, megatron_groups):
    from megatron_vlm.training.model_setup import build_model_chunks

    job = get_recipe(recipe)
    (model,) = build_model_chunks(job, wrap_ddp=False)
    summary = param_summary(job)
    assert summary.total == _unique_numel(model)
    if job.model.is_vlm:
        assert summary.vision == _unique_numel(model.vision_tower)
        assert summary.projector == _unique_numel(model.projector)
    # Active per token: the routed experts a token does not reach are left out.
    llm = job.model.llm
    expert = 3 * llm.hidden_size * llm.moe_ffn_hidden_size
    idle = llm.num_moe_layers * (llm.num_experts - llm.moe_router_topk) * expert
    assert summary.total - summary.active == idle


def test_banner_lines_name_layout_resume_and_init(tmp_path):
    job = apply_overrides(get_recipe("kimi_k25"), ["checkpoint.init_from=/ckpt/import"])
    lines = startup_banner(job, world_size=1024, dp_size=8, kernels="backend=te", tokenizer="tok",
                           data_lines=["data: x"], checkpoint_root=tmp_path / "ck",
                           resume_from=None, resume_step=0, threads=8)
    text = "\n".join(lines)
    # K2's LLM (1,026,408,209,408) + MoonViT + projector.
    assert "params: 1,026,879,353,328 total (1.03T)" in text
    assert "layout: world 1024 = tp 8 x pp 16 x cp 1 x dp 8 (ep 8, etp 1, sp on" in text
    assert "resume: none, starting at step 0 from the weights of /ckpt/import" in text
    assert "LLM 1.03T (32.9B active)" in text
    resumed = startup_banner(job, world_size=1024, dp_size=8, kernels="k", tokenizer="t",
                             data_lines=[], checkpoint_root=Path("/c"),
                             resume_from=Path("/c/step_0000500"), resume_step=500, threads=1)
    assert "resume: /c/step_0000500 at step 500" in resumed
