"""Staged pretraining of the tiny VLM (issue 8, item 4), 3 steps per stage, in this process:

weights-only step-0 checkpoint (what ``tools/convert_hf.py import`` writes; built here from another
seed) -> (a) ViT + projector on captions, LLM frozen -> (b) projector only -> (c) everything on
the early-fusion mix -> (d) 2x longer packs with YaRN x2 and 25% long / 75% replay, each stage
``checkpoint.init_from`` the previous one's checkpoints. Checked against the checkpoints' own
tensors (read back with torch DCP, not through our loader): frozen modules bit-identical across
each stage, trained ones moved; the optimizer state loaded for the same trainable set equals the
saved ``exp_avg`` tensors, and is empty for a different set; the run's own resume wins over
``init_from``.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from megatron_vlm.config import apply_overrides
from megatron_vlm.recipes.stages import TINY_STAGE_ORDER

A, B, C, D = TINY_STAGE_ORDER
FAST = ["train.steps=3", "data.global_batch_size=2", "data.seq_length=256", "train.eval_batches=1",
        "train.eval_interval=0", "train.log_interval=1", "train.tensorboard=false",
        "train.plot=false", "optim.warmup_steps=1", "data.multimodal.num_workers=0",
        "data.multimodal.calibration_samples=16",
        # (d) doubles (c)'s packs: 256 -> 512, YaRN's L0 = 256.
        f"{D}:data.seq_length=512", f"{D}:model.llm.yarn.original_max_position_embeddings=256"]
MODULES = ("vision_tower", "projector", "language_model")


def _tensors(ckpt: Path, tmp: Path) -> dict[str, torch.Tensor]:
    out = tmp / f"{ckpt.parent.parent.name}_{ckpt.name}.pt"
    dcp_to_torch_save(str(ckpt), str(out))
    return {k: v for k, v in torch.load(out, weights_only=True).items() if torch.is_tensor(v)}


def _module(tensors: dict, module: str) -> dict:
    return {k: v for k, v in tensors.items() if k.startswith(module + ".")}


def _saved(tensors: dict, prefix: str, name: str) -> torch.Tensor:
    """``name``'s tensor, also where megatron saved it stacked: ViT layers ``layers.N.x`` as
    ``layers.x[N]``, experts ``local_experts.E.x`` as ``experts.x[E]``."""
    if prefix + name in tensors:
        return tensors[prefix + name]
    for pattern, repl in ((r"\.layers\.(\d+)\.", ".layers."),
                          (r"\.local_experts\.(\d+)\.", ".experts.")):
        m = re.search(pattern, name)
        if m and prefix + re.sub(pattern, repl, name) in tensors:
            return tensors[prefix + re.sub(pattern, repl, name)][int(m.group(1))]
    raise KeyError(name)


def _build(job):
    from megatron_vlm.optim.builder import build_optimizer
    from megatron_vlm.optim.schedules import build_scheduler
    from megatron_vlm.training.model_setup import build_model_chunks

    chunks = build_model_chunks(job)
    optimizer = build_optimizer(job.optim, chunks, job.model.params_dtype,
                                job.parallel.use_distributed_optimizer)
    return chunks, optimizer, build_scheduler(job.optim, optimizer, job.train.steps)


@pytest.fixture(scope="module")
def chain(tmp_path_factory):
    from megatron_vlm.checkpoint import save_checkpoint
    from megatron_vlm.parallel.init import init_distributed
    from megatron_vlm.training.model_setup import build_model_chunks
    from megatron_vlm.training.stage_runner import run_stages, stage_jobs

    base = tmp_path_factory.mktemp("stages")
    jobs = stage_jobs(TINY_STAGE_ORDER, base, FAST, init_from=str(base / "import"))
    init_distributed(jobs[0].parallel, jobs[0].train.seed)
    torch.manual_seed(1234)  # not the job's seed: a fresh init cannot pass for the loaded one
    imported = save_checkpoint(base / "import", 0, build_model_chunks(jobs[0]), None, None, {},
                               jobs[0].to_yaml())
    run_stages(jobs, in_process=True)
    ckpts = {j.name: Path(j.train.output_dir) / "checkpoints" / "step_0000003" for j in jobs}
    tensors = {"import": _tensors(imported, base)}
    tensors.update({name: _tensors(path, base) for name, path in ckpts.items()})
    return base, jobs, ckpts, tensors


@pytest.mark.parametrize("stage,previous,frozen", [
    (A, "import", ("language_model",)),
    (B, A, ("vision_tower", "language_model")),
    (C, B, ()),
    (D, C, ()),
])
def test_frozen_bit_identical_trained_moved(chain, stage, previous, frozen):
    _, _, _, tensors = chain
    before, after = tensors[previous], tensors[stage]
    for module in MODULES:
        mb, ma = _module(before, module), _module(after, module)
        assert mb.keys() == ma.keys() and mb, module
        if module in frozen:
            # Every tensor, the router's expert-bias buffer included (a frozen LLM routes alike).
            for k in mb:
                assert torch.equal(mb[k], ma[k]), (stage, k)
        else:
            assert any(not torch.equal(mb[k], ma[k]) for k in mb), (stage, module)
    # Only the trainable set has optimizer state (frozen parameters are in no group).
    with_state = {k.split(".", 3)[3].split(".", 1)[0] for k in after
                  if k.startswith("optimizer.state.exp_avg.")}
    assert with_state == set(MODULES) - set(frozen), stage


def test_each_stage_starts_at_step_0_and_records_its_trainable_set(chain):
    _, jobs, ckpts, _ = chain
    counts = []
    for job in jobs:
        manifest = json.loads((ckpts[job.name] / "manifest.json").read_text())
        assert manifest["extra_rank0"]["train_state"]["step"] == 3  # 3 steps from 0, not 3k
        counts.append(manifest["extra_rank0"]["trainable_set"]["modules"])
    assert [set(c) for c in counts] == [{"vision_tower", "projector"}, {"projector"},
                                        set(MODULES), set(MODULES)]


def test_long_context_stage_runs_longer_packs_with_yarn(chain):
    _, jobs, ckpts, _ = chain
    d = jobs[3]
    assert d.data.seq_length == 512 and jobs[2].data.seq_length == 256
    assert d.model.llm.yarn.factor == 2.0 and jobs[2].model.llm.yarn.factor == 1.0
    assert d.data.multimodal.stage == "long_context"
    target = d.data.multimodal.mix.weights
    assert target["long"] == pytest.approx(0.25) and sum(target.values()) == pytest.approx(1.0)
    manifest = json.loads((ckpts[D] / "manifest.json").read_text())
    assert "factor: 2.0" in manifest["config_yaml"]
    # 3 steps x 2 packs hold more real tokens than 256-token packs could.
    assert manifest["extra_rank0"]["train_state"]["consumed_tokens"] > 3 * 2 * 256


def test_same_trainable_set_keeps_optimizer_state(chain):
    """(c) -> (c'): the loaded state is (c)'s saved exp_avg/exp_avg_sq; the schedule is fresh."""
    from megatron_vlm.checkpoint.sharded_state import unwrap
    from megatron_vlm.training.init_from import init_from_checkpoint

    _, jobs, ckpts, tensors = chain
    job = jobs[2]
    chunks, optimizer, scheduler = _build(job)
    report = init_from_checkpoint(ckpts[C].parent, chunks, optimizer, scheduler)
    assert report.optimizer_kept and report.path == ckpts[C], report.message
    assert "kept" in report.message
    names = {p: n for n, p in unwrap(chunks[0]).named_parameters()}
    checked = 0
    for member in getattr(optimizer, "chained_optimizers", [optimizer]):
        for p, st in member.optimizer.state.items():
            for key in ("exp_avg", "exp_avg_sq"):
                saved = _saved(tensors[C], f"optimizer.state.{key}.", names[p])
                assert torch.equal(st[key], saved), (key, names[p])
            checked += 1
    assert checked == sum(p.requires_grad for p in unwrap(chunks[0]).parameters())
    # Fresh schedule: warmup restarts at step 0 (init_lr 0), not at (c)'s decayed LR.
    assert scheduler.num_steps == 0 and optimizer.param_groups[0]["lr"] == 0.0
    for n, p in unwrap(chunks[0]).named_parameters():
        assert torch.equal(p.detach(), _saved(tensors[C], "", n)), n


def test_different_trainable_set_resets_optimizer(chain):
    """(c)'s checkpoint into (b)'s trainable set (projector only): weights load, state is empty."""
    from megatron_vlm.checkpoint.sharded_state import unwrap
    from megatron_vlm.training.init_from import init_from_checkpoint

    _, jobs, ckpts, tensors = chain
    chunks, optimizer, scheduler = _build(jobs[1])
    report = init_from_checkpoint(ckpts[C], chunks, optimizer, scheduler)
    assert not report.optimizer_kept
    assert "reset" in report.message and "trainable set changed" in report.message
    assert all(not m.optimizer.state for m in getattr(optimizer, "chained_optimizers",
                                                      [optimizer]))
    for n, p in unwrap(chunks[0]).named_parameters():
        assert torch.equal(p.detach(), _saved(tensors[C], "", n)), n


def test_own_resume_wins_over_init_from(chain):
    from megatron_vlm.training.trainer import train

    _, jobs, _, _ = chain
    d = apply_overrides(jobs[3], ["checkpoint.resume=true", "train.plot=false"])
    assert d.checkpoint.init_from is not None
    result = train(d)
    # Resumed at its own step 3 (init_from would have restarted at 0 and trained 3 steps).
    assert result.state.step == 3 and result.first_valid_loss == {}
