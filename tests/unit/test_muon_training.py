"""MuonClip in the real trainer, one process: ``optim.optimizer=muon`` through ``train()`` (loss
goes down, QK-Clip acts and is logged), which parameter each optimizer steps (written out here
from the rules in SPEC §2, on the tiny VLM with a vision LR multiplier), and an interrupted run
resumed from ``megatron_vlm.checkpoint`` equal to the uninterrupted one bit for bit (bf16
params with fp32 masters, QK-Clip on)."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from megatron_vlm.config import apply_overrides
from megatron_vlm.recipes import get_recipe

# tau 0.07 sits among the tiny model's per-head max logits (~0.06-0.10 at init): some heads clip.
RUN = ["optim.optimizer=muon", "model.llm.qk_clip=true", "optim.qk_clip_tau=0.07",
       "model.params_dtype=bf16", "train.steps=8", "optim.warmup_steps=1",
       "train.eval_interval=4", "train.log_interval=4", "train.tensorboard=false",
       "train.plot=false", "checkpoint.save_interval=0", "data.global_batch_size=4"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Uninterrupted 8 steps; the same run stopped after 4 steps and resumed."""
    from megatron_vlm.training.trainer import train

    base = tmp_path_factory.mktemp("muon_train")
    full, split = base / "full", base / "split"
    tokenizer = []

    def job(out: Path, *extra: str):
        tok = [f"data.tokenizer_model={tokenizer[0]}"] if tokenizer else []
        return apply_overrides(get_recipe("tiny_text_cpu"),
                               [*RUN, f"train.output_dir={out}", *tok, *extra])

    result_full = train(job(full))
    tokenizer.append(next(full.glob("spm_*.model")))  # trained once, shared
    first = train(job(split, "train.exit_after_steps=4"))
    second = train(job(split, "checkpoint.resume=true"))
    return base, full, split, result_full, first, second


def _metrics(run_dir: Path) -> dict[tuple[str, int], dict]:
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return {(r["split"], r["step"]): r for r in records}


def test_muon_lowers_the_loss_and_clips(runs):
    _, full, _, result, _, _ = runs
    m = _metrics(full)
    assert result.state.step == 8 and result.state.skipped_steps == 0
    assert m[("train", 8)]["loss"] < m[("train", 1)]["loss"] - 0.4
    assert result.final_valid_loss["text"] < result.first_valid_loss["text"] - 0.4
    first = m[("train", 1)]
    assert first["qk_clip/heads_clipped"] > 0  # tau 0.07 is below some heads' max logit
    for layer in (1, 2, 3):
        s = first[f"qk_clip/layer{layer}/max_logit"]
        assert 0 < s < 1 and math.isfinite(s)
        assert 0 <= first[f"qk_clip/layer{layer}/heads_clipped"] <= 4
    assert first["qk_clip/max_logit"] == max(first[f"qk_clip/layer{i}/max_logit"]
                                             for i in (1, 2, 3))


def test_resume_is_bit_exact(runs, tmp_path):
    _, full, split, _, first, second = runs
    assert first.state.step == 4 and second.state.step == 8
    ref, got = _metrics(full), _metrics(split)
    later = [k for k in ref if k[1] > 4]
    assert later and all(k in got for k in later)
    for key in later:
        for field, value in ref[key].items():
            if field in ("loss", "grad_norm", "lr", "loss/text") or field.startswith("qk_clip"):
                assert got[key][field] == value, (key, field)

    def tensors(ckpt: Path, name: str) -> dict[str, torch.Tensor]:
        out = tmp_path / f"{name}.pt"
        dcp_to_torch_save(str(ckpt), str(out))
        return {k: v for k, v in torch.load(out, weights_only=True).items()
                if torch.is_tensor(v)}

    a = tensors(full / "checkpoints" / "step_0000008", "a")
    b = tensors(split / "checkpoints" / "step_0000008", "b")
    assert a.keys() == b.keys()
    # Muon momenta, AdamW moments and the fp32 masters of bf16 weights are all in there.
    for part in ("momentum_buffer", "exp_avg_sq", "fp32_param"):
        assert any(part in k for k in a), part
    for key in a:
        assert torch.equal(a[key], b[key]), key


# --------------------------------------------------------------------------- assignment


