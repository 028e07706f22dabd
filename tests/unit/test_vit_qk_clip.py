"""QK-Clip on the vision tower (``model.vision.qk_clip``) and the one tau.

The clip's effect is checked against logits recomputed here in float64 from the layer's own
weights: the attention input captured from the model, ``x @ W.T + b`` split per head in
megatron's fused ``[q_h; k_h; v_h]`` layout written out here, the 2D RoPE of the items' grids,
and the block-diagonal (per item) mask written out. Before the clip these maxima must equal what
the attention recorded (so the recording and the row layout agree); after it a clipped head's
every logit is eta times the old one (its max exactly tau), the other heads and all V rows are
bit-identical. Through the trainer's step on the tiny VLM: the ViT's max logit is logged, heads
clip when tau is low and none when it is high.
"""

from __future__ import annotations

import pytest
import torch

from megatron_vlm.config import apply_overrides
from megatron_vlm.config.vision import VisionConfig
from megatron_vlm.optim.qk_clip import (
    apply_vit_qk_clip,
    clip_self_attention_,
    qk_clip_metrics,
    vit_attentions,
)

GRID = [[1, 4, 6], [2, 2, 4], [1, 2, 2]]  # an image, a 2-frame chunk, a small image
VISION = VisionConfig(hidden_size=32, num_layers=2, num_attention_heads=4, ffn_hidden_size=64,
                      pos_emb_height=8, pos_emb_width=8, qk_clip=True)


pytestmark = pytest.mark.usefixtures("megatron_groups")


def build(rope: bool):
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from megatron_vlm.config import ParallelConfig
    from megatron_vlm.models.vision.moonvit import build_moonvit

    vision = VisionConfig(**{**VISION.__dict__, "rope": rope})
    torch.manual_seed(0)
    model_parallel_cuda_manual_seed(0)
    model = build_moonvit(vision, ParallelConfig(), "fp32")
    with torch.no_grad():  # biases non-zero (they are clipped too); heads 1, 3 of each layer hot
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
        for attn in vit_attentions(model):
            rows = attn.linear_qkv.weight.view(4, 3, 8, 32)  # [head, q/k/v, hn, hidden]
            rows[1, 0] *= 20.0
            rows[3, 0] *= 6.0
            attn.linear_qkv.bias.view(4, 3, 8)[1, 1] += 1.0
    return model.eval(), vision


def media(seed: int = 0):
    grid = torch.tensor(GRID)
    n = int(grid.prod(dim=1).sum())
    return torch.randn(n, 3, 14, 14, generator=torch.Generator().manual_seed(seed)), grid


def capture_inputs(model, pixels, grid) -> list[torch.Tensor]:
    """Each layer's ``linear_qkv`` input ``[N, D]`` from one forward (recording max logits)."""
    seen, hooks = [], []
    for attn in vit_attentions(model):
        hooks.append(attn.linear_qkv.register_forward_pre_hook(
            lambda _m, args: seen.append(args[0].detach().reshape(-1, args[0].shape[-1]))))
    with torch.no_grad():
        model.encode(pixels, grid)
    for h in hooks:
        h.remove()
    return seen


def logits(attn, x: torch.Tensor, grid: torch.Tensor, vision: VisionConfig) -> torch.Tensor:
    """``[heads, N, N]`` scaled logits, float64, masked to -inf across items."""
    from megatron_vlm.models.vision.rope2d import apply_rope_2d, rope_2d_angles

    w = attn.linear_qkv.weight.detach().double()
    b = attn.linear_qkv.bias.detach().double()
    heads, hn = vision.num_attention_heads, vision.head_dim
    qkv = (x.double() @ w.T + b).view(-1, heads, 3, hn)  # megatron: per head [q; k; v]
    q, k = qkv[:, :, 0], qkv[:, :, 1]
    if vision.rope:
        angles = rope_2d_angles(grid, hn, vision.rope_theta).double()
        q, k = apply_rope_2d(q, angles), apply_rope_2d(k, angles)
    s = torch.einsum("qhd,khd->hqk", q, k) / hn ** 0.5
    item = torch.repeat_interleave(torch.arange(len(grid)), grid.prod(dim=1))
    return s.masked_fill(item[:, None] != item[None, :], float("-inf"))


