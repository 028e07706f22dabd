"""Our M-RoPE (``models/mrope.py``, ``model.llm.position_embedding: mrope``) against transformers.

Reference: ``Qwen3ForCausalLM`` whose ``model.rotary_emb`` is replaced by transformers 5.25's
``Qwen2VLRotaryEmbedding`` (sections over the ``d / 2`` frequencies, chunk ``i`` from axis
``i % 3``, then ``cat(f, f)``; Qwen3's attention applies its cos/sin with the ordinary
``apply_rotary_pos_emb``), fed the same 3-axis ids ``[3, 1, L]``. Position ids are written out
by hand from the rule of issue 19 item 4: text sequential; a vision block starting after id
``s_prev`` takes ``t = s``, ``h = s + row``, ``w = s + col`` with ``s = 1 + max so far`` (0 at
a document's start); text resumes at ``1 + max`` of the block.

Tiny fp32 models as in ``test_qwen3_llm.py`` (head dim 16: 8 frequencies, sections [2, 3, 3]).
Measured max |ours - HF|: 3.4e-6 (logits ~4.5); the same ids read as 1D positions: 0.21; h and w
swapped: 0.34.
"""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("transformers")
from qwen3_reference import HEAD_DIM, VOCAB, build_ours, hf_qwen3, our_llm_config, packed_params

ATOL = 1e-5
THETA = 1e4
SECTION = [2, 3, 3]

# Document A: 3 text tokens, a 2x3 image block (s = 3), 2 text tokens (resume at 5 + 1).
DOC_A = torch.tensor([
    [0, 1, 2, 3, 3, 3, 3, 3, 3, 6, 7],   # t
    [0, 1, 2, 3, 3, 3, 4, 4, 4, 6, 7],   # h = s + row
    [0, 1, 2, 3, 4, 5, 3, 4, 5, 6, 7],   # w = s + col
])
# Document B: a 3x2 image block first (s = 0), then 3 text tokens (resume at 2 + 1).
DOC_B = torch.tensor([
    [0, 0, 0, 0, 0, 0, 3, 4, 5],
    [0, 0, 1, 1, 2, 2, 3, 4, 5],
    [0, 1, 0, 1, 0, 1, 3, 4, 5],
])


def hf_mrope(hf):
    """``hf`` with its rotary embedding replaced by ``Qwen2VLRotaryEmbedding`` (same theta and
    head dim, ``mrope_section`` SECTION)."""
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLRotaryEmbedding

    model = copy.deepcopy(hf)
    config = copy.deepcopy(hf.config)
    config.rope_parameters = {"rope_type": "default", "rope_theta": THETA,
                              "mrope_section": SECTION}
    model.model.rotary_emb = Qwen2VLRotaryEmbedding(config)
    assert model.model.rotary_emb.mrope_section == SECTION
    return model


