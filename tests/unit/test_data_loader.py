"""Tokenizer, corpus and text loader: DP sharding, epoch shuffling, exact resume, validation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from megatron_vlm.data.contract import PackedBatch
from megatron_vlm.data.corpus import bundled_corpus_dir, generate_corpus, write_corpus
from megatron_vlm.data.text_loader import TextDataset, TextLoader, validation_batches
from megatron_vlm.data.tokenizer import (
    SentencePieceTokenizer,
    get_or_train_tokenizer,
    train_sentencepiece,
)

SEED = 1234
FIELDS = ("tokens", "labels", "loss_mask", "position_ids", "cu_seqlens", "cu_seqlens_padded")


@pytest.fixture(scope="module")
def spm_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("spm")


@pytest.fixture(scope="module")
def tokenizer(spm_dir: Path) -> SentencePieceTokenizer:
    return get_or_train_tokenizer(bundled_corpus_dir(), spm_dir, 1024, 0)


@pytest.fixture(scope="module")
def small_dataset(tokenizer: SentencePieceTokenizer, tmp_path_factory: pytest.TempPathFactory):
    """The first 300 training documents plus two empty lines: ~50 sequences per epoch."""
    lines = (bundled_corpus_dir() / "train.txt").read_text(encoding="utf-8").splitlines()[:300]
    lines[10] = lines[200] = ""
    path = tmp_path_factory.mktemp("small") / "train.txt"
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return TextDataset(path, tokenizer)


def assert_batches_equal(a: list[PackedBatch], b: list[PackedBatch]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        for name in FIELDS:
            tx, ty = getattr(x, name), getattr(y, name)
            assert tx.dtype == ty.dtype and tx.equal(ty), name
        assert x.max_seqlen == y.max_seqlen


def real_tokens(batch: PackedBatch) -> list[int]:
    return batch.tokens[0][~batch.padding_mask[0]].tolist()


def test_tokenizer_special_ids_and_round_trip(tokenizer: SentencePieceTokenizer) -> None:
    assert (tokenizer.pad_id, tokenizer.eos_id, tokenizer.vocab_size) == (0, 2, 1024)
    for split in ("train.txt", "valid.txt"):
        docs = (bundled_corpus_dir() / split).read_text(encoding="utf-8").splitlines()[:300]
        for doc in docs:
            ids = tokenizer.encode(doc)
            assert tokenizer.decode(ids) == doc
            assert 0 < len(ids) and tokenizer.pad_id not in ids and tokenizer.eos_id not in ids
            assert all(0 <= i < tokenizer.vocab_size for i in ids)
        assert tokenizer.encode_batch(docs[:20]) == [tokenizer.encode(d) for d in docs[:20]]
    assert tokenizer.decode(tokenizer.encode("seven plus two is nine.") + [2, 0]) == (
        "seven plus two is nine."
    )


def test_timestamps_tokenise_without_unknown_pieces(tokenizer: SentencePieceTokenizer) -> None:
    # The text corpus has no digits, but video chunks are preceded by HH:MM:SS.mmm (SPEC §2).
    for stamp in ("00:00:00.000", "00:00:02.000", "00:01:59.500"):
        ids = tokenizer.encode(stamp)
        assert 1 not in ids and tokenizer.decode(ids) == stamp  # 1 = <unk>
    assert tokenizer.encode("00:00:02.000") != tokenizer.encode("00:00:04.000")


def test_tokenizer_training_is_deterministic_and_cached(
    tokenizer: SentencePieceTokenizer, spm_dir: Path, tmp_path: Path
) -> None:
    other = SentencePieceTokenizer(
        train_sentencepiece(bundled_corpus_dir() / "train.txt", tmp_path / "again", 1024, 0)
    )
    pieces = [tokenizer._sp.id_to_piece(i) for i in range(tokenizer.vocab_size)]
    assert pieces == [other._sp.id_to_piece(i) for i in range(other.vocab_size)]
    model = spm_dir / "spm_1024.model"
    mtime = model.stat().st_mtime_ns
    cached = get_or_train_tokenizer(tmp_path / "no-corpus-here", spm_dir, 1024, 0)
    assert model.stat().st_mtime_ns == mtime and cached.model_path == model
    assert not list(spm_dir.glob(".spm_tmp_*"))


def test_corpus_is_deterministic_and_valid_is_held_out(tmp_path: Path) -> None:
    assert generate_corpus(50, 7) == generate_corpus(50, 7)
    assert generate_corpus(50, 7) != generate_corpus(50, 8)
    write_corpus(tmp_path, 200, 40, 3)
    train = (tmp_path / "train.txt").read_text(encoding="utf-8").splitlines()
    valid = (tmp_path / "valid.txt").read_text(encoding="utf-8").splitlines()
    assert train == generate_corpus(200, 3) and len(valid) == 40
    assert not set(valid) & set(train) and len(set(valid)) == 40
    bundled_train = (bundled_corpus_dir() / "train.txt").read_text(encoding="utf-8").splitlines()
    assert bundled_train[:20] == generate_corpus(20, SEED)  # tools/make_corpus.py defaults
    size = sum(p.stat().st_size for p in bundled_corpus_dir().glob("*.txt"))
    assert size < 3_000_000


def test_epoch_stream_is_a_shuffle_of_all_documents(
    tokenizer: SentencePieceTokenizer, small_dataset: TextDataset
) -> None:
    # num_open=1 (next-fit) keeps stream order, so the epoch's real tokens must be exactly the
    # documents (+EOS) in the order of numpy's permutation for (seed, epoch).
    loader = TextLoader(small_dataset, tokenizer, 128, 1, 0, 1, SEED, num_open=1)
    for epoch in range(2):
        got: list[int] = []
        while loader.epoch == epoch:
            got.extend(real_tokens(loader.next_global_batch()[0]))
        order = np.random.default_rng([SEED, epoch]).permutation(len(small_dataset))
        expected = [t for i in order for t in small_dataset[int(i)] + [2] if small_dataset[int(i)]]
        assert got == expected
    assert loader.stats["empty_docs"] == 2


def test_dp_ranks_are_disjoint_and_cover_the_dp1_stream(
    tokenizer: SentencePieceTokenizer, small_dataset: TextDataset
) -> None:
    gbs, num_steps, dp = 8, 15, 4  # 120 sequences: crosses an epoch boundary
    single = TextLoader(small_dataset, tokenizer, 128, gbs, 0, 1, SEED)
    ranks = [TextLoader(small_dataset, tokenizer, 128, gbs, r, dp, SEED) for r in range(dp)]
    for _ in range(num_steps):
        reference = single.next_global_batch()
        per_rank = [loader.next_global_batch() for loader in ranks]
        assert all(len(batches) == gbs // dp for batches in per_rank)
        assert_batches_equal([b for batches in per_rank for b in batches], reference)
        keys = [tuple(b.tokens[0].tolist()) for batches in per_rank for b in batches]
        assert len(set(keys)) == gbs  # every rank reads different sequences
    assert single.epoch >= 1 and all(loader.state_dict() == single.state_dict() for loader in ranks)


@pytest.mark.parametrize("pad_to_multiple", [1, 4])
def test_exact_resume_across_epoch_boundary(
    tokenizer: SentencePieceTokenizer, small_dataset: TextDataset, pad_to_multiple: int
) -> None:
    def make(rank: int = 1, dp: int = 2) -> TextLoader:
        return TextLoader(small_dataset, tokenizer, 128, 6, rank, dp, SEED, pad_to_multiple)

    uninterrupted = make()
    epochs_seen = []
    for _ in range(3):
        uninterrupted.next_global_batch()
    state = json.loads(json.dumps(uninterrupted.state_dict()))
    resumed = make()
    resumed.load_state_dict(state)
    for _ in range(25):  # 150 sequences from step 3: crosses into the next epochs
        epochs_seen.append(uninterrupted.epoch)
        assert_batches_equal(resumed.next_global_batch(), uninterrupted.next_global_batch())
    assert len(set(epochs_seen)) >= 2
    assert resumed.state_dict() == uninterrupted.state_dict()
    # The state is rank-independent: a dp=1 loader resumes the same global stream.
    reshard = make(rank=0, dp=1)
    reshard.load_state_dict(json.loads(json.dumps(uninterrupted.state_dict())))
    both = [make(rank=r) for r in range(2)]
    for loader in both:
        loader.load_state_dict(uninterrupted.state_dict())
    assert_batches_equal(
        reshard.next_global_batch(), [b for x in both for b in x.next_global_batch()]
    )


def test_resume_rejects_a_mismatched_state(
    tokenizer: SentencePieceTokenizer, small_dataset: TextDataset
) -> None:
    state = TextLoader(small_dataset, tokenizer, 128, 4, 0, 1, SEED).state_dict()
    with pytest.raises(ValueError, match="seed"):
        TextLoader(small_dataset, tokenizer, 128, 4, 0, 1, SEED + 1).load_state_dict(state)
    with pytest.raises(ValueError, match="seq_length"):
        TextLoader(small_dataset, tokenizer, 256, 4, 0, 1, SEED).load_state_dict(state)
    with pytest.raises(ValueError, match="multiple of dp_size"):
        TextLoader(small_dataset, tokenizer, 128, 6, 0, 4, SEED)


def test_validation_batches_are_deterministic_in_file_order(
    tokenizer: SentencePieceTokenizer,
) -> None:
    path = bundled_corpus_dir() / "valid.txt"
    first = validation_batches(path, tokenizer, 256, 4)
    assert len(first) == 4
    assert_batches_equal(first, validation_batches(path, tokenizer, 256, 4))
    # Next-fit keeps file order: the first sequence starts with the first lines.
    next_fit = validation_batches(path, tokenizer, 256, 2, num_open=1)
    lines = path.read_text(encoding="utf-8").splitlines()
    expected = tokenizer.encode(lines[0]) + [tokenizer.eos_id] + tokenizer.encode(lines[1])
    assert next_fit[0].tokens[0, : len(expected)].tolist() == expected
    assert next_fit[0].cu_seqlens[1] == len(tokenizer.encode(lines[0])) + 1
    assert len(validation_batches(path, tokenizer, 256, 10**6)) < 10**6  # all there is