@pytest.fixture(scope="module")
def vlm_optimizer():
    """The tiny VLM's DDP chunks and the Muon optimizer the trainer builds for them."""
    from megatron_vlm.optim.builder import build_optimizer
    from megatron_vlm.optim.schedules import build_scheduler
    from megatron_vlm.parallel.init import init_distributed
    from megatron_vlm.training.model_setup import build_model_chunks

    job = apply_overrides(get_recipe("tiny_vlm_cpu"), [
        "optim.optimizer=muon", "optim.vision_lr_mult=0.1", "optim.warmup_steps=0",
        "optim.schedule=constant"])
    init_distributed(job.parallel, job.train.seed)
    chunks = build_model_chunks(job)
    optimizer = build_optimizer(job.optim, chunks, job.model.params_dtype,
                                job.parallel.use_distributed_optimizer)
    scheduler = build_scheduler(job.optim, optimizer, job.train.steps)
    return job, chunks, optimizer, scheduler


def _expected(name: str, shape: tuple[int, ...]) -> tuple[str, list[tuple[int, int]] | None]:
    """(optimizer, Newton-Schulz block shapes) by SPEC §2, for the tiny VLM's names."""
    table = ("word_embeddings", "output_layer", "pos_emb")
    if len(shape) != 2 or any(t in name for t in table):
        return "adamw", None  # norms, biases, conv patch embedding, embeddings, head, pos table
    kind = "muon"  # routed experts are expert-parallel (own optimizer) only under EP > 1
    if name.endswith("linear_fc1.weight") and "language_model" in name:  # SwiGLU [gate; up]
        return kind, [(shape[0] // 2, shape[1])] * 2
    if name.endswith("linear_qkv.weight"):  # MoonViT: 4 heads of 8, no GQA -> q, k, v
        return kind, [(shape[0] // 3, shape[1])] * 3
    return kind, [shape]


def test_muon_and_adamw_assignment(vlm_optimizer):
    from megatron_vlm.optim.muon import BlockLayout, block_matrix

    job, chunks, optimizer, _ = vlm_optimizer
    kinds = ["muon", "adamw"]
    assert [type(o.optimizer).__name__ for o in optimizer.chained_optimizers] == [
        "Muon", "AdamW"]
    holder = {id(p): kind for kind, o in zip(kinds, optimizer.chained_optimizers)
              for g in o.optimizer.param_groups for p in g["params"]}
    named = dict(chunks[0].named_parameters())
    assert any("vision_tower" in n for n in named) and any("projector" in n for n in named)
    for name, p in named.items():
        kind, blocks = _expected(name, tuple(p.shape))
        assert holder.get(id(p)) == kind, name
        if blocks is not None:
            views = BlockLayout.from_tuple(p.muon_layout).views(p.detach())
            assert [tuple(block_matrix(v).shape) for v in views] == blocks, name
    assert len(holder) == len(named)  # nothing else (the expert bias is a buffer)
    assert any("expert_bias" in n for n, _ in chunks[0].named_buffers())


def test_vision_lr_multiplier_in_both_optimizers(vlm_optimizer):
    job, chunks, optimizer, scheduler = vlm_optimizer
    scheduler.step(increment=1)
    lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    kinds_seen = set()
    for name, p in chunks[0].named_parameters():
        mult = 0.1 if "vision_tower." in name else 1.0
        assert lr_of[id(p)] == pytest.approx(job.optim.lr * mult, rel=1e-12), name
        if "vision_tower." in name:
            kinds_seen.add(p.ndim == 2 and "pos_emb" not in name)
    assert kinds_seen == {True, False}  # vision params in Muon and in AdamW
    # One param group per megatron group identity (checkpoint loads match groups by it).
    for o in optimizer.chained_optimizers:
        ids = [(g["wd_mult"], g["lr_mult"], g["is_expert_parallel"], g["is_decoupled_lr"])
               for g in o.optimizer.param_groups]
        assert len(ids) == len(set(ids))


def test_adamw_module_lr_groups_have_distinct_identities(vlm_optimizer):
    """megatron's AdamW path with per-module LRs: each multiplier is its own group identity
    (``lr_mult``), so a checkpoint load cannot hand the vision group the LLM group's max_lr."""
    from megatron_vlm.optim.builder import build_optimizer

    job, chunks, _, _ = vlm_optimizer
    adamw = build_optimizer(dataclasses.replace(job.optim, optimizer="adamw"), chunks,
                            job.model.params_dtype, job.parallel.use_distributed_optimizer)
    max_lr = {id(p): g["max_lr"] for g in adamw.param_groups for p in g["params"]}
    for name, p in chunks[0].named_parameters():
        mult = 0.1 if "vision_tower." in name else 1.0
        assert max_lr[id(p)] == pytest.approx(job.optim.lr * mult, rel=1e-12), name
    for o in adamw.chained_optimizers:
        ids = [(g["wd_mult"], g["lr_mult"], g["is_expert_parallel"], g["is_decoupled_lr"])
               for g in o.optimizer.param_groups]
        assert len(ids) == len(set(ids)), ids


# --------------------------------------------------------------------------- refusals, bf16


def _chunks(*overrides: str):
    from megatron_vlm.parallel.init import init_distributed
    from megatron_vlm.training.model_setup import build_model_chunks

    job = apply_overrides(get_recipe("tiny_text_cpu"), list(overrides))
    init_distributed(job.parallel, job.train.seed)
    return job, build_model_chunks(job)


def test_muon_shards_layer_wise_and_qk_clip_refuses_flat_sharding():
    from megatron.core.optimizer.layer_wise_optimizer import LayerWiseDistributedOptimizer

    from megatron_vlm.optim.builder import build_optimizer

    # Muon needs whole reduced gradients: model setup builds DDP without flat reduce-scatter,
    # and parallel.use_distributed_optimizer then means layer-wise sharding.
    job, chunks = _chunks("optim.optimizer=muon", "parallel.use_distributed_optimizer=true")
    assert not any(c.ddp_config.use_distributed_optimizer for c in chunks)
    opt = build_optimizer(job.optim, chunks, job.model.params_dtype, True)
    assert isinstance(opt, LayerWiseDistributedOptimizer)
    # QK-Clip needs whole per-head master rows: not on megatron's flat DistributedOptimizer.
    job, chunks = _chunks("model.llm.qk_clip=true", "parallel.use_distributed_optimizer=true")
    with pytest.raises(ValueError, match="optim.optimizer=muon"):
        build_optimizer(job.optim, chunks, job.model.params_dtype, True)


def test_bf16_adamw_without_distributed_optimizer_checkpoints(tmp_path):
    """megatron's Float16 wrapper alone fails to save a model with fp32 norm weights ("Param id
    N does not match any model sharded param"); through build_optimizer it saves and loads."""
    from megatron_vlm.checkpoint import load_checkpoint, save_checkpoint
    from megatron_vlm.optim.builder import build_optimizer
    from megatron_vlm.optim.schedules import build_scheduler
    from megatron_vlm.training.data_setup import build_data
    from megatron_vlm.training.state import StopSignal
    from megatron_vlm.training.trainer import train_step

    def setup():
        job, chunks = _chunks("model.params_dtype=bf16", "data.global_batch_size=2",
                              f"train.output_dir={tmp_path}")
        optimizer = build_optimizer(job.optim, chunks, job.model.params_dtype, False)
        scheduler = build_scheduler(job.optim, optimizer, job.train.steps)
        data = build_data(job, dp_rank=0, dp_size=1, run_dir=tmp_path)
        return job, chunks, optimizer, scheduler, data.loader.next_global_batch()

    def step(job, chunks, optimizer, scheduler, batches):
        return train_step(chunks, optimizer, scheduler, batches, job.data.seq_length, [],
                          StopSignal())[0]

    job, chunks, optimizer, scheduler, batches = setup()
    assert any(p.dtype == torch.float32 for p in chunks[0].parameters())  # the norms
    step(job, chunks, optimizer, scheduler, batches)
    ckpt = save_checkpoint(tmp_path / "ckpt", 1, chunks, optimizer, scheduler, {}, job.to_yaml())
    # The second loss depends on the first step's update: Adam moments and fp32 masters.
    expected = [step(job, chunks, optimizer, scheduler, batches) for _ in range(2)]
    job, chunks, optimizer, scheduler, batches = setup()
    load_checkpoint(ckpt, chunks, optimizer, scheduler)
    assert [step(job, chunks, optimizer, scheduler, batches) for _ in range(2)] == expected
