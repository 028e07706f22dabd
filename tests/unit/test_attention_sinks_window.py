"""GPT-OSS's attention sinks and sliding window in our packed (THD) attention kernels, including
the context-parallel path (local queries with their global indices against gathered keys).

The reference is written here, per document and in float64: logits ``q k^T * scale``, keys in
the causal window ``q - left <= k <= q``, and a softmax whose denominator also holds
``exp(sink_h)`` (HF's eager ``sinks`` column). Every CPU kernel (``sdpa_mask``, ``sdpa_doc``,
``flex``) on one whole packed sequence, and on each CP rank's rows (``cp_partition_index``, as
``parallel/context.py`` splits), equals it on the real tokens; ``sdpa_mask`` and ``sdpa_doc``
gradients (q, k, v and the sinks, summed over the CP ranks) equal the reference's.
"""

from __future__ import annotations

import pytest
import torch
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_vlm.models.attention import PackedSelfAttention, thd_packed_seq_params
from megatron_vlm.models.packed_kernels import DocumentSDPAAttention, FlexPackedAttention
from megatron_vlm.parallel.context import cp_partition_index

KERNELS = {"sdpa_mask": PackedSelfAttention, "sdpa_doc": DocumentSDPAAttention,
           "flex": FlexPackedAttention}
HEADS, DIM, LEFT = 4, 8, 3
REAL, MULTIPLE, TOTAL = [11, 5, 14], 4, 40  # spans 12, 8, 16 (CP=2 chunks of 3, 2, 4) + tail 4


