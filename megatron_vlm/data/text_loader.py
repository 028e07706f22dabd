"""Text loader: tokenise a corpus once, shuffle per epoch, pack, shard over data-parallel ranks.

The global stream of packed sequences is the same on every rank and for every DP size: epoch ``e``
shuffles the documents with ``numpy.random.default_rng([seed, e])``, packs them greedily in that
order (``GreedyPacker``) and appends the sequences to the stream; epochs follow each other without
gaps (a global batch may straddle two epochs). Optimizer step ``k`` consumes stream sequences
``[k·G, (k+1)·G)``; DP rank ``r`` takes the contiguous block ``[k·G + r·G/dp, k·G + (r+1)·G/dp)``.

The state (epoch and position in that epoch's sequences) is therefore rank-independent and plain
JSON: a restored loader continues the stream exactly, even with a different DP size.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from megatron_vlm.data.contract import PackedBatch
from megatron_vlm.data.packing import GreedyPacker
from megatron_vlm.data.tokenizer import TextTokenizer

logger = logging.getLogger(__name__)

_STATE_VERSION = 1


class TextDataset:
    """A corpus file (one document per line) tokenised once and kept in memory.

    Empty lines stay as empty documents so indices match lines; the packer skips and counts them.

    Args:
        corpus_file: UTF-8 text, one document per line.
        tokenizer: Any ``TextTokenizer``; ``encode_batch`` is used when it has one.
    """

    def __init__(self, corpus_file: str | os.PathLike, tokenizer: TextTokenizer) -> None:
        self.corpus_file = Path(corpus_file)
        if not self.corpus_file.is_file():
            raise ValueError(f"corpus file not found: {self.corpus_file}")
        lines = self.corpus_file.read_text(encoding="utf-8").splitlines()
        encode_batch = getattr(tokenizer, "encode_batch", None)
        if encode_batch is not None:
            self.docs: list[list[int]] = encode_batch(lines)
        else:
            self.docs = [tokenizer.encode(line) for line in lines]
        self.eos_id = tokenizer.eos_id
        self.pad_id = tokenizer.pad_id
        if not any(self.docs):
            raise ValueError(f"{self.corpus_file} has no non-empty document")

    def __len__(self) -> int:
        return len(self.docs)

    def __getitem__(self, index: int) -> list[int]:
        return self.docs[index]


def _as_dataset(corpus: str | os.PathLike | TextDataset, tokenizer: TextTokenizer) -> TextDataset:
    return corpus if isinstance(corpus, TextDataset) else TextDataset(corpus, tokenizer)


class TextLoader:
    """Packed, shuffled, DP-sharded text micro-batches with exact resume (see module docstring).

    Args:
        corpus_file: Corpus path, or an already tokenised ``TextDataset`` (shared between loaders).
        tokenizer: Gives ``eos_id`` and ``pad_id`` (and tokenises ``corpus_file`` if a path).
        seq_length: ``S``, tokens per packed micro-batch.
        global_batch_size: ``G``, packed sequences per optimizer step over all DP ranks.
        dp_rank: This rank's data-parallel index.
        dp_size: Data-parallel size; must divide ``global_batch_size``.
        seed: Shuffling seed.
        pad_to_multiple: Each document span is padded to a multiple of this (2·cp·tp).
        num_open: Open sequences of the greedy packer (1 = plain next-fit).
    """

    def __init__(
        self,
        corpus_file: str | os.PathLike | TextDataset,
        tokenizer: TextTokenizer,
        seq_length: int,
        global_batch_size: int,
        dp_rank: int,
        dp_size: int,
        seed: int,
        pad_to_multiple: int = 1,
        num_open: int = 4,
    ) -> None:
        if dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise ValueError(
                f"need 0 <= dp_rank < dp_size, got dp_rank={dp_rank} dp_size={dp_size}"
            )
        if global_batch_size < 1 or global_batch_size % dp_size != 0:
            raise ValueError(
                f"global_batch_size={global_batch_size} must be a positive multiple of "
                f"dp_size={dp_size}; set data.global_batch_size to a multiple of dp"
            )
        self.dataset = _as_dataset(corpus_file, tokenizer)
        self.seq_length = seq_length
        self.global_batch_size = global_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.seed = seed
        self.pad_to_multiple = pad_to_multiple
        self.num_open = num_open
        self._packer_args = {
            "seq_length": seq_length,
            "pad_id": tokenizer.pad_id,
            "eos_id": tokenizer.eos_id,
            "pad_to_multiple": pad_to_multiple,
            "num_open": num_open,
        }
        self._to_batch = GreedyPacker(**self._packer_args).to_batch  # validates the arguments
        self._epoch = 0
        self._position = 0  # next sequence index within self._epoch
        self._consumed = 0  # sequences consumed over all epochs (all ranks)
        self._layouts: dict[int, list[list[list[int]]]] = {}
        self._stats: dict[int, dict[str, float]] = {}

    def describe(self) -> list[str]:
        """The corpus for the start-up banner."""
        ds = self.dataset
        tokens = sum(len(d) for d in ds.docs)
        return [f"data: text {getattr(ds, 'corpus_file', '?')} ({len(ds):,} documents, "
                f"{tokens:,} tokens)"]

    @property
    def micro_batches_per_step(self) -> int:
        """Packed sequences this rank processes per optimizer step (``G / dp``)."""
        return self.global_batch_size // self.dp_size

    @property
    def epoch(self) -> int:
        """Epoch of the next sequence to be read."""
        return self._epoch

    @property
    def stats(self) -> dict[str, float]:
        """Packing stats of the current epoch (skips, splits, padding) plus progress."""
        self._epoch_layouts(self._epoch)
        return {**self._stats[self._epoch], "epoch": self._epoch, "consumed": self._consumed}

    def _epoch_layouts(self, epoch: int) -> list[list[list[int]]]:
        if epoch not in self._layouts:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.dataset))
            packer = GreedyPacker(**self._packer_args)
            layouts = list(packer.pack_layouts(self.dataset.docs[int(i)] for i in order))
            self._stats[epoch] = packer.stats
            stats = packer.stats
            logger.info(
                "text epoch %d: %d sequences, padding %.1f%%, %d empty docs skipped, "
                "%d long docs split",
                epoch,
                stats["sequences"],
                100 * stats["padding_fraction"],
                stats["empty_docs"],
                stats["split_long_docs"],
            )
            for old in [e for e in self._layouts if e < epoch]:  # keep memory bounded
                del self._layouts[old]
            self._layouts[epoch] = layouts
        return self._layouts[epoch]

    def _take(self, num: int) -> list[list[list[int]]]:
        """Next ``num`` layouts of the global stream, rolling over epochs."""
        taken: list[list[list[int]]] = []
        while len(taken) < num:
            layouts = self._epoch_layouts(self._epoch)
            chunk = layouts[self._position : self._position + num - len(taken)]
            taken.extend(chunk)
            self._position += len(chunk)
            if self._position >= len(layouts):
                self._epoch += 1
                self._position = 0
        self._consumed += num
        return taken

    def next_global_batch(self) -> list[PackedBatch]:
        """This rank's micro-batches for one optimizer step (``G / dp`` packed sequences)."""
        layouts = self._take(self.global_batch_size)
        per_rank = self.micro_batches_per_step
        mine = layouts[self.dp_rank * per_rank : (self.dp_rank + 1) * per_rank]
        return [self._to_batch(layout) for layout in mine]

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable position in the global stream (identical on every DP rank)."""
        return {
            "version": _STATE_VERSION,
            "epoch": self._epoch,
            "position": self._position,
            "consumed_sequences": self._consumed,
            "seed": self.seed,
            "seq_length": self.seq_length,
            "pad_to_multiple": self.pad_to_multiple,
            "num_open": self.num_open,
            "num_docs": len(self.dataset),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the stream from ``state`` (from ``state_dict``, possibly another DP size).

        Raises:
            ValueError: If the state was made with a different corpus, seed or packing.
        """
        expected = {
            "version": _STATE_VERSION,
            "seed": self.seed,
            "seq_length": self.seq_length,
            "pad_to_multiple": self.pad_to_multiple,
            "num_open": self.num_open,
            "num_docs": len(self.dataset),
        }
        wrong = {k: (state.get(k), v) for k, v in expected.items() if state.get(k) != v}
        if wrong:
            detail = ", ".join(f"{k}: saved {s!r} vs now {n!r}" for k, (s, n) in wrong.items())
            raise ValueError(
                f"text loader state does not match this loader ({detail}); resume with the "
                "same corpus, seed and packing settings, or start the data stream afresh"
            )
        epoch, position = int(state["epoch"]), int(state["position"])
        if position < 0 or position >= len(self._epoch_layouts(epoch)):
            raise ValueError(f"text loader state position {position} is outside epoch {epoch}")
        self._epoch, self._position = epoch, position
        self._consumed = int(state["consumed_sequences"])


def validation_batches(
    corpus_file: str | os.PathLike | TextDataset,
    tokenizer: TextTokenizer,
    seq_length: int,
    num_batches: int,
    pad_to_multiple: int = 1,
    num_open: int = 4,
) -> list[PackedBatch]:
    """The first ``num_batches`` packed sequences of a corpus in file order (no shuffle).

    Deterministic, for held-out loss. Returns fewer if the corpus packs into fewer sequences.

    Args:
        corpus_file: Corpus path or ``TextDataset``.
        tokenizer: Tokenizer (ids, and tokenising a path).
        seq_length: ``S``.
        num_batches: Number of packed sequences wanted (>= 1).
        pad_to_multiple: Document span multiple.
        num_open: Open sequences of the greedy packer.
    """
    if num_batches < 1:
        raise ValueError(f"num_batches must be >= 1, got {num_batches}")
    dataset = _as_dataset(corpus_file, tokenizer)
    packer = GreedyPacker(seq_length, tokenizer.pad_id, tokenizer.eos_id, pad_to_multiple, num_open)
    batches: list[PackedBatch] = []
    for layout in packer.pack_layouts(dataset.docs):
        batches.append(packer.to_batch(layout))
        if len(batches) == num_batches:
            break
    return batches
