"""Context-parallel split of packed sequences (``parallel/context.py``) and CP attention rows.

* The split follows the 2cp load-balance rule of megatron/TE (``get_batch_on_this_cp_rank``'s
  ``view(2cp, L/2cp)[[r, 2cp-1-r]]``, applied per document as TE's THD partitioning does), written
  here independently, on documents of odd real lengths padded to ``2cp``, with a tail.
* split -> unsplit round-trips; misaligned documents are refused naming the document.
* megatron's own THD RoPE (``rope_utils._apply_rotary_pos_emb_thd``) on a CP rank's split tensor
  with the global ``cu_seqlens`` equals the split of the one-process rotation: every token keeps
  its global position in its document.
* Each kernel's CP path (local queries with their global indices against the gathered global
  K/V, the inputs ``PackedSelfAttention`` builds on every CP rank) gives exactly the rows, the
  max logits and (summed over ranks) the K/V gradients of the one-process attention.
"""

from __future__ import annotations

from itertools import pairwise

import pytest
import torch
from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_thd
from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.transformer_config import TransformerConfig

from megatron_vlm.config.model import KernelConfig
from megatron_vlm.models.attention import PackedSelfAttention, thd_packed_seq_params
from megatron_vlm.models.packed_kernels import DocumentSDPAAttention, FlexPackedAttention
from megatron_vlm.models.specs import Capabilities, choose_kernels
from megatron_vlm.parallel.context import (
    context_parallel_layout,
    cp_partition_index,
    split_for_context_parallel,
    unsplit_context_parallel,
)
from megatron_vlm.parallel.cpu_shims import apply_cpu_shims


def padded_docs(real: list[int], multiple: int, total: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(cu_seqlens, cu_seqlens_padded) for documents of ``real`` lengths padded to ``multiple``
    in a sequence of ``total`` tokens (the rest is tail padding)."""
    padded = [-(-n // multiple) * multiple for n in real]
    assert sum(padded) <= total
    cu = torch.tensor([0, *torch.tensor(real).cumsum(0).tolist()], dtype=torch.int32)
    cu_pad = torch.tensor([0, *torch.tensor(padded).cumsum(0).tolist()], dtype=torch.int32)
    return cu, cu_pad


def rule_index(cu_pad: list[int], total: int, cp: int, rank: int) -> torch.Tensor:
    """The 2cp rule per document, megatron's BSHD formula (view into 2cp chunks, pick r and
    2cp-1-r) applied to each document span (the tail is one more)."""
    bounds = [*cu_pad, total] if cu_pad[-1] < total else list(cu_pad)
    out = []
    for a, b in pairwise(bounds):
        span = torch.arange(a, b).view(2 * cp, -1)
        out.append(span.index_select(0, torch.tensor([rank, 2 * cp - 1 - rank])).reshape(-1))
    return torch.cat(out)


# odd real lengths; padded spans cross chunk boundaries at different offsets
CASES = [([7, 13, 1, 22], 2, 64), ([5, 11, 3], 3, 60), ([9, 17, 30], 4, 72), ([64], 2, 64)]


@pytest.mark.parametrize(("real", "cp", "total"), CASES)
def test_split_matches_the_2cp_rule_and_round_trips(real, cp, total):
    _, cu_pad = padded_docs(real, 2 * cp, total)
    x = torch.randn(1, total, 3)
    parts = []
    for rank in range(cp):
        index = cp_partition_index(cu_pad, total, cp, rank)
        assert torch.equal(index, rule_index(cu_pad.tolist(), total, cp, rank))
        parts.append(split_for_context_parallel(x, index, dim=1))
        assert parts[-1].shape == (1, total // cp, 3)
    # every token on exactly one rank, and back in place
    both = torch.cat([cp_partition_index(cu_pad, total, cp, r) for r in range(cp)])
    assert torch.equal(both.sort().values, torch.arange(total))
    assert torch.equal(unsplit_context_parallel(parts, cu_pad, total, dim=1), x)
    layout = context_parallel_layout(cu_pad, total, cp, cp - 1)
    gathered = torch.cat([p[0] for p in parts])  # what an all-gather over CP returns
    assert torch.equal(gathered.index_select(0, layout.gathered_to_global), x[0])
    assert torch.equal(layout.local_index, cp_partition_index(cu_pad, total, cp, cp - 1))


def test_misaligned_document_is_refused_with_its_name():
    cu_pad = torch.tensor([0, 8, 14, 24], dtype=torch.int32)  # document 1 spans 6 tokens
    with pytest.raises(ValueError, match="document 1 at token 8 spans 6 tokens"):
        cp_partition_index(cu_pad, 24, 2, 0)
    with pytest.raises(ValueError, match="ends at 24 but the sequence has 16"):
        cp_partition_index(cu_pad, 16, 2, 0)


class _FakeCPGroup:
    """What megatron's THD RoPE reads of a CP group: its size and this rank."""

    def __init__(self, size: int, rank: int) -> None:
        self._size, self._rank = size, rank

    def size(self) -> int:
        return self._size

    def rank(self) -> int:
        return self._rank


