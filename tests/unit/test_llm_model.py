"""The tiny LLM on packed batches exactly as the data contract (SPEC §11) allows them."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from megatron_vlm.data.contract import PackedBatch


def packed_batch(tokens: torch.Tensor, real: list[int], spans: list[int]) -> PackedBatch:
    """Documents of ``real`` lengths in padded ``spans``; ``tokens`` may extend past the spans
    (tail padding, allowed by the contract: ``cu_seqlens_padded[-1] <= S``)."""
    s = tokens.shape[1]
    cu = torch.tensor([0, *torch.tensor(real).cumsum(0).tolist()], dtype=torch.int32)
    cu_pad = torch.tensor([0, *torch.tensor(spans).cumsum(0).tolist()], dtype=torch.int32)
    position_ids = torch.zeros(1, s, dtype=torch.long)
    loss_mask = torch.zeros(1, s)
    for start, n in zip(cu_pad[:-1].tolist(), real):
        position_ids[0, start : start + n] = torch.arange(n)
        loss_mask[0, start : start + n - 1] = 1.0
    return PackedBatch(
        tokens=tokens, labels=torch.roll(tokens, -1, 1), loss_mask=loss_mask,
        position_ids=position_ids, cu_seqlens=cu, cu_seqlens_padded=cu_pad, max_seqlen=max(spans),
    )


@pytest.mark.parametrize(
    "real,spans,tail",
    [([10, 6], [12, 8], 4), ([4, 3], [4, 4], 16)],
    ids=["short-tail", "tail-longer-than-every-document"],
)
def test_packed_batch_with_tail_padding(megatron_groups, real, spans, tail):
    """A micro-batch whose last document ends before S (tail padding, which the contract and
    ``data/packing.py`` produce) must run, and its real tokens' logits must equal those of the
    same documents without the tail. The tail may be longer than every document (a nearly empty
    micro-batch at the end of an epoch), i.e. longer than ``max_seqlen``."""
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from megatron_vlm.config import ParallelConfig
    from megatron_vlm.models.llm import build_llm
    from megatron_vlm.recipes.tiny import tiny_llm
    from megatron_vlm.training.step import model_inputs

    torch.manual_seed(0)
    model_parallel_cuda_manual_seed(0)
    llm = dataclasses.replace(tiny_llm(vocab_size=128), init_method_std=0.2)
    model = build_llm(llm, ParallelConfig()).eval()
    tokens = torch.randint(0, 128, (1, sum(spans) + tail),
                           generator=torch.Generator().manual_seed(2))
    with_tail = packed_batch(tokens, real, spans)
    without_tail = packed_batch(tokens[:, : sum(spans)], real, spans)

    def logits(batch: PackedBatch) -> torch.Tensor:
        inputs = model_inputs(batch, torch.device("cpu"), model)
        inputs.pop("labels")
        with torch.no_grad():
            return model(**inputs)

    ref = logits(without_tail)
    out = logits(with_tail)
    assert out.shape[1] == tokens.shape[1]
    real_pos = ~with_tail.padding_mask[0, : sum(spans)]
    torch.testing.assert_close(out[0, : sum(spans)][real_pos], ref[0][real_pos], atol=2e-5, rtol=0)


def test_padded_vocabulary_never_enters_the_softmax(megatron_groups):
    """vocab 200 is padded to 256: the padded columns' logits are -inf, the loss equals a cross
    entropy over the 200 real columns (computed here with torch), and the padded output rows get
    no gradient -- so the loss of given weights does not depend on how the vocabulary is padded."""
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from megatron_vlm.config import ParallelConfig
    from megatron_vlm.models.llm import build_llm, padded_vocab_size
    from megatron_vlm.recipes.tiny import tiny_llm
    from megatron_vlm.training.step import model_inputs

    vocab = 200
    assert padded_vocab_size(vocab, 1) == padded_vocab_size(vocab, 2) == 256
    assert padded_vocab_size(1152, 8) == 1152 and padded_vocab_size(1000, 3) == 3 * 384
    torch.manual_seed(0)
    model_parallel_cuda_manual_seed(0)
    llm = dataclasses.replace(tiny_llm(vocab_size=vocab), init_method_std=0.2,
                              untie_embeddings=True)
    model = build_llm(llm, ParallelConfig())
    tokens = torch.randint(0, vocab, (1, 24), generator=torch.Generator().manual_seed(3))
    batch = packed_batch(tokens, [14, 10], [14, 10])
    inputs = model_inputs(batch, torch.device("cpu"), model)
    labels = inputs.pop("labels")
    logits = model(**inputs)  # [1, S, 256]
    assert logits.shape[-1] == 256
    assert torch.isneginf(logits[..., vocab:]).all()
    assert torch.isfinite(logits[..., :vocab]).all()
    per_token = model(**inputs, labels=labels)  # megatron's vocab-parallel cross entropy, [1, S]
    ref = torch.nn.functional.cross_entropy(logits[0, :, :vocab].detach(), labels[0],
                                            reduction="none")
    torch.testing.assert_close(per_token[0].detach(), ref, atol=1e-5, rtol=1e-5)
    per_token.sum().backward()
    grad = model.output_layer.weight.grad
    assert grad[vocab:].abs().max() == 0
    assert grad[:vocab].abs().max() > 0