def hf_logits(hf, ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """HF logits of one document; ``positions`` ``[3, L]`` or ``[L]``. The explicit all-ones
    mask keeps transformers from reading the ids as packed-sequence boundaries."""
    pos = positions[:, None, :] if positions.dim() == 2 else positions[None]
    with torch.no_grad():
        return hf(input_ids=ids, position_ids=pos,
                  attention_mask=torch.ones_like(ids)).logits


@pytest.fixture(scope="module")
def models(megatron_groups):
    hf = hf_qwen3(THETA)
    ours = build_ours(our_llm_config(THETA, position_embedding="mrope", mrope_section=SECTION),
                      hf)
    return hf, hf_mrope(hf), ours


def _tokens(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (1, n), generator=torch.Generator().manual_seed(seed))


def test_unpacked_logits_equal_qwen2vl_rotary(models):
    _, hf, ours = models
    ids = _tokens(DOC_A.shape[1], seed=3)
    expected = hf_logits(hf, ids, DOC_A)
    with torch.no_grad():
        got = ours(ids, DOC_A, None)
    assert got.shape == expected.shape and expected.abs().max() > 1.0
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    # Control: the same ids read as 1D positions (t only) give other logits.
    assert (hf_logits(hf, ids, DOC_A[0]) - expected).abs().max() > 1e3 * ATOL


def test_packed_documents_logits_equal_qwen2vl_rotary_per_document(models):
    """Documents A (11 tokens in a span of 12) and B (9 in 10), one THD sequence with
    ``[3, S]`` ids: each document's logits equal HF's on that document alone."""
    _, hf, ours = models
    lengths, spans = [DOC_A.shape[1], DOC_B.shape[1]], [12, 10]
    ids = _tokens(sum(spans), seed=4)
    positions = torch.zeros(3, sum(spans), dtype=torch.long)  # padding ids: 0
    positions[:, :lengths[0]] = DOC_A
    positions[:, spans[0]:spans[0] + lengths[1]] = DOC_B
    with torch.no_grad():
        got = ours(ids, positions, None, packed_seq_params=packed_params(lengths, spans))
    for start, doc in ((0, DOC_A), (spans[0], DOC_B)):
        n = doc.shape[1]
        expected = hf_logits(hf, ids[:, start:start + n], doc)
        torch.testing.assert_close(got[:, start:start + n], expected, atol=ATOL, rtol=0)


def test_text_only_mrope_equals_1d_rope_exactly(models):
    """t = h = w = sequential ids: our M-RoPE angles equal megatron's 1D ``RotaryEmbedding``
    bit for bit, and the M-RoPE model's logits equal the 1D-RoPE model's (same weights) on a
    packed batch."""
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    from megatron_vlm.models.mrope import MultimodalRoPE

    hf_plain, _, ours = models
    n = 40
    pos = torch.arange(n)
    ref = RotaryEmbedding(kv_channels=HEAD_DIM, rotary_percent=1.0, rotary_base=THETA,
                          use_cpu_initialization=True)(n)
    got = MultimodalRoPE(HEAD_DIM, THETA, SECTION)(pos.expand(3, n))
    assert got.shape == ref.shape == (n, 1, 1, HEAD_DIM)
    assert torch.equal(got, ref)

    plain = build_ours(our_llm_config(THETA), hf_plain)
    lengths, spans = [13, 9], [16, 12]
    ids = _tokens(sum(spans), seed=5)
    pos1d = torch.cat([torch.arange(s) for s in spans])[None]
    params = packed_params(lengths, spans)
    with torch.no_grad():
        a = ours(ids, pos1d.expand(3, -1), None, packed_seq_params=params)
        b = plain(ids, pos1d, None, packed_seq_params=params)
    assert torch.equal(a, b)


POS = torch.tensor([[0, 1, 2, 3, 3, 3, 3, 6, 7],
                    [0, 1, 2, 3, 3, 4, 4, 6, 7],
                    [0, 1, 2, 3, 4, 3, 4, 6, 7]])


def test_sectioned_angles_equal_qwen2vl_rotary_at_head_dim_128():
    """Qwen2.5-VL's sections [16, 24, 24] at head dim 128, theta 1e6: cos/sin of our angles ==
    ``Qwen2VLRotaryEmbedding``'s (non-trivial ids)."""
    from transformers import Qwen2VLConfig
    from transformers.models.qwen2_vl.modeling_qwen2_vl import Qwen2VLRotaryEmbedding

    from megatron_vlm.models.mrope import mrope_freqs, rope_inv_freq

    config = Qwen2VLConfig(hidden_size=1024, num_attention_heads=8,
                           rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                                            "mrope_section": [16, 24, 24]}).get_text_config()
    cos, sin = Qwen2VLRotaryEmbedding(config)(torch.zeros(1), 100 * POS[:, None, :])
    freqs = mrope_freqs(100 * POS, rope_inv_freq(128, 1e6), [16, 24, 24])[:, 0, 0]
    assert cos.shape == (1, POS.shape[1], 128)
    torch.testing.assert_close(freqs.cos(), cos[0], atol=0, rtol=0)
    torch.testing.assert_close(freqs.sin(), sin[0], atol=0, rtol=0)


