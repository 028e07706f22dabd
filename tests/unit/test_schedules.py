"""LR schedules against the formulas written out here (warmup + cosine; warmup-stable-decay)."""

from __future__ import annotations

import math

import pytest
import torch

from megatron_vlm.config import OptimConfig
from megatron_vlm.optim.schedules import build_scheduler


def _lrs(optim: OptimConfig, total: int) -> list[float]:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = build_scheduler(optim, opt, total)
    out = []
    for _ in range(total):
        sched.step(increment=1)
        out.append(opt.param_groups[0]["lr"])
    return out


def test_warmup_then_cosine():
    lr, lo, warm, total = 1e-3, 1e-4, 10, 100
    got = _lrs(OptimConfig(lr=lr, min_lr=lo, warmup_steps=warm, schedule="cosine"), total)
    for step, value in enumerate(got, start=1):
        if step <= warm:
            want = lr * step / warm
        else:
            frac = (step - warm) / (total - warm)
            want = lo + 0.5 * (lr - lo) * (1 + math.cos(math.pi * frac))
        assert value == pytest.approx(want, rel=1e-9, abs=1e-12), step
    assert got[-1] == pytest.approx(lo)


@pytest.mark.parametrize("style", ["linear", "cosine"])
def test_warmup_stable_decay(style):
    lr, lo, warm, total, frac = 2e-3, 2e-4, 5, 50, 0.2
    got = _lrs(OptimConfig(lr=lr, min_lr=lo, warmup_steps=warm, schedule="wsd",
                           wsd_decay_fraction=frac, wsd_decay_style=style), total)
    decay = round(frac * total)
    for step, value in enumerate(got, start=1):
        if step <= warm:
            want = lr * step / warm
        elif step <= total - decay:
            want = lr
        else:
            ratio = (step - (total - decay)) / decay
            coeff = 1 - ratio if style == "linear" else 0.5 * (math.cos(math.pi * ratio) + 1)
            want = lo + coeff * (lr - lo)
        assert value == pytest.approx(want, rel=1e-9, abs=1e-12), (style, step)
    assert got[total - decay - 1] == pytest.approx(lr)
    assert got[-1] == pytest.approx(lo)