@pytest.mark.parametrize("rope", [True, False])
def test_clipped_heads_reach_tau_others_and_v_untouched(rope):
    model, vision = build(rope)
    pixels, grid = media()
    xs = capture_inputs(model, pixels, grid)
    attns = vit_attentions(model)
    before = [logits(a, x, grid, vision) for a, x in zip(attns, xs)]
    recorded = [a.core_attention.current_max_attn_logits.clone() for a in attns]
    for r, s in zip(recorded, before):  # the recording and our layout agree
        torch.testing.assert_close(r.double(), s.amax(dim=(1, 2)), rtol=1e-5, atol=1e-5)
    layer1 = before[0].amax(dim=(1, 2))
    tau = float((layer1.sort().values[1] + layer1.sort().values[2]) / 2)  # 2 of 4 heads clip
    qkv_before = [(a.linear_qkv.weight.detach().clone(), a.linear_qkv.bias.detach().clone())
                  for a in attns]

    stats = apply_vit_qk_clip(model, threshold=tau)

    assert all(a.core_attention.current_max_attn_logits is None for a in attns)
    total = 0
    for a, x, old, (w0, b0) in zip(attns, xs, before, qkv_before):
        new = logits(a, x, grid, vision)
        s_old = old.amax(dim=(1, 2))
        hot = s_old > tau
        assert stats.max_logits[a.layer_number] == pytest.approx(
            recorded[a.layer_number - 1].tolist())
        assert stats.heads_clipped[a.layer_number] == int(hot.sum())
        total += int(hot.sum())
        for h in range(vision.num_attention_heads):
            w_h, w0_h = a.linear_qkv.weight.view(4, 3, 8, 32)[h], w0.view(4, 3, 8, 32)[h]
            assert torch.equal(w_h[2], w0_h[2])  # V rows untouched
            assert torch.equal(a.linear_qkv.bias.view(4, 3, 8)[h, 2], b0.view(4, 3, 8)[h, 2])
            if hot[h]:
                eta = tau / s_old[h]
                finite = torch.isfinite(old[h])
                torch.testing.assert_close(new[h][finite], eta * old[h][finite],
                                           rtol=1e-5, atol=1e-6)
                assert new[h].max().item() == pytest.approx(tau, rel=1e-5)
                assert not torch.equal(w_h[:2], w0_h[:2])
            else:
                assert torch.equal(w_h, w0_h)  # a head at or below tau: bit-identical
                assert torch.equal(new[h], old[h])
    assert 2 <= total < 2 * vision.num_attention_heads  # hot heads clipped, cold ones not
    metrics = qk_clip_metrics(stats, vision.num_layers, None, prefix="vit_qk_clip")
    assert metrics["vit_qk_clip/heads_clipped"] == total
    assert metrics["vit_qk_clip/max_logit"] == pytest.approx(
        max(float(r.max()) for r in recorded))


def test_clip_refuses_wrong_eta_shape():
    model, _ = build(True)
    with pytest.raises(ValueError, match="expected \\(4,\\)"):
        clip_self_attention_(vit_attentions(model)[0], torch.ones(3))


def test_one_tau_legacy_fields_fold_in_or_are_refused():
    from megatron_vlm.config.job import from_dict
    from megatron_vlm.recipes import get_recipe

    job = get_recipe("tiny_vlm_cpu")
    assert job.model.llm.qk_clip_threshold == 100.0 and job.optim.qk_clip_tau is None
    for legacy in ("optim.qk_clip_tau", "model.vision.qk_clip_threshold"):
        moved = apply_overrides(job, [f"{legacy}=30"])  # old configs set tau there: kept
        assert moved.model.llm.qk_clip_threshold == 30.0
        assert moved.optim.qk_clip_tau is None and moved.model.vision.qk_clip_threshold is None
        same = apply_overrides(job, ["model.llm.qk_clip_threshold=30", f"{legacy}=30"])
        assert same.model.llm.qk_clip_threshold == 30.0
        with pytest.raises(ValueError, match=f"{legacy}=50.0 != model.llm.qk_clip_threshold=30"):
            apply_overrides(job, ["model.llm.qk_clip_threshold=30", f"{legacy}=50"])
    with pytest.raises(ValueError, match="optim.qk_clip_tau=100.0 != model.llm"):
        apply_overrides(job, ["model.llm.qk_clip_threshold=30", "optim.qk_clip_tau=100"])
    # A YAML saved before the change (all three written, the vision one at its old default).
    old = job.to_dict()
    old["optim"]["qk_clip_tau"], old["model"]["vision"]["qk_clip_threshold"] = 0.07, 100.0
    loaded = from_dict(type(job), old)  # what load_yaml does
    assert loaded.model.llm.qk_clip_threshold == 0.07


# ------------------------------------------------------------- through the trainer's step


def _batch(seed: int, seq: int = 64):
    from megatron_vlm.data.contract import PackedBatch, VisionInputs

    g = torch.Generator().manual_seed(seed)
    grids = torch.tensor([[1, 4, 6], [1, 2, 2]])  # 6 + 1 placeholder tokens
    starts = torch.tensor([5, 30])
    tokens = torch.randint(3, 1000, (1, seq), generator=g)
    loss_mask = torch.ones(1, seq)
    for st, n in zip(starts.tolist(), [6, 1]):
        loss_mask[0, st - 1: st + n] = 0
    pixel = torch.randn(int(grids.prod(1).sum()), 3, 14, 14, generator=g)
    return PackedBatch(
        tokens=tokens, labels=torch.roll(tokens, -1, 1), loss_mask=loss_mask,
        position_ids=torch.cat([torch.arange(40), torch.arange(24)])[None],
        cu_seqlens=torch.tensor([0, 40, 64], dtype=torch.int32),
        cu_seqlens_padded=torch.tensor([0, 40, 64], dtype=torch.int32), max_seqlen=40,
        vision=VisionInputs(pixel_values=pixel, grid_thw=grids, placeholder_starts=starts,
                            is_video=torch.tensor([False, False])))


