"""Tokenizers that know the media special tokens.

``KimiTokenizer``: Kimi K2 / K2.5's tokenizer, a tiktoken BPE file (``tiktoken.model``: one
``base64(token) rank`` per line) loaded from a local path, with Kimi's split pattern and special
tokens as in the released ``tokenization_kimi.py``: 163584 BPE tokens, then 256 reserved special
ids (163584-163839) named by ``tokenizer_config.json``'s ``added_tokens_decoder``. Without that file
the names below are used; they are positional offsets from the BPE size, so a small synthetic BPE
file gets the same layout.

``SpecialTokensTokenizer``: for the tiny run, wraps our SentencePiece tokenizer (or any
``TextTokenizer``) and appends the media special tokens at ids ``>= base.vocab_size``. The trained
``.model`` file stays as it is (no retraining, cached models stay valid); the embedding table must
be sized by the wrapper's ``vocab_size``. The alternative -- ``user_defined_symbols`` at
SentencePiece training time -- would change ``tokenizer.py`` and every cached model.

Both ``encode`` methods treat special-token strings in text as plain text (a web page containing
``<|media_pad|>`` must not create a placeholder); ``encode_with_special`` parses them.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import tiktoken

from megatron_vlm.data.templates import (
    FAST_END,
    FAST_START,
    IMAGE_PLACEHOLDER,
    MEDIA_BEGIN,
    MEDIA_CONTENT,
    MEDIA_END,
    MEDIA_SPECIAL_TOKENS,
    VIDEO_PLACEHOLDER,
)
from megatron_vlm.data.tokenizer import (
    TextTokenizer,
    TokenizerBase,
    added_tokens_decoder,
    write_tokenizer_config,
)

KIMI_PAT_STR = "|".join(
    [
        r"""[\p{Han}]+""",
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",  # noqa: E501
        r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",  # noqa: E501
        r"""\p{N}{1,3}""",
        r""" ?[^\s\p{L}\p{N}]+[\r\n]*""",
        r"""\s*[\r\n]+""",
        r"""\s+(?!\S)""",
        r"""\s+""",
    ]
)
"""Kimi's pre-tokenisation regex (``TikTokenTokenizer.pat_str``): Han runs, cased words with
English contractions, digits in groups of <= 3, punctuation runs, newlines, spaces."""

KIMI_NUM_BASE_TOKENS = 163584
"""BPE tokens in Kimi's ``tiktoken.model``."""
KIMI_NUM_RESERVED_SPECIAL_TOKENS = 256
"""Special ids after the BPE tokens; the embedding table is 163584 + 256 = 163840 rows."""

KIMI_SPECIAL_TOKEN_OFFSETS: dict[str, int] = {
    "[BOS]": 0,
    "[EOS]": 1,
    "<|im_end|>": 2,
    "<|im_user|>": 3,
    "<|im_assistant|>": 4,
    "<|start_header_id|>": 6,
    "<|end_header_id|>": 7,
    "[EOT]": 9,
    "<|im_system|>": 10,
    "<|tool_calls_section_begin|>": 11,
    "<|tool_calls_section_end|>": 12,
    "<|tool_call_begin|>": 13,
    "<|tool_call_argument_begin|>": 14,
    "<|tool_call_end|>": 15,
    "<|im_middle|>": 17,
    MEDIA_BEGIN: 18,  # 163602 = HF Kimi_K25Config.vision_start_token_id
    MEDIA_CONTENT: 19,
    MEDIA_END: 20,  # 163604 = vision_end_token_id
    IMAGE_PLACEHOLDER: 21,  # 163605 = image_token_id
    "<think>": 22,  # K2-Thinking / K2.5 (from memory of tokenizer_config.json; unverified here)
    "</think>": 23,
    FAST_START: 252,  # ours: two unused reserved slots for the SlowFast option
    FAST_END: 253,
    "[UNK]": 254,
    "[PAD]": 255,
}
"""Kimi's special tokens as offsets from the BPE size (163584 + offset in the release). Media ids
agree with transformers 5.23 ``Kimi_K25Config``; a ``tokenizer_config.json`` overrides names."""

