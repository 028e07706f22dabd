"""The VLM module: media features land on their placeholders, gradients reach the vision tower,
frozen modules stay bit-identical, per-module learning rates take effect, bad spans are refused."""

from __future__ import annotations

import pytest
import torch
from megatron.core import parallel_state

from megatron_vlm.config import apply_overrides
from megatron_vlm.data.contract import PackedBatch, VisionInputs
from megatron_vlm.parallel.init import init_distributed
from megatron_vlm.recipes import get_recipe
from megatron_vlm.training.model_setup import build_model_chunks, unwrap
from megatron_vlm.training.step import model_inputs
from megatron_vlm.training.trainer import run_forward_backward

S = 64


@pytest.fixture(scope="module", autouse=True)
def dist_env():
    if not parallel_state.model_parallel_is_initialized():
        init_distributed(get_recipe("tiny_vlm_cpu").parallel, seed=7)


def _batch(seed: int = 0, shift_media: int = 0) -> PackedBatch:
    g = torch.Generator().manual_seed(seed)
    grids = torch.tensor([[1, 4, 6], [1, 2, 2]])  # 6 + 1 placeholder tokens
    starts = torch.tensor([5 + shift_media, 30])
    tokens = torch.randint(3, 1000, (1, S), generator=g)
    labels = torch.roll(tokens, -1, 1)
    loss_mask = torch.ones(1, S)
    for st, n in zip(starts.tolist(), [6, 1]):
        loss_mask[0, st - 1: st + n] = 0  # no loss on placeholders (nor predicting them)
    loss_mask[0, 39] = 0
    loss_mask[0, 63] = 0
    pixel = torch.randn(int(grids.prod(1).sum()), 3, 14, 14, generator=g)
    return PackedBatch(
        tokens=tokens, labels=labels, loss_mask=loss_mask,
        position_ids=torch.cat([torch.arange(40), torch.arange(24)])[None],
        cu_seqlens=torch.tensor([0, 40, 64], dtype=torch.int32),
        cu_seqlens_padded=torch.tensor([0, 40, 64], dtype=torch.int32), max_seqlen=40,
        vision=VisionInputs(pixel_values=pixel, grid_thw=grids, placeholder_starts=starts,
                            is_video=torch.tensor([False, False])))


def _job(*overrides: str):
    return apply_overrides(get_recipe("tiny_vlm_cpu"), [
        "optim.schedule=constant", "optim.warmup_steps=0", "optim.weight_decay=0.0",
        "optim.clip_grad=0.0", *overrides])


def _params(chunks, prefix: str) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in unwrap(chunks[0]).named_parameters()
            if n.startswith(prefix)}


def test_media_reach_placeholders_and_gradients_reach_vision():
    job = _job()
    chunks = build_model_chunks(job, wrap_ddp=False)
    model = unwrap(chunks[0]).eval()
    batch = _batch()
    with torch.no_grad():
        inputs = model_inputs(batch, torch.device("cpu"), model)
        emb = model.embed(inputs["input_ids"], inputs["position_ids"], inputs["pixel_values"],
                          inputs["grid_thw"], inputs["media_positions"])
        plain = model.language_model.embedding(input_ids=inputs["input_ids"],
                                               position_ids=inputs["position_ids"])
        feats = model.projector(model.vision_tower(batch.vision.pixel_values,
                                                   batch.vision.grid_thw))
    media = torch.tensor([5, 6, 7, 8, 9, 10, 30])
    other = torch.tensor([i for i in range(S) if i not in media.tolist()])
    assert torch.equal(emb[media, 0], feats)
    assert torch.equal(emb[other, 0], plain[other, 0])
    # Gradients flow from the text loss into the vision tower.
    model.train()
    inputs = model_inputs(batch, torch.device("cpu"), model)
    loss = (model(**inputs) * batch.loss_mask).sum()
    loss.backward()
    grads = [p.grad for n, p in model.named_parameters() if n.startswith("vision_tower.")]
    assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0


def test_wrong_placeholder_span_is_refused():
    job = _job()
    model = unwrap(build_model_chunks(job, wrap_ddp=False)[0])
    batch = _batch()
    bad = _batch(shift_media=60)  # runs past the end of the sequence
    inputs = model_inputs(bad, torch.device("cpu"), model)
    with pytest.raises(ValueError, match="past the end"):
        model(**inputs)
    inputs = model_inputs(batch, torch.device("cpu"), model)
    inputs["media_positions"] = inputs["media_positions"][:-1]
    with pytest.raises(ValueError, match="do not match"):
        model(**inputs)


def test_freezing_and_per_module_learning_rates():
    from megatron_vlm.optim.builder import build_optimizer
    from megatron_vlm.optim.schedules import build_scheduler

    job = _job("model.freeze_vision=true", "optim.projector_lr_mult=0.25",
               "optim.llm_lr_mult=0.5")
    chunks = build_model_chunks(job)
    opt = build_optimizer(job.optim, chunks, "fp32", False)
    build_scheduler(job.optim, opt, job.train.steps)  # sets each group's lr, as in training
    before = {k: _params(chunks, k) for k in ("vision_tower.", "projector.", "language_model.")}
    for c in chunks:
        c.zero_grad_buffer()
    opt.zero_grad()
    run_forward_backward(chunks, [_batch(1), _batch(2)], S, forward_only=False)
    opt.step()
    after = {k: _params(chunks, k) for k in before}
    for name, value in before["vision_tower."].items():
        assert torch.equal(after["vision_tower."][name], value), name
    # Adam's first step moves each weight by lr * g/(|g| + eps): |delta| <= lr, ~lr where g != 0.
    for prefix, mult in (("projector.", 0.25), ("language_model.", 0.5)):
        deltas = torch.cat([(after[prefix][n] - before[prefix][n]).abs().flatten()
                            for n in before[prefix]])
        assert deltas.max().item() == pytest.approx(job.optim.lr * mult, rel=1e-3), prefix