def _docs():
    padded = [-(-n // MULTIPLE) * MULTIPLE for n in REAL]
    cu = torch.tensor([0, *torch.tensor(REAL).cumsum(0).tolist()], dtype=torch.int32)
    cu_pad = torch.tensor([0, *torch.tensor(padded).cumsum(0).tolist()], dtype=torch.int32)
    return cu, cu_pad


def reference(q, k, v, sinks, scale: float, left: int | None):
    """``[t, h, d]`` per document of ``REAL`` in its padded span; padding rows stay 0."""
    cu, cu_pad = _docs()
    out = torch.zeros_like(v)
    for start, n in zip(cu_pad[:-1].tolist(), REAL):
        sl = slice(start, start + n)
        logits = torch.einsum("qhd,khd->hqk", q[sl], k[sl]) * scale
        pos = torch.arange(n)
        allowed = pos[None, :] <= pos[:, None]
        if left is not None:
            allowed &= pos[None, :] >= pos[:, None] - left
        logits = logits.masked_fill(~allowed, float("-inf"))
        sink = sinks.view(-1, 1, 1).expand(-1, n, 1).to(logits.dtype)
        probs = torch.softmax(torch.cat([logits, sink], dim=-1), dim=-1)[..., :-1]
        out[sl] = torch.einsum("hqk,khd->qhd", probs, v[sl])
    return out


def _attention(cls, window: bool, sinks: torch.Tensor, record: bool = False):
    config = TransformerConfig(num_layers=1, hidden_size=HEADS * DIM, num_attention_heads=HEADS,
                               kv_channels=DIM, attention_dropout=0.0, softmax_type="learnable",
                               window_size=(LEFT, 0) if window else None,
                               params_dtype=torch.float64, log_max_attention_logit=record)
    mod = cls(config, layer_number=1, attn_mask_type=AttnMaskType.causal)
    with torch.no_grad():
        mod.softmax_offset.copy_(sinks)
    return mod


def _inputs():
    gen = torch.Generator().manual_seed(0)
    q, k, v = (2 * torch.randn(TOTAL, HEADS, DIM, generator=gen, dtype=torch.float64)
               for _ in range(3))
    sinks = torch.randn(HEADS, generator=gen, dtype=torch.float64)
    cu, cu_pad = _docs()
    real = torch.zeros(TOTAL, dtype=torch.bool)
    for a, n in zip(cu_pad[:-1].tolist(), REAL):
        real[a:a + n] = True
    return q, k, v, sinks, thd_packed_seq_params(cu, cu_pad, TOTAL, "cpu"), real


@pytest.mark.parametrize("window", [True, False], ids=["window", "full"])
@pytest.mark.parametrize("kernel", list(KERNELS))
def test_kernels_equal_reference(megatron_groups, kernel, window):
    q, k, v, sinks, params, real = _inputs()
    mod = _attention(KERNELS[kernel], window, sinks)
    with torch.no_grad():
        out = mod(q, k, v, None, packed_seq_params=params)
    ref = reference(q, k, v, sinks, mod.softmax_scale, LEFT if window else None)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[real], ref[real], atol=1e-10, rtol=0)
    # Control: without the sinks' share (every row sums to 1) the output differs.
    plain = reference(q, k, v, torch.full_like(sinks, -1e9), mod.softmax_scale,
                      LEFT if window else None)
    assert (plain[real] - ref[real]).abs().max() > 1e-3


@pytest.mark.parametrize("kernel", list(KERNELS))
def test_context_parallel_rows_and_gradients_equal_reference(megatron_groups, kernel):
    """CP=2: each rank's two chunks of every document attend the gathered keys; the window is
    measured in global positions, so a chunk's first queries reach back into the other rank's
    chunk."""
    q, k, v, sinks, params, real = _inputs()
    backward = kernel != "flex"  # flex has no CPU backward in torch 2.13
    q0, k0, v0, s0 = (x.clone().requires_grad_(backward) for x in (q, k, v, sinks))
    ref = reference(q0, k0, v0, s0, DIM ** -0.5, LEFT)
    weight = torch.randn_like(ref) * real[:, None, None]
    if backward:
        (ref * weight).sum().backward()
    _, cu_pad = _docs()
    grads = [torch.zeros_like(x) for x in (q, k, v, sinks)]
    for rank in range(2):
        index = cp_partition_index(cu_pad, TOTAL, 2, rank)
        mod = _attention(KERNELS[kernel], True, sinks)
        ql = q[index].clone().requires_grad_(backward)
        kg, vg = (x.clone().requires_grad_(backward) for x in (k, v))
        out = mod._attend_thd(ql, kg, vg, True, params, q_index=index)
        rows = real[index]
        torch.testing.assert_close(out[rows], ref[index][rows].detach(), atol=1e-10, rtol=0)
        if backward:
            (out * weight[index]).sum().backward()
            grads[0][index] += ql.grad
            grads[1] += kg.grad
            grads[2] += vg.grad
            grads[3] += mod.softmax_offset.grad
    if backward:
        torch.testing.assert_close(grads[0][real], q0.grad[real], atol=1e-10, rtol=0)
        for got, want in zip(grads[1:], (k0.grad, v0.grad, s0.grad)):
            torch.testing.assert_close(got, want, atol=1e-10, rtol=0)


def test_window_layers_follow_megatron_skip_freq(megatron_groups):
    """``window_attn_skip_freq=2``: 1-based layers 1, 3 slide, 2, 4 are full (GPT-OSS)."""
    config = TransformerConfig(num_layers=4, hidden_size=HEADS * DIM, num_attention_heads=HEADS,
                               kv_channels=DIM, window_size=(LEFT, 0), window_attn_skip_freq=2)
    windows = [PackedSelfAttention(config, layer_number=n, attn_mask_type=AttnMaskType.causal)
               .window for n in range(1, 5)]
    assert windows == [(LEFT, 0), None, (LEFT, 0), None]


@pytest.mark.parametrize("kernel", list(KERNELS))
def test_max_logits_only_inside_the_window(megatron_groups, kernel):
    """Recorded per-head max logits (``log_max_attention_logit``) count window entries only."""
    q, k, v, sinks, params, real = _inputs()
    mod = _attention(KERNELS[kernel], True, sinks, record=True)
    with torch.no_grad():
        mod(q, k, v, None, packed_seq_params=params)
    cu, cu_pad = _docs()
    best = torch.full((HEADS,), float("-inf"), dtype=torch.float64)
    for start, n in zip(cu_pad[:-1].tolist(), REAL):
        logits = torch.einsum("qhd,khd->hqk", q[start:start + n], k[start:start + n])
        pos = torch.arange(n)
        ok = (pos[None, :] <= pos[:, None]) & (pos[None, :] >= pos[:, None] - LEFT)
        best = torch.maximum(best, (logits * mod.softmax_scale).masked_fill(~ok, -torch.inf)
                             .amax(dim=(1, 2)))
    torch.testing.assert_close(mod.current_max_attn_logits.double(), best, atol=0, rtol=1e-6)
