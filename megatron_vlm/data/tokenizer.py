"""Text tokenizers: a small protocol and a SentencePiece implementation.

Special ids of every SentencePiece model trained here (fixed, so configs and tests can rely on them):

- ``pad_id = 0``: padding (``<pad>``); never produced by ``encode``.
- ``unk_id = 1``: unknown piece (``<unk>``).
- ``eos_id = 2``: end of document (``</s>``); the data pipeline appends it to every document.
- no BOS (``bos_id = -1``): documents are separated by EOS alone.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Protocol, runtime_checkable

import sentencepiece as spm

PAD_ID = 0
UNK_ID = 1
EOS_ID = 2


@runtime_checkable
class TextTokenizer(Protocol):
    """What the text pipeline needs from a tokenizer."""

    @property
    def vocab_size(self) -> int: ...

    @property
    def eos_id(self) -> int: ...

    @property
    def pad_id(self) -> int: ...

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class SentencePieceTokenizer:
    """A SentencePiece model (BPE or unigram) behind the ``TextTokenizer`` protocol.

    Args:
        model_path: Path of a ``.model`` file.
    """

    def __init__(self, model_path: str | os.PathLike) -> None:
        self.model_path = Path(model_path)
        if not self.model_path.is_file():
            raise ValueError(f"SentencePiece model not found: {self.model_path}")
        self._sp = spm.SentencePieceProcessor(model_file=str(self.model_path))
        if self._sp.eos_id() < 0 or self._sp.pad_id() < 0:
            raise ValueError(
                f"{self.model_path} has no eos or pad piece (eos_id={self._sp.eos_id()}, "
                f"pad_id={self._sp.pad_id()}); train it with train_sentencepiece()"
            )

    @property
    def vocab_size(self) -> int:
        """Number of pieces, special ones included."""
        return int(self._sp.get_piece_size())

    @property
    def eos_id(self) -> int:
        """End-of-document id."""
        return int(self._sp.eos_id())

    @property
    def pad_id(self) -> int:
        """Padding id."""
        return int(self._sp.pad_id())

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (no BOS/EOS added)."""
        return list(self._sp.encode(text, out_type=int))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of each text (one C++ call, much faster than a Python loop)."""
        return [list(ids) for ids in self._sp.encode(texts, out_type=int)]

    def decode(self, ids: list[int]) -> str:
        """Text of ``ids``; special ids (pad, eos) decode to nothing."""
        return str(self._sp.decode([int(i) for i in ids]))


def train_sentencepiece(
    text_file: str | os.PathLike,
    model_prefix: str | os.PathLike,
    vocab_size: int,
    seed: int,
    model_type: str = "bpe",
) -> Path:
    """Train a SentencePiece model on a text file (one sentence/document per line).

    Deterministic: one thread, no input sampling or shuffling, a fixed random seed. The special ids
    are those in this module's docstring.

    Args:
        text_file: Training text.
        model_prefix: Output prefix; writes ``<prefix>.model`` and ``<prefix>.vocab``.
        vocab_size: Number of pieces, special ones included.
        seed: Seed of SentencePiece's random generator.
        model_type: ``"bpe"`` or ``"unigram"``.

    Returns:
        Path of the ``.model`` file.
    """
    if model_type not in ("bpe", "unigram"):
        raise ValueError(f"model_type must be 'bpe' or 'unigram', got {model_type!r}")
    spm.set_random_generator_seed(seed)
    spm.SentencePieceTrainer.train(
        input=str(text_file),
        model_prefix=str(model_prefix),
        vocab_size=vocab_size,
        model_type=model_type,
        character_coverage=1.0,
        # Digits are always pieces, even when the corpus has none: video timestamps (HH:MM:SS.mmm
        # before every chunk, SPEC §2) must not all become <unk>.
        user_defined_symbols=list("0123456789"),
        pad_id=PAD_ID,
        unk_id=UNK_ID,
        eos_id=EOS_ID,
        bos_id=-1,
        num_threads=1,
        input_sentence_size=0,  # use every line: no sampling
        shuffle_input_sentence=False,
        max_sentence_length=1 << 16,  # long documents are one line each
        minloglevel=2,  # quiet
    )
    return Path(f"{model_prefix}.model")


def get_or_train_tokenizer(
    corpus_dir: str | os.PathLike, out_dir: str | os.PathLike, vocab_size: int, seed: int
) -> SentencePieceTokenizer:
    """Load ``out_dir/spm_<vocab_size>.model``, training it on ``corpus_dir/train.txt`` if absent.

    The model is trained into a temporary directory and moved into place with an atomic rename, so
    a reader never sees a half-written file (several processes may race; the last rename wins and
    all candidates are identical since training is deterministic).

    Args:
        corpus_dir: Directory with ``train.txt``.
        out_dir: Cache directory (e.g. the run directory).
        vocab_size: Number of pieces.
        seed: Training seed.

    Returns:
        The tokenizer.
    """
    out = Path(out_dir)
    model_path = out / f"spm_{vocab_size}.model"
    if not model_path.is_file():
        text_file = Path(corpus_dir) / "train.txt"
        if not text_file.is_file():
            raise ValueError(f"no train.txt in corpus_dir={corpus_dir}; cannot train a tokenizer")
        out.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=out, prefix=".spm_tmp_"))
        try:
            trained = train_sentencepiece(text_file, tmp / "spm", vocab_size, seed)
            shutil.move(str(tmp / "spm.vocab"), str(out / f"spm_{vocab_size}.vocab"))
            os.replace(trained, model_path)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return SentencePieceTokenizer(model_path)
