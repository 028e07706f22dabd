"""Wire the data pipeline for a job: tokenizer, this DP rank's loader, held-out batches."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch.distributed as dist

from megatron_vlm.config.job import JobConfig
from megatron_vlm.config.model import TokenIdsConfig
from megatron_vlm.data.contract import PackedBatch
from megatron_vlm.data.corpus import bundled_corpus_dir
from megatron_vlm.data.media_rules import MediaRules, kimi_media_rules
from megatron_vlm.data.prepacked import PrepackedLoader
from megatron_vlm.data.templates import MEDIA_SPECIAL_TOKENS
from megatron_vlm.data.text_loader import TextLoader, validation_batches
from megatron_vlm.data.token_ids import (
    resolve_token_ids,
    tokenizer_for_model,
    tokenizer_token_ids,
)
from megatron_vlm.data.tokenizer import SentencePieceTokenizer, Tokenizer, get_or_train_tokenizer
from megatron_vlm.data.tokenizer_loader import load_tokenizer
from megatron_vlm.parallel import comm
from megatron_vlm.parallel.batch_handoff import (
    ReplicaLoader,
    hand_off_from_loader,
    is_batch_source,
)

if TYPE_CHECKING:  # energon is imported only when a multimodal loader is built
    from megatron_vlm.data.mm_loader import MultimodalLoader


@dataclass
class DataSetup:
    """What the trainer needs from the data side."""

    tokenizer: Tokenizer
    loader: TextLoader | MultimodalLoader | PrepackedLoader | ReplicaLoader | None
    """This DP rank's loader; after :func:`share_batches` a ``ReplicaLoader`` on every rank
    (None on a rank that receives its batches, between ``build_data`` and ``share_batches``)."""
    valid: dict[str, list[PackedBatch]]
    """Held-out micro-batches per dataset name (this DP rank's share)."""
    token_ids: TokenIdsConfig | None = None
    """``model.token_ids`` resolved against the tokenizer (what checkpoints record)."""
    notes: list[str] = field(default_factory=list)
    """Start-up notes for the log (document ids that yielded to the tokenizer's)."""

    def metrics(self) -> dict[str, float]:
        """Loader metrics (realised mix per dataset and modality, skips); empty for text."""
        metrics = getattr(self.loader, "metrics", None)
        return metrics() if metrics is not None else {}

    def close(self) -> None:
        """Stop loader workers (energon's take ~10 s to tear down when abandoned)."""
        close = getattr(self.loader, "close", None)
        if close is not None:
            close()


def _trained_tokenizer(job: JobConfig, corpus_dir: Path, run_dir: Path) -> SentencePieceTokenizer:
    """The tiny recipes' SentencePiece model, trained on the corpus into the run directory."""
    # Rank 0 trains (or reuses) the run's tokenizer; the others wait and load the same file.
    rank = dist.get_rank() if dist.is_initialized() else 0
    if rank == 0:
        tok = get_or_train_tokenizer(corpus_dir, run_dir, job.data.tokenizer_vocab_size,
                                     job.data.seed)
    if dist.is_initialized():
        comm.barrier()
    if rank != 0:
        tok = get_or_train_tokenizer(corpus_dir, run_dir, job.data.tokenizer_vocab_size,
                                     job.data.seed)
    return tok


def media_rules_for(job: JobConfig) -> MediaRules:
    """The model family's media rules for this job's data (``ModelFamily.media_rules``; Kimi
    K2.5's for a family that declares none)."""
    from megatron_vlm.families import family_media_rules  # family modules build models: lazily

    return family_media_rules(job.model.family, job.data.multimodal)


def build_tokenizer(job: JobConfig, corpus_dir: Path, run_dir: Path) -> Tokenizer:
    """The run's tokenizer: ``data.tokenizer`` if set (media tokens must be in it), else a
    SentencePiece model trained here; a VLM's SentencePiece gets its family's media tokens
    appended.

    Raises:
        ValueError: A tokenizer that cannot be read, lacks the media tokens a VLM needs, or has
            more ids than ``model.llm.vocab_size``.
    """
    if job.data.tokenizer:
        tok = load_tokenizer(job.data.tokenizer, job.data.tokenizer_type)
    else:
        tok = _trained_tokenizer(job, corpus_dir, run_dir)
    rules = media_rules_for(job) if job.model.is_vlm else None
    tok = tokenizer_for_model(tok, job.model.is_vlm,
                              rules.special_tokens if rules else MEDIA_SPECIAL_TOKENS)
    rows = embedding_rows(tok, job.model.is_vlm, rules)  # raises naming missing media tokens
    if rows > job.model.llm.vocab_size:
        raise ValueError(
            f"the tokenizer ({tok.describe()}) has {rows} ids but "
            f"model.llm.vocab_size={job.model.llm.vocab_size}; set model.llm.vocab_size >= "
            f"{rows} or use the model's own tokenizer")
    return tok


def embedding_rows(tok: Tokenizer, is_vlm: bool, rules: MediaRules | None = None) -> int:
    """Embedding rows the tokenizer needs: its ids, less media placeholders at the top of the
    range (Kimi's video placeholder is the first id past the table: the model replaces
    placeholders with vision features before the lookup, so they need no row). ``rules``: the
    family's media rules (Kimi's by default)."""
    rows = tok.vocab_size
    if is_vlm:
        placeholders = (rules or kimi_media_rules()).media_ids(tok).placeholder_ids
        while rows - 1 in placeholders:
            rows -= 1
    return rows


def build_data(job: JobConfig, dp_rank: int, dp_size: int, run_dir: Path,
               pg_collection=None) -> DataSetup:
    """Tokenizer, loader and validation batches for this data-parallel rank.

    With ``pg_collection`` (the runtime's groups) only the replica's source rank (TP 0, CP 0,
    PP stage 0, ``parallel.batch_handoff``) builds a loader and validation batches; the other
    ranks get the tokenizer only, and :func:`share_batches` (after the ranks agree the build
    worked) connects them. Without groups every rank builds its own (tests, tools).
    """
    corpus_dir = Path(job.data.corpus_dir) if job.data.corpus_dir else bundled_corpus_dir()
    tok = build_tokenizer(job, corpus_dir, Path(run_dir))
    rules = media_rules_for(job) if job.model.is_vlm else None
    token_ids, notes = resolve_token_ids(job.model.token_ids, tok, job.model.is_vlm, rules)
    if is_batch_source(pg_collection):
        setup = _build_loaders(job, tok, corpus_dir, dp_rank, dp_size)
    else:
        _check_batch_size(job, dp_size)
        setup = DataSetup(tok, None, {})
    setup.token_ids, setup.notes = token_ids, notes
    return setup


def share_batches(data: DataSetup, pg_collection) -> DataSetup:
    """Connect a replica's ranks to its source (collective over every rank; call it on all ranks
    after :func:`build_data` with the same groups): the loader becomes a ``ReplicaLoader`` that
    hands each step's batches over, and the source's validation batches are handed over once.
    Without groups, ``data`` as it is."""
    if pg_collection is None:
        return data
    source = is_batch_source(pg_collection)
    data.loader = ReplicaLoader(data.loader if source else None, pg_collection)
    data.valid = hand_off_from_loader(data.valid if source else None, pg_collection)
    return data


def _check_batch_size(job: JobConfig, dp_size: int) -> None:
    if job.data.global_batch_size % dp_size:
        raise ValueError(
            f"data.global_batch_size={job.data.global_batch_size} is not divisible by the "
            f"data-parallel size {dp_size}; use a multiple of {dp_size}")


def _build_loaders(job: JobConfig, tok: Tokenizer, corpus_dir: Path, dp_rank: int,
                   dp_size: int) -> DataSetup:
    _check_batch_size(job, dp_size)
    if job.data.prepacked:
        return _build_prepacked(job, tok, dp_rank, dp_size)
    if job.data.multimodal is not None:
        return _build_multimodal(job, tok, dp_rank, dp_size)
    loader = TextLoader(
        corpus_dir / "train.txt", tok, seq_length=job.data.seq_length,
        global_batch_size=job.data.global_batch_size, dp_rank=dp_rank, dp_size=dp_size,
        seed=job.data.seed, pad_to_multiple=job.data.pad_to_multiple,
    )
    num_valid = max(job.train.eval_batches, dp_size)
    all_valid = validation_batches(corpus_dir / "valid.txt", tok, job.data.seq_length, num_valid,
                                   pad_to_multiple=job.data.pad_to_multiple)
    return DataSetup(tok, loader, {"text": all_valid[dp_rank::dp_size]})


def _build_prepacked(job: JobConfig, tok: Tokenizer, dp_rank: int, dp_size: int) -> DataSetup:
    """Micro-batches replayed from ``data.prepacked`` (no energon import)."""
    loader = PrepackedLoader(job.data.prepacked, seq_length=job.data.seq_length,
                             global_batch_size=job.data.global_batch_size, dp_rank=dp_rank,
                             dp_size=dp_size)
    rules = media_rules_for(job) if job.model.is_vlm else None
    ids = tokenizer_token_ids(tok, job.model.is_vlm, rules)
    loader.check_tokenizer(tok.vocab_size, dataclasses.asdict(ids))
    return DataSetup(tok, loader, loader.validation_batches(job.train.eval_batches))


def _build_multimodal(job: JobConfig, tok: Tokenizer, dp_rank: int, dp_size: int) -> DataSetup:
    """energon loader over the multimodal shards."""
    from megatron_vlm.data.mm_loader import MultimodalLoader

    rules = media_rules_for(job)
    loader = MultimodalLoader(
        job.data.multimodal, tok, seq_length=job.data.seq_length,
        global_batch_size=job.data.global_batch_size, dp_rank=dp_rank, dp_size=dp_size,
        seed=job.data.seed, pad_to_multiple=job.data.pad_to_multiple,
        media_rules=rules, position_rule=rules.position_rule,
    )
    # Already this rank's share of each dataset's val split.
    return DataSetup(tok, loader, loader.validation_batches(job.train.eval_batches))