@pytest.mark.parametrize(("real", "cp", "total"), CASES)
def test_megatron_thd_rope_on_a_cp_rank_keeps_global_positions(real, cp, total):
    _, cu_pad = padded_docs(real, 2 * cp, total)
    params = thd_packed_seq_params(cu_pad, cu_pad, total, "cpu")  # tail -> one more document
    cu = params.cu_seqlens_q_padded
    apply_cpu_shims()  # RotaryEmbedding asks torch.cuda for its device
    rope = RotaryEmbedding(8, rotary_percent=1.0, rotary_base=10000.0, cp_group=None)
    freqs = rope(params.max_seqlen_q, packed_seq=True)  # [max_s, 1, 1, 8], not split under CP
    t = torch.randn(total, 2, 8, dtype=torch.float64)
    one = _apply_rotary_pos_emb_thd(t, cu, freqs.double(), cp_group=_FakeCPGroup(1, 0))
    # the one-process result by hand: token i of document d rotates by (i - start_d) * inv_freq
    pos = torch.cat([torch.arange(b - a) for a, b in zip(cu[:-1].tolist(), cu[1:].tolist())])
    inv = 1.0 / 10000.0 ** (torch.arange(0, 8, 2, dtype=torch.float64) / 8)
    ang = torch.cat([pos[:, None] * inv, pos[:, None] * inv], dim=-1)[:, None, :]
    rot = torch.cat([-t[..., 4:], t[..., :4]], dim=-1)
    # megatron builds freqs in fp32: ~1e-6 off the float64 angles; a wrong position is O(1) off
    assert torch.allclose(one, t * ang.cos() + rot * ang.sin(), atol=2e-5)
    for rank in range(cp):
        index = cp_partition_index(cu, total, cp, rank)
        local = _apply_rotary_pos_emb_thd(t[index], cu, freqs.double(),
                                          cp_group=_FakeCPGroup(cp, rank))
        assert torch.equal(local, one[index])


# --------------------------------------------------------------------------- CP attention rows

KERNELS = {"sdpa_mask": PackedSelfAttention, "sdpa_doc": DocumentSDPAAttention,
           "flex": FlexPackedAttention}


def _attention(cls, heads: int, dk: int, dv: int):
    config = TransformerConfig(num_layers=1, hidden_size=heads * dv, num_attention_heads=heads,
                               kv_channels=dv, attention_dropout=0.0, qk_clip=True)
    return cls(config, layer_number=1, attn_mask_type=AttnMaskType.causal, k_channels=dk,
               v_channels=dv)


# flex is slow on CPU (eager block masks): one case
@pytest.mark.parametrize(("kernel", "real", "cp", "total"), [
    *((k, *case) for k in ("sdpa_mask", "sdpa_doc") for case in CASES[:3]),
    ("flex", *CASES[1])])
def test_cp_rows_equal_one_process_attention(kernel, real, cp, total):
    torch.manual_seed(0)
    heads, dk, dv = 2, 12, 8
    cu, cu_pad = padded_docs(real, 2 * cp, total)
    params = thd_packed_seq_params(cu, cu_pad, total, "cpu")
    q, k, v = (torch.randn(total, heads, d, dtype=torch.float64) * 2 for d in (dk, dk, dv))
    backward = kernel != "flex"  # flex has no CPU backward in torch 2.13
    ref_mod = _attention(PackedSelfAttention, heads, dk, dv)
    q0, k0, v0 = (x.clone().requires_grad_(backward) for x in (q, k, v))
    ref = ref_mod._attend_thd(q0, k0, v0, True, params)
    real_tok = torch.zeros(total, dtype=torch.bool)  # padding rows are unused by contract
    for a, n in zip(cu_pad[:-1].tolist(), (cu[1:] - cu[:-1]).tolist()):
        real_tok[a:a + n] = True
    weight = torch.randn_like(ref) * real_tok[:, None, None]
    if backward:
        (ref * weight).sum().backward()
    dk_sum, dv_sum, maxima = torch.zeros_like(k), torch.zeros_like(v), []
    for rank in range(cp):
        index = cp_partition_index(cu_pad, total, cp, rank)
        mod = _attention(KERNELS[kernel], heads, dk, dv)
        ql = q[index].clone().requires_grad_(backward)
        kg, vg = (x.clone().requires_grad_(backward) for x in (k, v))
        out = mod._attend_thd(ql, kg, vg, True, params, q_index=index)
        real_rows = real_tok[index]
        assert torch.allclose(out[real_rows], ref[index][real_rows], atol=1e-10)
        maxima.append(mod.current_max_attn_logits)
        if backward:
            (out * weight[index]).sum().backward()
            assert torch.allclose(ql.grad[real_rows], q0.grad[index][real_rows], atol=1e-10)
            dk_sum += kg.grad
            dv_sum += vg.grad
    assert torch.allclose(torch.stack(maxima).amax(0), ref_mod.current_max_attn_logits)
    if backward:  # the reduce-scatter of the all-gather's backward sums these
        assert torch.allclose(dk_sum, k0.grad, atol=1e-10)
        assert torch.allclose(dv_sum, v0.grad, atol=1e-10)


def test_kernel_choice_under_context_parallelism():
    """A lent GPU without TE: ``auto`` picks varlen without CP but flex with CP (varlen has no CP
    path); asking for varlen with CP is refused at choice time, naming the reason."""
    gpu = Capabilities(cuda=True, transformer_engine=False, varlen=True, flex=True,
                       grouped_gemm=False)
    auto = KernelConfig(backend="local")
    assert choose_kernels(auto, gpu, params_dtype="bf16").attention_kernel == "varlen"
    assert choose_kernels(auto, gpu, params_dtype="bf16",
                          context_parallel=True).attention_kernel == "flex"
    with pytest.raises(ValueError, match="varlen has no context-parallel path"):
        choose_kernels(KernelConfig(backend="local", attention_kernel="varlen"), gpu,
                       params_dtype="bf16", context_parallel=True)