KIMI_VIDEO_PLACEHOLDER_OFFSET = KIMI_NUM_RESERVED_SPECIAL_TOKENS
"""``<|kimi_k25_video_placeholder|>`` = 163840 (HF ``video_token_id``): the first id after the
embedding table, as HF's converted tokenizer adds it. Placeholder ids never reach the embedding."""

_TIKTOKEN_MAX_ENCODE_CHARS = 400_000
_MAX_SAME_CLASS_RUN = 25_000
_NON_SPACE_RUN = re.compile(r"\S+")


def _has_long_run(text: str) -> bool:
    r"""Any run of > 25,000 whitespace or non-whitespace characters (linear time: a counted regex
    like ``\S{25001}`` would be quadratic on long base64 blobs)."""
    if len(text) <= _MAX_SAME_CLASS_RUN:
        return False
    if any(len(word) > _MAX_SAME_CLASS_RUN for word in text.split()):
        return True
    return any(len(gap) > _MAX_SAME_CLASS_RUN for gap in _NON_SPACE_RUN.split(text))


def load_tiktoken_ranks(path: str | os.PathLike) -> dict[bytes, int]:
    """Read a tiktoken BPE file (``base64(token) rank`` per line) from a local path.

    Raises:
        ValueError: Missing file, malformed line, or ranks that are not 0..n-1.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"tiktoken BPE file not found: {path}")
    ranks: dict[bytes, int] = {}
    for lineno, line in enumerate(path.read_bytes().splitlines(), 1):
        if not line.strip():
            continue
        try:
            token_b64, rank = line.split()
            ranks[base64.b64decode(token_b64, validate=True)] = int(rank)
        except ValueError as exc:
            raise ValueError(f"{path}:{lineno}: malformed BPE line {line[:80]!r}") from exc
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise ValueError(f"{path}: ranks are not a permutation of 0..{len(ranks) - 1}")
    return ranks


def _split_long_runs(text: str) -> Iterator[str]:
    """Cut runs of > 25,000 whitespace or non-whitespace characters (as Kimi's tokenizer does,
    to keep tiktoken's regex fast); a no-op on ordinary text."""
    for start in range(0, len(text), _TIKTOKEN_MAX_ENCODE_CHARS):
        part = text[start : start + _TIKTOKEN_MAX_ENCODE_CHARS]
        if not _has_long_run(part):
            yield part
            continue
        run_len, run_is_space, cut = 0, part[:1].isspace(), 0
        for i, ch in enumerate(part):
            is_space = ch.isspace()
            if is_space != run_is_space:
                run_len, run_is_space = 1, is_space
            else:
                run_len += 1
                if run_len > _MAX_SAME_CLASS_RUN:
                    yield part[cut:i]
                    cut, run_len = i, 1
        yield part[cut:]


KIMI_BPE_FILE = "tiktoken.model"
"""Name of Kimi's BPE file in a checkpoint directory."""


def _token_name(entry: Any) -> str | None:
    """A ``tokenizer_config.json`` token entry: a string or ``{"content": ...}``."""
    if isinstance(entry, dict):
        return entry.get("content")
    return entry if isinstance(entry, str) else None


def read_chat_template(directory: Path, config: dict[str, Any]) -> str | None:
    """The chat template shipped in a tokenizer directory: ``chat_template.jinja`` (newer
    releases) or ``tokenizer_config.json``'s ``chat_template`` (a string, or a list of named
    templates of which ``default`` is taken)."""
    jinja = directory / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    tpl = config.get("chat_template")
    if isinstance(tpl, list):
        named = {t.get("name"): t.get("template") for t in tpl if isinstance(t, dict)}
        return named.get("default")
    return tpl if isinstance(tpl, str) else None


class KimiTokenizer(TokenizerBase):
    """Kimi's tiktoken tokenizer from a local BPE file.

    Args:
        bpe_path: ``tiktoken.model``.
        tokenizer_config: Optional ``tokenizer_config.json`` whose ``added_tokens_decoder`` names
            the special ids (overrides ``KIMI_SPECIAL_TOKEN_OFFSETS``), whose ``bos_token`` /
            ``eos_token`` / ``pad_token`` name the document tokens (default ``[BOS]``,
            ``[EOS]``, ``[PAD]``) and whose ``chat_template`` is the chat template (or
            ``chat_template.jinja`` beside it).
    """

    def __init__(
        self, bpe_path: str | os.PathLike, tokenizer_config: str | os.PathLike | None = None
    ) -> None:
        self.bpe_path = Path(bpe_path)
        self.config_path = Path(tokenizer_config) if tokenizer_config is not None else None
        ranks = load_tiktoken_ranks(bpe_path)
        self.num_base_tokens = len(ranks)
        base = self.num_base_tokens
        names = {base + off: name for name, off in KIMI_SPECIAL_TOKEN_OFFSETS.items()}
        names[base + KIMI_VIDEO_PLACEHOLDER_OFFSET] = VIDEO_PLACEHOLDER
        config: dict[str, Any] = {}
        if self.config_path is not None:
            try:
                config = json.loads(self.config_path.read_text())
            except (OSError, ValueError) as e:
                raise ValueError(f"cannot read {self.config_path}: {e}") from e
            decoder = config.get("added_tokens_decoder", {})
            configured = {int(i): _token_name(e) or str(e) for i, e in decoder.items()}
            # A name the config places elsewhere loses its default slot (names must be unique).
            names = {i: n for i, n in names.items() if n not in set(configured.values())}
            names.update(configured)
        self.special_tokens: dict[str, int] = {
            names.get(i, f"<|reserved_token_{i}|>"): i
            for i in range(base, base + KIMI_NUM_RESERVED_SPECIAL_TOKENS)
        }
        for i, name in names.items():  # ids past the reserved block (the video placeholder)
            if i >= base + KIMI_NUM_RESERVED_SPECIAL_TOKENS:
                self.special_tokens[name] = i
        self._document_tokens = {
            role: _token_name(config.get(f"{role}_token")) or default
            for role, default in (("bos", "[BOS]"), ("eos", "[EOS]"), ("pad", "[PAD]"))}
        for role, name in self._document_tokens.items():
            if name not in self.special_tokens:
                raise ValueError(f"{self.config_path}: {role}_token {name!r} is not a special "
                                 "token of this tokenizer")
        self.chat_template = (read_chat_template(self.config_path.parent, config)
                              if self.config_path is not None else None)
        self._enc = tiktoken.Encoding(
            name=Path(bpe_path).name,
            pat_str=KIMI_PAT_STR,
            mergeable_ranks=ranks,
            special_tokens=self.special_tokens,
        )

    @classmethod
    def from_dir(cls, directory: str | os.PathLike) -> KimiTokenizer:
        """From a checkpoint's tokenizer files: ``tiktoken.model`` (+ ``tokenizer_config.json``)."""
        directory = Path(directory)
        config = directory / "tokenizer_config.json"
        return cls(directory / KIMI_BPE_FILE, config if config.is_file() else None)

    @property
    def vocab_size(self) -> int:
        """Embedding rows: BPE tokens + 256 reserved specials (163840 for Kimi)."""
        return self.num_base_tokens + KIMI_NUM_RESERVED_SPECIAL_TOKENS

    @property
    def eos_id(self) -> int:
        """End of document (``eos_token``; Kimi: ``[EOS]``)."""
        return self.special_tokens[self._document_tokens["eos"]]

    @property
    def bos_id(self) -> int:
        return self.special_tokens[self._document_tokens["bos"]]

    @property
    def pad_id(self) -> int:
        return self.special_tokens[self._document_tokens["pad"]]

    def encode(self, text: str) -> list[int]:
        """Ids of plain text: special-token strings are encoded as ordinary text."""
        out: list[int] = []
        for part in _split_long_runs(text):
            out.extend(self._enc.encode(part, disallowed_special=()))
        return out

    def encode_with_special(self, text: str) -> list[int]:
        """Ids of text in which special-token strings become their ids (trusted text only)."""
        out: list[int] = []
        for part in _split_long_runs(text):
            out.extend(self._enc.encode(part, allowed_special="all"))
        return out

    def decode(self, ids: Sequence[int]) -> str:
        return self._enc.decode([int(i) for i in ids])

    def save_pretrained(self, out_dir: str | os.PathLike) -> list[Path]:
        """``tiktoken.model`` and a ``tokenizer_config.json`` naming every special id, the
        document tokens and the chat template (so this class reloads them exactly)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        bpe = out / KIMI_BPE_FILE
        shutil.copyfile(self.bpe_path, bpe)
        config: dict[str, Any] = {}
        if self.config_path is not None:
            config = json.loads(self.config_path.read_text())
        config.update({
            "added_tokens_decoder": added_tokens_decoder(self.special_tokens),
            **{f"{role}_token": name for role, name in self._document_tokens.items()},
        })
        if self.chat_template is not None:
            config["chat_template"] = self.chat_template
        return [bpe, write_tokenizer_config(out, config)]

    def describe(self) -> str:
        return f"Kimi tiktoken {self.bpe_path} ({self.vocab_size} ids)"


class SpecialTokensTokenizer(TokenizerBase):
    """Any ``TextTokenizer`` plus special tokens at ids ``base.vocab_size + k``.

    Args:
        base: E.g. our ``SentencePieceTokenizer``.
        special_tokens: Strings to add, in id order (default: every media template token).
    """

    def __init__(
        self, base: TextTokenizer, special_tokens: Sequence[str] = MEDIA_SPECIAL_TOKENS
    ) -> None:
        if len(set(special_tokens)) != len(special_tokens):
            raise ValueError(f"duplicate special tokens: {list(special_tokens)}")
        self.base = base
        self.added_tokens = {tok: base.vocab_size + k for k, tok in enumerate(special_tokens)}
        """The added tokens (string -> id), ids from ``base.vocab_size`` on."""
        self._by_id = {i: tok for tok, i in self.added_tokens.items()}
        self._split = re.compile("(" + "|".join(re.escape(t) for t in special_tokens) + ")")

    @property
    def vocab_size(self) -> int:
        """Base vocabulary + added special tokens (size the embedding table with this)."""
        return self.base.vocab_size + len(self.added_tokens)

    @property
    def special_tokens(self) -> dict[str, int]:
        """The base tokenizer's special tokens and the added ones."""
        return {**getattr(self.base, "special_tokens", {}), **self.added_tokens}

    @property
    def eos_id(self) -> int:
        return self.base.eos_id

    @property
    def pad_id(self) -> int:
        return self.base.pad_id

    @property
    def bos_id(self) -> int | None:
        return getattr(self.base, "bos_id", None)

    @property
    def chat_template(self) -> str | None:
        return getattr(self.base, "chat_template", None)

    def encode(self, text: str) -> list[int]:
        """Base ids of plain text (never a special id)."""
        return self.base.encode(text)

    def encode_with_special(self, text: str) -> list[int]:
        """Ids of text in which special-token strings become their ids."""
        out: list[int] = []
        for piece in self._split.split(text):
            if piece in self.added_tokens:
                out.append(self.added_tokens[piece])
            elif piece:
                out.extend(self.base.encode(piece))
        return out

    def decode(self, ids: Sequence[int]) -> str:
        out: list[str] = []
        run: list[int] = []
        for i in ids:
            if int(i) in self._by_id:
                if run:
                    out.append(self.base.decode(run))
                    run = []
                out.append(self._by_id[int(i)])
            else:
                run.append(int(i))
        if run:
            out.append(self.base.decode(run))
        return "".join(out)

    def save_pretrained(self, out_dir: str | os.PathLike) -> list[Path]:
        """The base tokenizer's files, with the added tokens in ``tokenizer_config.json``."""
        files = self.base.save_pretrained(out_dir)
        path = Path(out_dir) / "tokenizer_config.json"
        config = json.loads(path.read_text()) if path.is_file() else {}
        decoder = config.get("added_tokens_decoder", {})
        decoder.update(added_tokens_decoder(self.added_tokens))
        config["added_tokens_decoder"] = decoder
        written = write_tokenizer_config(Path(out_dir), config)
        return [*(f for f in files if f != written), written]

    def describe(self) -> str:
        base = self.base.describe() if hasattr(self.base, "describe") else type(self.base).__name__
        return (f"{base} + {len(self.added_tokens)} media tokens "
                f"({self.vocab_size} ids)")
