"""Qwen3 LLM (``model.llm.attention: gqa``) from megatron-core modules == transformers'
``Qwen3ForCausalLM``: GQA (4 query / 2 key-value heads), per-head q/k RMSNorm, no biases,
untied head, head dim 16 != hidden / heads (``kv_channels``), dense SwiGLU.

Tiny fp32 models (``qwen3_reference.py``), weights mapped by an explicit name table. Our packed
THD path (two documents with padding in their spans, ``cu_seqlens``; megatron's 1D RoPE restarts
per document) against HF run on each document alone, and a plain single sequence (sbhd).
Measured max |ours - HF|: 4e-6 (fp32 summation order) on logits of magnitude ~5; q norms
left at 1 instead: 3.7.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

pytest.importorskip("transformers")
from qwen3_reference import VOCAB, build_ours, hf_qwen3, our_llm_config, packed_params

ATOL = 1e-5
THETA = 1e4  # short sequences: a fast-rotating base makes position errors visible


@pytest.fixture(scope="module")
def models(megatron_groups):
    hf = hf_qwen3(THETA)
    return hf, build_ours(our_llm_config(THETA), hf)


def _tokens(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, VOCAB, (1, n), generator=torch.Generator().manual_seed(seed))


def test_single_sequence_logits_equal_transformers(models):
    hf, ours = models
    ids = _tokens(19, seed=1)
    with torch.no_grad():
        expected = hf(input_ids=ids).logits
        got = ours(ids, torch.arange(19)[None], None)
    assert got.shape == expected.shape == (1, 19, VOCAB)
    assert expected.abs().max() > 1.0
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


@pytest.mark.parametrize("kernel", ["sdpa_mask", "sdpa_doc", "flex"])
def test_packed_documents_logits_equal_transformers_per_document(models, kernel):
    """Two documents (real 11 and 7 tokens in spans of 12 and 10) in one THD sequence: each
    document's logits equal HF's on that document alone (positions restart at 0), with each
    packed attention kernel that runs on CPU (key/value heads repeated for GQA)."""
    from megatron_vlm.config.model import KernelConfig

    hf, ours = models
    if kernel != "sdpa_mask":
        ours = build_ours(our_llm_config(THETA), hf, KernelConfig(attention_kernel=kernel))
    lengths, spans = [11, 7], [12, 10]
    ids = _tokens(sum(spans), seed=2)
    positions = torch.cat([torch.arange(n) for n in spans])[None]
    with torch.no_grad():
        got = ours(ids, positions, None, packed_seq_params=packed_params(lengths, spans))
        starts = [0, spans[0]]
        for start, n in zip(starts, lengths):
            expected = hf(input_ids=ids[:, start:start + n]).logits
            torch.testing.assert_close(got[:, start:start + n], expected, atol=ATOL, rtol=0)
    # Control: the second document at the first one's offset (no restart) would differ.
    with torch.no_grad():
        shifted = hf(input_ids=ids[:, :spans[0] + lengths[1]]).logits[:, spans[0]:]
    assert (shifted - got[:, spans[0]:spans[0] + lengths[1]]).abs().max() > 100 * ATOL


def test_qwen3_8b_transformer_config_fields():
    """Qwen3-8B sizes map onto megatron's ``TransformerConfig`` field by field (not megatron's
    defaults: ``kv_channels`` would be 4096 / 32 = 128 by luck here, so also check a head dim
    that differs), and GQA leaves the MLA fields out."""
    from megatron.core.transformer.transformer_config import MLATransformerConfig

    from megatron_vlm.config import ParallelConfig
    from megatron_vlm.config.model import LLMConfig
    from megatron_vlm.models.llm import build_transformer_config, llm_head_dims

    llm = LLMConfig(attention="gqa", vocab_size=151936, hidden_size=4096, num_layers=36,
                    num_attention_heads=32, num_query_groups=8, kv_channels=128,
                    qk_layernorm=True, ffn_hidden_size=12288, num_experts=None,
                    num_dense_layers=36, rope_theta=1e6, norm_epsilon=1e-6,
                    untie_embeddings=True, max_position_embeddings=32768)
    c = build_transformer_config(llm, ParallelConfig(), "bf16")
    assert not isinstance(c, MLATransformerConfig) and not c.multi_latent_attention
    assert (c.hidden_size, c.num_layers, c.num_attention_heads) == (4096, 36, 32)
    assert (c.num_query_groups, c.kv_channels, c.ffn_hidden_size) == (8, 128, 12288)
    assert c.qk_layernorm and not c.add_qkv_bias and not c.add_bias_linear
    assert c.gated_linear_unit and c.normalization == "RMSNorm" and c.layernorm_epsilon == 1e-6
    assert not c.rotary_interleaved and not c.apply_rope_fusion and c.num_moe_experts is None
    assert llm_head_dims(llm) == (128, 128)
    c = build_transformer_config(dataclasses.replace(llm, kv_channels=96), ParallelConfig())
    assert c.kv_channels == 96


def test_gqa_fields_are_refused_with_mla_and_bad_groups():
    from megatron_vlm.config.model import LLMConfig

    with pytest.raises(ValueError, match="num_query_groups applies to attention=gqa"):
        LLMConfig(num_query_groups=8)
    with pytest.raises(ValueError, match="must divide num_attention_heads"):
        LLMConfig(attention="gqa", num_attention_heads=32, num_query_groups=5)
    with pytest.raises(ValueError, match="position_embedding=mrope needs attention=gqa"):
        LLMConfig(position_embedding="mrope", mrope_section=[16, 24, 24])
