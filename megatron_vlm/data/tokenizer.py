"""The tokenizer interface every model family uses, and the SentencePiece implementation.

``Tokenizer`` (a Protocol) is what the data pipeline, the templates, the trainer's banner and the HF
export need from a tokenizer: encoding with and without special-token parsing, special-token names
-> ids, the end-of-document token, the chat template, and the files to ship beside an exported
checkpoint. Implementations: ``SentencePieceTokenizer`` (a ``.model`` file; the tiny recipes train
one on the bundled corpus), ``KimiTokenizer`` (Kimi's tiktoken BPE file +
``tokenizer_config.json``), ``SpecialTokensTokenizer`` (any of them plus the media tokens the
template needs) and ``HFTokenizer`` (anything ``transformers.AutoTokenizer`` loads:
``tokenizer.json`` of Qwen / GLM / InternVL). ``load_tokenizer`` in ``tokenizer_loader.py`` picks
one for a path.

Special ids of every SentencePiece model trained here (fixed, so configs and tests can rely on
them):

- ``pad_id = 0``: padding (``<pad>``); never produced by ``encode``.
- ``unk_id = 1``: unknown piece (``<unk>``).
- ``eos_id = 2``: end of document (``</s>``); the data pipeline appends it to every document.
- no BOS (``bos_id = -1``): documents are separated by EOS alone.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import sentencepiece as spm

from megatron_vlm.data.chat_template import render_chat_template
from megatron_vlm.data.templates import SPECIAL_TOKEN_STRINGS, MediaTokenIds

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


@runtime_checkable
class Tokenizer(TextTokenizer, Protocol):
    """The one tokenizer interface (see the module docstring)."""

    @property
    def special_tokens(self) -> Mapping[str, int]:
        """Special-token string -> id (media, chat and document tokens)."""
        ...

    @property
    def bos_id(self) -> int | None: ...

    @property
    def chat_template(self) -> str | None:
        """Jinja chat template shipped with the tokenizer (None if it has none)."""
        ...

    def token_id(self, token: str) -> int: ...

    def encode_with_special(self, text: str) -> list[int]: ...

    def media_token_ids(self) -> MediaTokenIds: ...

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]],
                            add_generation_prompt: bool = False) -> str: ...

    def save_pretrained(self, out_dir: str | os.PathLike) -> list[Path]: ...

    def describe(self) -> str: ...


class MissingSpecialTokenError(ValueError):
    """The tokenizer lacks special tokens the model family's templates need."""


class TokenizerBase:
    """Shared behaviour of the ``Tokenizer`` implementations (lookups, media ids, chat template).

    Subclasses provide ``special_tokens``, ``encode``/``encode_with_special``/``decode``,
    ``vocab_size``, ``eos_id``, ``pad_id``, ``bos_id``, ``chat_template`` and ``save_pretrained``.
    """

    special_tokens: Mapping[str, int]
    chat_template: str | None = None
    bos_id: int | None = None

    def token_id(self, token: str) -> int:
        """Id of a special-token string (KeyError naming the tokenizer otherwise)."""
        if token not in self.special_tokens:
            raise KeyError(f"{token!r} is not a special token of {self.describe()}")
        return self.special_tokens[token]

    def media_token_ids(self) -> MediaTokenIds:
        """Ids of the media template's special tokens, looked up by name (never hard-coded).

        Raises:
            MissingSpecialTokenError: Some of the required tokens are absent (names listed).
        """
        optional = {"fast_start", "fast_end"}
        missing = [tok for name, tok in SPECIAL_TOKEN_STRINGS.items()
                   if name not in optional and tok not in self.special_tokens]
        if missing:
            raise MissingSpecialTokenError(
                f"{self.describe()} lacks the media tokens {missing} that the Kimi templates "
                "need; use the tokenizer shipped with the model (its tokenizer_config.json names "
                "them) or one that defines them")
        return MediaTokenIds(**{name: self.special_tokens.get(tok)
                                for name, tok in SPECIAL_TOKEN_STRINGS.items()})

    def _token_string(self, token_id: int | None) -> str | None:
        if token_id is None:
            return None
        for tok, i in self.special_tokens.items():
            if i == token_id:
                return tok
        return None

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]],
                            add_generation_prompt: bool = False) -> str:
        """The prompt text of role-tagged ``messages`` under this tokenizer's chat template."""
        strings = {"bos_token": self._token_string(self.bos_id),
                   "eos_token": self._token_string(self.eos_id),
                   "pad_token": self._token_string(self.pad_id)}
        return render_chat_template(self.chat_template, messages,
                                    add_generation_prompt=add_generation_prompt,
                                    special_tokens=strings)

    def describe(self) -> str:
        return f"{type(self).__name__} ({self.vocab_size} ids)"


def write_tokenizer_config(out_dir: Path, config: Mapping[str, Any]) -> Path:
    """Write ``tokenizer_config.json`` (sorted, indented, group-readable)."""
    path = Path(out_dir) / "tokenizer_config.json"
    path.write_text(json.dumps(dict(config), indent=2, ensure_ascii=False) + "\n")
    return path


def added_tokens_decoder(special_tokens: Mapping[str, int]) -> dict[str, dict[str, Any]]:
    """transformers' ``added_tokens_decoder`` entries for ``special_tokens``."""
    return {str(i): {"content": tok, "lstrip": False, "normalized": False, "rstrip": False,
                     "single_word": False, "special": True}
            for tok, i in sorted(special_tokens.items(), key=lambda kv: kv[1])}


class SentencePieceTokenizer(TokenizerBase):
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

    @property
    def special_tokens(self) -> dict[str, int]:
        """The control pieces (pad, unk, eos; bos when the model has one)."""
        ids = (self._sp.pad_id(), self._sp.unk_id(), self._sp.eos_id(), self._sp.bos_id())
        return {self._sp.id_to_piece(i): int(i) for i in ids if i >= 0}

    @property
    def bos_id(self) -> int | None:
        return int(self._sp.bos_id()) if self._sp.bos_id() >= 0 else None

    def encode_with_special(self, text: str) -> list[int]:
        """SentencePiece never parses its control pieces out of text: same as ``encode``."""
        return self.encode(text)

    def save_pretrained(self, out_dir: str | os.PathLike) -> list[Path]:
        """``tokenizer.model`` (this file) and a ``tokenizer_config.json`` naming its pieces."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        model = out / "tokenizer.model"
        shutil.copyfile(self.model_path, model)
        cfg = {"tokenizer_class": "LlamaTokenizer", "add_bos_token": False,
               "add_eos_token": False, "legacy": False,
               "eos_token": self._token_string(self.eos_id),
               "pad_token": self._token_string(self.pad_id), "unk_token": "<unk>",
               "bos_token": self._token_string(self.bos_id),
               "added_tokens_decoder": added_tokens_decoder(self.special_tokens)}
        return [model, write_tokenizer_config(out, cfg)]

    def describe(self) -> str:
        return f"SentencePiece {self.model_path} ({self.vocab_size} pieces)"


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