LOW_TAU = 0.04  # the tiny VLM's ViT logits start at ~0.02-0.07: some heads clip, others not


def _run(tau: float, init: dict | None = None):
    from megatron_vlm.optim.builder import build_optimizer
    from megatron_vlm.optim.schedules import build_scheduler
    from megatron_vlm.recipes import get_recipe
    from megatron_vlm.training.model_setup import build_model_chunks, unwrap

    job = apply_overrides(get_recipe("tiny_vlm_cpu"), [
        "model.vision.qk_clip=true", f"model.llm.qk_clip_threshold={tau}",
        "optim.schedule=constant", "optim.warmup_steps=0"])
    chunks = build_model_chunks(job)
    if init is not None:
        unwrap(chunks[0]).load_state_dict(init)
    optimizer = build_optimizer(job.optim, chunks, "fp32", False)
    scheduler = build_scheduler(job.optim, optimizer, job.train.steps)
    return job, chunks, optimizer, scheduler


def test_trainer_step_clips_and_logs_the_vit():
    """Same init and batches at tau = 1e6 (nothing clips) and a low tau: after step 1 the low-tau
    run's ViT q/k rows (weight and bias) are the high-tau run's times one factor per head,
    sqrt(eta) <= 1, whose smallest square is tau / (the layer's logged max logit); V rows and
    every other weight are equal; step 2 runs from the clipped weights and logs again."""
    from megatron_vlm.training.model_setup import unwrap
    from megatron_vlm.training.state import StopSignal
    from megatron_vlm.training.trainer import train_step

    hi = _run(1e6)
    init = {k: v.clone() for k, v in unwrap(hi[1][0]).state_dict().items()
            if not k.endswith("_extra_state")}
    lo = _run(LOW_TAU, init)
    vision = hi[0].model.vision
    results = []
    for job, chunks, optimizer, scheduler in (hi, lo):
        out = []
        for step in range(2):
            *_, skipped, _, metrics = train_step(
                chunks, optimizer, scheduler, [_batch(2 * step), _batch(2 * step + 1)], 64, [],
                StopSignal(), job.model.llm.qk_clip_threshold)
            assert not skipped
            assert "qk_clip/max_logit" not in metrics  # the LLM's QK-Clip is off in this recipe
            for layer in range(1, vision.num_layers + 1):
                assert f"vit_qk_clip/layer{layer}/max_logit" in metrics
            out.append((metrics, [(a.linear_qkv.weight.detach().clone(),
                                   a.linear_qkv.bias.detach().clone())
                                  for a in vit_attentions(chunks)]))
            if step == 0:
                params = {n: p.detach().clone()
                          for n, p in unwrap(chunks[0]).named_parameters()}
                out.append(params)
        results.append(out)
    (m_hi, qkv_hi), params_hi, (m2_hi, _) = results[0]
    (m_lo, qkv_lo), params_lo, (m2_lo, _) = results[1]
    assert m_hi["vit_qk_clip/heads_clipped"] == 0 == m2_hi["vit_qk_clip/heads_clipped"]
    assert 0 < m2_lo["vit_qk_clip/max_logit"] < float("inf")  # step 2 from the clipped rows
    assert m_lo["vit_qk_clip/max_logit"] == pytest.approx(m_hi["vit_qk_clip/max_logit"])
    assert m_lo["vit_qk_clip/max_logit"] > LOW_TAU
    heads, hn = vision.num_attention_heads, vision.head_dim
    clipped = 0
    for layer, ((w_hi, b_hi), (w_lo, b_lo)) in enumerate(zip(qkv_hi, qkv_lo), start=1):
        w_hi, w_lo = w_hi.view(heads, 3, hn, -1), w_lo.view(heads, 3, hn, -1)
        b_hi, b_lo = b_hi.view(heads, 3, hn), b_lo.view(heads, 3, hn)
        assert torch.equal(w_hi[:, 2], w_lo[:, 2]) and torch.equal(b_hi[:, 2], b_lo[:, 2])
        factor = (w_lo[:, 0].flatten(1).norm(dim=1) / w_hi[:, 0].flatten(1).norm(dim=1)).double()
        for h in range(heads):
            for lo_rows, hi_rows in ((w_lo[h, :2], w_hi[h, :2]), (b_lo[h, :2], b_hi[h, :2])):
                torch.testing.assert_close(lo_rows.double(), factor[h] * hi_rows.double(),
                                           rtol=1e-6, atol=1e-7)
        assert bool((factor <= 1 + 1e-7).all())
        clipped += int((factor < 1 - 1e-7).sum())
        assert float(factor.min()) ** 2 == pytest.approx(
            LOW_TAU / m_hi[f"vit_qk_clip/layer{layer}/max_logit"], rel=1e-5)
    assert clipped == m_lo["vit_qk_clip/heads_clipped"] > 0
    for name, value in params_hi.items():  # everything but the ViT's q/k rows is equal
        if "self_attention.linear_qkv" not in name or "vision_tower" not in name:
            assert torch.equal(value, params_lo[name]), name
