"""Wire the data pipeline for a job: tokenizer, this DP rank's loader, held-out batches."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch.distributed as dist

from megatron_vlm.config.job import JobConfig
from megatron_vlm.data.contract import PackedBatch
from megatron_vlm.data.corpus import bundled_corpus_dir
from megatron_vlm.data.kimi_tokenizer import SpecialTokensTokenizer
from megatron_vlm.data.mm_loader import MultimodalLoader
from megatron_vlm.data.text_loader import TextLoader, validation_batches
from megatron_vlm.data.tokenizer import SentencePieceTokenizer, get_or_train_tokenizer


@dataclass
class DataSetup:
    """What the trainer needs from the data side."""

    tokenizer: SentencePieceTokenizer | SpecialTokensTokenizer
    loader: TextLoader | MultimodalLoader
    valid: dict[str, list[PackedBatch]]
    """Held-out micro-batches per dataset name (this DP rank's share)."""

    def metrics(self) -> dict[str, float]:
        """Loader metrics (realised mix per dataset and modality, skips); empty for text."""
        return self.loader.metrics() if isinstance(self.loader, MultimodalLoader) else {}

    def close(self) -> None:
        """Stop loader workers (energon's take ~10 s to tear down when abandoned)."""
        if isinstance(self.loader, MultimodalLoader):
            self.loader.close()


def _tokenizer(job: JobConfig, corpus_dir: Path, run_dir: Path) -> SentencePieceTokenizer:
    if job.data.tokenizer_model:
        return SentencePieceTokenizer(job.data.tokenizer_model)
    # Rank 0 trains (or reuses) the run's tokenizer; the others wait and load the same file.
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        tok = get_or_train_tokenizer(corpus_dir, run_dir, job.data.tokenizer_vocab_size,
                                     job.data.seed)
    if dist.is_initialized():
        dist.barrier()
    if rank != 0:
        tok = get_or_train_tokenizer(corpus_dir, run_dir, job.data.tokenizer_vocab_size,
                                     job.data.seed)
    return tok


def build_data(job: JobConfig, dp_rank: int, dp_size: int, run_dir: Path) -> DataSetup:
    """Tokenizer, loader and validation batches for this data-parallel rank."""
    corpus_dir = Path(job.data.corpus_dir) if job.data.corpus_dir else bundled_corpus_dir()
    tok = _tokenizer(job, corpus_dir, Path(run_dir))
    if job.data.multimodal is not None:
        if job.data.global_batch_size % dp_size:
            raise ValueError(
                f"data.global_batch_size={job.data.global_batch_size} is not divisible by the "
                f"data-parallel size {dp_size}; use a multiple of {dp_size}")
        return _build_multimodal(job, tok, dp_rank, dp_size)
    if tok.vocab_size > job.model.llm.vocab_size:
        raise ValueError(
            f"tokenizer has {tok.vocab_size} ids but model.llm.vocab_size="
            f"{job.model.llm.vocab_size}; set model.llm.vocab_size >= {tok.vocab_size}")
    if job.data.global_batch_size % dp_size:
        raise ValueError(
            f"data.global_batch_size={job.data.global_batch_size} is not divisible by the "
            f"data-parallel size {dp_size}; use a multiple of {dp_size}")
    loader = TextLoader(
        corpus_dir / "train.txt", tok, seq_length=job.data.seq_length,
        global_batch_size=job.data.global_batch_size, dp_rank=dp_rank, dp_size=dp_size,
        seed=job.data.seed, pad_to_multiple=job.data.pad_to_multiple,
    )
    num_valid = max(job.train.eval_batches, dp_size)
    all_valid = validation_batches(corpus_dir / "valid.txt", tok, job.data.seq_length, num_valid,
                                   pad_to_multiple=job.data.pad_to_multiple)
    return DataSetup(tok, loader, {"text": all_valid[dp_rank::dp_size]})


def _build_multimodal(job: JobConfig, tok, dp_rank: int, dp_size: int) -> DataSetup:
    """energon loader over the multimodal shards; media tokens appended to the tokenizer."""
    mm_tok = SpecialTokensTokenizer(tok)
    if mm_tok.vocab_size > job.model.llm.vocab_size:
        raise ValueError(
            f"tokenizer with media tokens has {mm_tok.vocab_size} ids but model.llm.vocab_size="
            f"{job.model.llm.vocab_size}; set model.llm.vocab_size >= {mm_tok.vocab_size}")
    loader = MultimodalLoader(
        job.data.multimodal, mm_tok, seq_length=job.data.seq_length,
        global_batch_size=job.data.global_batch_size, dp_rank=dp_rank, dp_size=dp_size,
        seed=job.data.seed, pad_to_multiple=job.data.pad_to_multiple,
    )
    # Already this rank's share of each dataset's val split.
    return DataSetup(mm_tok, loader, loader.validation_batches(job.train.eval_batches))
