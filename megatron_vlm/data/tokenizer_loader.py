"""``load_tokenizer(path)``: the tokenizer at a path, as the ``Tokenizer`` interface.

What a path may be (``data.tokenizer``):

- a directory shipped beside an HF checkpoint: Kimi's ``tiktoken.model`` + ``tokenizer_config.json``
  (read with our tiktoken loader; Kimi's own class is remote code that cannot run offline), a
  ``tokenizer.json`` (Qwen / GLM / InternVL) or another directory ``transformers.AutoTokenizer``
  loads offline, or one SentencePiece ``.model`` (what our tiny runs' HF export writes);
- a file: a SentencePiece ``.model``, or a tiktoken BPE file (Kimi's ``tiktoken.model``; a
  ``tokenizer_config.json`` beside it is used).

``kind`` forces one reader (``tiktoken``, ``hf``, ``sentencepiece``); ``auto`` decides from the
files. Errors are ``ValueError`` naming the path and what was found.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

from megatron_vlm.data.kimi_tokenizer import KIMI_BPE_FILE, KimiTokenizer
from megatron_vlm.data.tokenizer import SentencePieceTokenizer, Tokenizer

TokenizerKind = Literal["auto", "tiktoken", "hf", "sentencepiece"]
TOKENIZER_KINDS: tuple[str, ...] = ("auto", "tiktoken", "hf", "sentencepiece")


def _is_sentencepiece(path: Path) -> bool:
    """A SentencePiece model is a protobuf (starts with field 1, wire type 2: byte 0x0a); a
    tiktoken file is base64 text lines."""
    with open(path, "rb") as f:
        return f.read(1) == b"\x0a"


def detect_kind(path: Path) -> str:
    """The reader ``auto`` picks for ``path`` (ValueError when nothing fits)."""
    if path.is_dir():
        if (path / KIMI_BPE_FILE).is_file():
            return "tiktoken"
        if (path / "tokenizer.json").is_file():
            return "hf"
        # A SentencePiece model (our tiny runs' export writes tokenizer.model plus a
        # tokenizer_config.json naming the appended media tokens, which we append the same way).
        models = sorted(path.glob("*.model"))
        if len(models) == 1 and _is_sentencepiece(models[0]):
            return "sentencepiece"
        if (path / "tokenizer_config.json").is_file():
            return "hf"
        found = sorted(p.name for p in path.iterdir())[:12]
        raise ValueError(
            f"data.tokenizer={path}: no tokenizer files found (expected {KIMI_BPE_FILE}, "
            f"tokenizer.json or tokenizer_config.json, or one SentencePiece .model); it holds "
            f"{found}")
    if path.is_file():
        return "sentencepiece" if _is_sentencepiece(path) else "tiktoken"
    raise ValueError(f"data.tokenizer={path} does not exist")


def load_tokenizer(path: str | os.PathLike, kind: str = "auto") -> Tokenizer:
    """The tokenizer at ``path`` (see the module docstring)."""
    path = Path(path).expanduser()
    if kind not in TOKENIZER_KINDS:
        raise ValueError(f"data.tokenizer_type={kind!r}; choose one of {TOKENIZER_KINDS}")
    if not path.exists():
        raise ValueError(f"data.tokenizer={path} does not exist")
    kind = detect_kind(path) if kind == "auto" else kind
    if kind == "tiktoken":
        if path.is_dir():
            return KimiTokenizer.from_dir(path)
        config = path.parent / "tokenizer_config.json"
        return KimiTokenizer(path, config if config.is_file() else None)
    if kind == "sentencepiece":
        if path.is_dir():
            models = sorted(path.glob("*.model"))
            if len(models) != 1:
                raise ValueError(f"data.tokenizer={path}: expected one .model file, found "
                                 f"{[m.name for m in models]}")
            path = models[0]
        return SentencePieceTokenizer(path)
    from megatron_vlm.data.hf_tokenizer import HFTokenizer

    return HFTokenizer(path if path.is_dir() else path.parent)
