"""Packing layout (SPEC §11) and the greedy packer: values checked against hand-built layouts."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from megatron_vlm.data.contract import PackedBatch
from megatron_vlm.data.corpus import bundled_corpus_dir
from megatron_vlm.data.packing import GreedyPacker, pack_documents
from megatron_vlm.data.text_loader import TextDataset
from megatron_vlm.data.tokenizer import SentencePieceTokenizer, get_or_train_tokenizer

PAD = 0
EOS = 2


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> SentencePieceTokenizer:
    return get_or_train_tokenizer(bundled_corpus_dir(), tmp_path_factory.mktemp("spm"), 1024, 0)


def _segments(batch: PackedBatch) -> np.ndarray:
    """Segment id per position implied by cu_seqlens_padded (-1 on the tail padding)."""
    seg = np.full(batch.seq_length, -1)
    cu = batch.cu_seqlens_padded.tolist()
    for i in range(len(cu) - 1):
        seg[cu[i] : cu[i + 1]] = i
    return seg


def test_pack_documents_layout_by_hand() -> None:
    docs = [[10, 11, 12], [20, 21], [30, 31, 32, 33, 34]]
    b = pack_documents(docs, seq_length=12, pad_id=PAD)
    assert b.tokens.tolist() == [[10, 11, 12, 20, 21, 30, 31, 32, 33, 34, 0, 0]]
    assert b.labels.tolist() == [[11, 12, 0, 21, 0, 31, 32, 33, 34, 0, 0, 0]]
    assert b.loss_mask.tolist() == [[1, 1, 0, 1, 0, 1, 1, 1, 1, 0, 0, 0]]
    assert b.position_ids.tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3, 4, 0, 1]]
    assert b.cu_seqlens.tolist() == [0, 3, 5, 10]
    assert b.cu_seqlens_padded.tolist() == [0, 3, 5, 10]
    assert b.max_seqlen == 5
    assert b.padding_mask.tolist() == [[False] * 10 + [True] * 2]
    assert b.num_loss_tokens == 7
    assert b.tokens.dtype == torch.int64 and b.loss_mask.dtype == torch.float32
    assert b.cu_seqlens.dtype == torch.int32 and b.cu_seqlens_padded.dtype == torch.int32


def test_pack_documents_pad_to_multiple_by_hand() -> None:
    docs = [[10, 11, 12], [20, 21], [30, 31, 32, 33, 34]]
    b = pack_documents(docs, seq_length=20, pad_id=PAD, pad_to_multiple=4)
    assert b.tokens.tolist() == [[10, 11, 12, 0, 20, 21, 0, 0, 30, 31, 32, 33, 34] + [0] * 7]
    assert b.labels.tolist() == [[11, 12, 0, 0, 21, 0, 0, 0, 31, 32, 33, 34] + [0] * 8]
    assert b.loss_mask.tolist() == [[1, 1, 0, 0, 1, 0, 0, 0, 1, 1, 1, 1] + [0] * 8]
    assert b.position_ids.tolist() == [[0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3]]
    assert b.cu_seqlens.tolist() == [0, 3, 5, 10]
    assert b.cu_seqlens_padded.tolist() == [0, 4, 8, 16]
    assert b.max_seqlen == 8
    assert b.padding_mask[0].nonzero().flatten().tolist() == [3, 6, 7, 13, 14, 15, 16, 17, 18, 19]


def test_pack_documents_rejects_bad_input() -> None:
    with pytest.raises(ValueError, match="seq_length=8"):
        pack_documents([[1] * 5, [1] * 3], seq_length=8, pad_id=PAD, pad_to_multiple=2)
    with pytest.raises(ValueError, match="empty document"):
        pack_documents([[1, 2], []], seq_length=8, pad_id=PAD)


@pytest.mark.parametrize("pad_to_multiple", [1, 2, 8])
def test_packed_sequences_never_cross_documents(pad_to_multiple: int) -> None:
    # Token value = 1000 * (doc index + 1) + position in doc: document ids are tracked through
    # the packer independently of its own bookkeeping.
    rng = np.random.default_rng(0)
    lengths_in = rng.integers(0, 90, size=200)
    docs = [[1000 * (j + 1) + k for k in range(int(n))] for j, n in enumerate(lengths_in)]
    packer = GreedyPacker(64, PAD, eos_id=None, pad_to_multiple=pad_to_multiple, num_open=3)
    seen_tokens: list[int] = []
    for b in packer.pack(docs):
        tokens = b.tokens[0].numpy()
        real = ~b.padding_mask[0].numpy()
        doc_id = np.where(real, tokens // 1000, -1)
        seg = _segments(b)
        lengths = np.diff(b.cu_seqlens.numpy())
        spans = np.diff(b.cu_seqlens_padded.numpy())
        assert np.all(lengths > 0) and np.all(spans >= lengths)
        assert np.all(spans % pad_to_multiple == 0)
        assert b.max_seqlen == spans.max()
        # Block-diagonal attention from cu_seqlens_padded never joins two documents.
        same_seg = seg[:, None] == seg[None, :]
        both_real = real[:, None] & real[None, :]
        assert not np.any(same_seg & both_real & (doc_id[:, None] != doc_id[None, :]))
        # Real tokens fill the start of each span; the rest of the span is padding.
        starts = b.cu_seqlens_padded[:-1].numpy()
        expected_real = np.zeros_like(real)
        for start, n in zip(starts, lengths):
            expected_real[start : start + n] = True
        assert np.array_equal(real, expected_real)
        # Where the loss counts, the label is the next token of the same document.
        mask = b.loss_mask[0].numpy() > 0
        idx = np.nonzero(mask)[0]
        assert np.array_equal(b.labels[0].numpy()[idx], tokens[idx] + 1)
        # loss_mask is 0 exactly on padding and on each document's (piece's) last token.
        expected_mask = real.copy()
        expected_mask[starts + lengths - 1] = False
        assert np.array_equal(mask, expected_mask)
        # Positions restart at 0 for every document (a split piece restarts too).
        pos = b.position_ids[0].numpy()
        piece_offset = np.where(real, (tokens % 1000) - pos, 0)
        for start, n in zip(starts, lengths):
            assert pos[start] == 0 and len(set(piece_offset[start : start + n])) == 1
            assert piece_offset[start] % 64 == 0  # pieces of a long document are S-sized
        seen_tokens.extend(tokens[real].tolist())
    assert sorted(seen_tokens) == sorted(t for d in docs for t in d)
    assert packer.stats["split_long_docs"] == int((lengths_in > 64).sum()) > 0
    assert packer.stats["empty_docs"] == int((lengths_in == 0).sum()) > 0


def test_next_fit_layout_by_hand() -> None:
    # With EOS appended the lengths are 4, 3, 6, 2, 1(empty skipped), 8, 3.
    docs = [[5, 5, 5], [6, 6], [7] * 5, [8], [], [9] * 7, [4, 4]]
    packer = GreedyPacker(seq_length=8, pad_id=PAD, eos_id=EOS, num_open=1)
    layouts = list(packer.pack_layouts(docs))
    assert layouts == [
        [[5, 5, 5, EOS], [6, 6, EOS]],  # 7 used; [7]*5+EOS (6) does not fit -> next sequence
        [[7] * 5 + [EOS], [8, EOS]],  # exactly full
        [[9] * 7 + [EOS]],  # fills an empty sequence on its own, not split
        [[4, 4, EOS]],
    ]
    stats = packer.stats
    assert stats["empty_docs"] == 1 and stats["split_long_docs"] == 0 and stats["docs"] == 7
    assert stats["sequences"] == 4
    assert stats["padding_fraction"] == pytest.approx(1 - (4 + 3 + 6 + 2 + 8 + 3) / 32)


def test_first_fit_layout_by_hand() -> None:
    # Lengths with EOS: 5, 5, 3, 2, 4. Two open sequences: 3 goes back into the first one.
    docs = [[1] * 4, [3] * 4, [4] * 2, [5], [6] * 3]
    packer = GreedyPacker(seq_length=8, pad_id=PAD, eos_id=EOS, num_open=2)
    layouts = list(packer.pack_layouts(docs))
    assert layouts == [
        [[1] * 4 + [EOS], [4] * 2 + [EOS]],  # full (5 + 3) -> emitted at once
        [[3] * 4 + [EOS], [5, EOS]],  # 7 used, flushed at the end (oldest first)
        [[6] * 3 + [EOS]],
    ]


def test_split_long_and_empty_documents_are_counted() -> None:
    docs = [list(range(3, 23)), [], [7, 7], [], list(range(3, 12))]  # 21 and 10 tokens with EOS
    packer = GreedyPacker(seq_length=8, pad_id=PAD, eos_id=EOS, num_open=1)
    layouts = list(packer.pack_layouts(docs))
    long_doc = list(range(3, 23)) + [EOS]
    assert layouts[0] == [long_doc[0:8]] and layouts[1] == [long_doc[8:16]]
    assert layouts[2] == [long_doc[16:21], [7, 7, EOS]]
    assert layouts[3] == [list(range(3, 11))] and layouts[4] == [[11, EOS]]
    stats = packer.stats
    assert stats["split_long_docs"] == 2 and stats["split_pieces"] == 5
    assert stats["empty_docs"] == 2 and stats["docs"] == 5
    # Every real token survives, in order (next-fit keeps stream order).
    flat = [t for layout in layouts for d in layout for t in d]
    assert flat == [t for d in docs if d for t in d + [EOS]]


def test_greedy_packer_rejects_bad_config() -> None:
    with pytest.raises(ValueError, match="multiple of pad_to_multiple"):
        GreedyPacker(seq_length=30, pad_id=PAD, pad_to_multiple=8)
    with pytest.raises(ValueError, match="num_open"):
        GreedyPacker(seq_length=32, pad_id=PAD, num_open=0)


def test_padding_fraction_on_bundled_corpus(tokenizer: SentencePieceTokenizer) -> None:
    dataset = TextDataset(bundled_corpus_dir() / "train.txt", tokenizer)
    seq_length = 256
    fractions = {}
    for num_open in (1, 4):
        packer = GreedyPacker(seq_length, tokenizer.pad_id, tokenizer.eos_id, num_open=num_open)
        batches = list(packer.pack(dataset.docs))
        real = sum(int((~b.padding_mask).sum()) for b in batches)
        fraction = 1 - real / (len(batches) * seq_length)
        assert fraction == pytest.approx(packer.stats["padding_fraction"])
        assert real == sum(len(d) + 1 for d in dataset.docs if d)  # every token + EOS kept
        fractions[num_open] = fraction
        print(
            f"num_open={num_open}: {len(batches)} sequences, padding {100 * fraction:.2f}%, "
            f"split long docs {packer.stats['split_long_docs']}"
        )
    assert packer.stats["split_long_docs"] > 0  # the corpus exercises splitting
    assert fractions[4] < 0.10
    assert fractions[4] < fractions[1]
