"""A lean training step: the gradient norm is computed once per step and logged as the real norm
(also with clipping off), and stepping with that norm is megatron's own ``optimizer.step()``."""

from __future__ import annotations

import math

import pytest
import torch
from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

from megatron_vlm.config import apply_overrides
from megatron_vlm.recipes import get_recipe

BASE = ["data.global_batch_size=2", "optim.warmup_steps=0", "optim.schedule=constant",
        "train.steps=10"]
KINDS = {  # optimizer kind -> overrides
    "adamw_fp32": [],
    "adamw_bf16": ["model.params_dtype=bf16"],
    "muon_layerwise": ["optim.optimizer=muon", "parallel.use_distributed_optimizer=true"],
    "adamw_distopt": ["parallel.use_distributed_optimizer=true"],
}


def _setup(tmp_path, overrides: list[str]):
    from megatron_vlm.optim.builder import build_optimizer
    from megatron_vlm.optim.schedules import build_scheduler
    from megatron_vlm.training.data_setup import build_data
    from megatron_vlm.training.model_setup import build_model_chunks

    job = apply_overrides(get_recipe("tiny_text_cpu"),
                          [*BASE, f"train.output_dir={tmp_path}", *overrides])
    torch.manual_seed(0)
    model_parallel_cuda_manual_seed(0)
    chunks = build_model_chunks(job)
    optimizer = build_optimizer(job.optim, chunks, job.model.params_dtype,
                                job.parallel.use_distributed_optimizer)
    scheduler = build_scheduler(job.optim, optimizer, job.train.steps)
    data = build_data(job, dp_rank=0, dp_size=1, run_dir=tmp_path)
    return job, chunks, optimizer, scheduler, data.loader.next_global_batch()


def _params(chunks) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for c in chunks for n, p in c.named_parameters()}


@pytest.mark.parametrize("clip", [0.0, 0.05])
@pytest.mark.parametrize("kind", sorted(KINDS))
def test_step_with_the_norm_equals_megatron_step(kind, clip, tmp_path, megatron_groups):
    """prepare_grads + get_grad_norm + step_with_grad_norm == optimizer.step(), bit for bit."""
    from megatron_vlm.optim.step import step_with_grad_norm
    from megatron_vlm.training.step_runner import run_forward_backward

    after = []
    for ours in (False, True):
        job, chunks, optimizer, _, batches = _setup(
            tmp_path / str(ours), [*KINDS[kind], f"optim.clip_grad={clip}"])
        for c in chunks:
            c.zero_grad_buffer()
        optimizer.zero_grad()
        run_forward_backward(chunks, batches, job.data.seq_length, forward_only=False)
        if ours:
            optimizer.prepare_grads()
            assert step_with_grad_norm(optimizer, optimizer.get_grad_norm())
        else:
            assert optimizer.step()[0]
        after.append(_params(chunks))
    assert after[0].keys() == after[1].keys()
    changed = 0
    for name in after[0]:
        assert torch.equal(after[0][name], after[1][name]), name
        changed += 1
    assert changed > 10


def test_logged_norm_is_the_real_one_and_computed_once(tmp_path, megatron_groups):
    """With clipping off megatron's step reports no norm (0.0 was logged); the step reports the
    norm of every main gradient, computed independently here, and asks for it once per step."""
    from megatron_vlm.training.state import StopSignal
    from megatron_vlm.training.step_runner import TrainStep

    job, chunks, optimizer, scheduler, batches = _setup(tmp_path, ["optim.clip_grad=0.0"])
    calls, seen = [], []

    def counted_norm():
        calls.append(1)
        # Independent: every main gradient the optimizer is about to apply.
        grads = [p.grad for g in optimizer.param_groups for p in g["params"] if p.grad is not None]
        seen.append(torch.linalg.vector_norm(
            torch.stack([torch.linalg.vector_norm(x.double()) for x in grads])).item())
        return optimizer.get_grad_norm()

    step = TrainStep(chunks, optimizer, scheduler, job.data.seq_length, [], StopSignal(),
                     grad_norm_fn=counted_norm)
    for i in range(3):
        result = step(batches)
        assert not result.skipped and len(calls) == i + 1
        assert result.grad_norm > 0 and math.isclose(result.grad_norm, seen[-1], rel_tol=1e-6)
    # The former 6-tuple still unpacks.
    loss, tokens, norm, skipped, stop, metrics = result
    assert (norm, skipped, stop, metrics) == (result.grad_norm, False, False, {})
    assert tokens == result.tokens > 0 and loss == result.loss