def test_interleaved_style_equals_glm4v_rotary():
    """``style="interleaved"`` (GLM-4.1V: sections [2, 3, 3] of a half-rotated head dim 32,
    adjacent pairs) applied by megatron with ``rotary_interleaved=True`` == transformers'
    ``Glm4vTextRotaryEmbedding`` + GLM-4V ``apply_rotary_pos_emb`` (partial rotary 0.5)."""
    from megatron.core.models.common.embeddings.rope_utils import _apply_rotary_pos_emb_bshd
    from transformers.models.glm4v.configuration_glm4v import Glm4vTextConfig
    from transformers.models.glm4v.modeling_glm4v import (
        Glm4vTextRotaryEmbedding,
        apply_rotary_pos_emb,
    )

    from megatron_vlm.models.mrope import mrope_freqs, rope_inv_freq

    config = Glm4vTextConfig(hidden_size=64, num_attention_heads=2, head_dim=32, rope_parameters={
        "rope_type": "default", "rope_theta": 1e4, "partial_rotary_factor": 0.5,
        "mrope_section": [2, 3, 3]})
    gen = torch.Generator().manual_seed(6)
    q = torch.randn(1, 2, POS.shape[1], 32, generator=gen)  # [b, heads, s, d]
    cos, sin = Glm4vTextRotaryEmbedding(config)(q, POS[:, None, :])
    expected, _ = apply_rotary_pos_emb(q, q, cos, sin)
    freqs = mrope_freqs(POS, rope_inv_freq(16, 1e4), [2, 3, 3], style="interleaved")
    got = _apply_rotary_pos_emb_bshd(q.permute(2, 0, 1, 3), freqs, rotary_interleaved=True)
    torch.testing.assert_close(got.permute(1, 2, 0, 3), expected, atol=1e-6, rtol=0)
    # Control: the sectioned layout is a different rotation.
    other = _apply_rotary_pos_emb_bshd(q.permute(2, 0, 1, 3),
                                       mrope_freqs(POS, rope_inv_freq(16, 1e4), [2, 3, 3]))
    assert (other.permute(1, 2, 0, 3) - expected).abs().max() > 0.1


class _FakeGroup:
    def __init__(self, size: int, rank: int) -> None:
        self._size, self._rank = size, rank

    def size(self) -> int:
        return self._size

    def rank(self) -> int:
        return self._rank


@pytest.mark.parametrize("whole_ids", [True, False], ids=["whole-ids", "rank-local-ids"])
def test_context_parallel_rows_reach_their_tokens(whole_ids):
    """CP = 2: megatron's THD RoPE (``_apply_rotary_pos_emb_thd``, the branch our angles
    select) rotates each of this rank's tokens (``parallel/context.py``'s split) by that
    token's own 3-axis angles, whether the ids come whole or already split."""
    from megatron.core.models.common.embeddings.rope_utils import (
        _apply_rotary_pos_emb_bshd,
        _apply_rotary_pos_emb_thd,
    )

    from megatron_vlm.models.mrope import mrope_freqs, rope_inv_freq, thd_freqs_for_megatron
    from megatron_vlm.parallel.context import context_parallel_layout

    spans, lengths = [12, 8], [11, 8]
    total = sum(spans)
    params = packed_params(lengths, spans)
    positions = torch.zeros(3, total, dtype=torch.long)
    positions[:, :11] = DOC_A
    positions[:, 12:20] = DOC_B[:, 1:] + 7
    inv = rope_inv_freq(HEAD_DIM, THETA)
    whole = mrope_freqs(positions, inv, SECTION)
    for rank in range(2):
        local = context_parallel_layout(params.cu_seqlens_q_padded, total, 2, rank).local_index
        x = torch.randn(total // 2, 2, HEAD_DIM, generator=torch.Generator().manual_seed(rank))
        expected = _apply_rotary_pos_emb_bshd(x[:, None], whole[local])[:, 0]
        ids = positions if whole_ids else positions[:, local]
        freqs = thd_freqs_for_megatron(mrope_freqs(ids, inv, SECTION), params, 2, rank)
        got = _apply_rotary_pos_emb_thd(x, params.cu_seqlens_q_padded, freqs,
                                        cp_group=_FakeGroup(2, rank))
        torch.testing.assert_close(got, expected, atol=0, rtol=0)


def test_mrope_config_is_checked():
    from megatron_vlm.config.model import LLMConfig

    with pytest.raises(ValueError, match=r"summing to head_dim / 2 = 64"):
        LLMConfig(attention="gqa", hidden_size=4096, num_attention_heads=32, kv_channels=128,
                  position_embedding="mrope", mrope_section=[16, 24, 16])
    with pytest.raises(ValueError, match="mrope_section is set but position_embedding=rope"):
        LLMConfig(attention="gqa", mrope_section=[16, 24, 24])
