"""``HFTokenizer``: a tokenizer directory that ``transformers.AutoTokenizer`` loads
(``tokenizer.json`` of Qwen, GLM, InternVL, ...; ``tokenizer.model`` SentencePiece files with a
``tokenizer_config.json``) behind the ``Tokenizer`` interface. Loaded offline
(``local_files_only``) and without remote code: a tokenizer that needs remote code (Kimi's) is
read by ``KimiTokenizer`` instead.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from megatron_vlm.data.tokenizer import TokenizerBase


class HFTokenizer(TokenizerBase):
    """A transformers tokenizer from a local directory.

    Args:
        path: Directory with ``tokenizer.json`` / ``tokenizer_config.json`` (or what
            ``AutoTokenizer.from_pretrained`` accepts offline).
        eos_token: End-of-document token; None = the tokenizer's ``eos_token``.
    """

    def __init__(self, path: str | os.PathLike, eos_token: str | None = None) -> None:
        try:
            from transformers import AutoTokenizer
        except ImportError as e:  # pragma: no cover - transformers is in every install path
            raise ValueError(f"loading the tokenizer at {path} needs transformers "
                             "(pip install '.[hf]')") from e
        self.path = Path(path)
        try:
            self._tok = AutoTokenizer.from_pretrained(str(self.path), local_files_only=True,
                                                      trust_remote_code=False)
        except Exception as e:  # transformers raises many types; say which path failed
            raise ValueError(f"transformers could not load the tokenizer at {self.path} "
                             f"offline without remote code: {type(e).__name__}: {e}") from e
        self.special_tokens: dict[str, int] = {
            tok.content: int(i) for i, tok in self._tok.added_tokens_decoder.items()}
        for value in (self._tok.eos_token, self._tok.pad_token, self._tok.bos_token,
                      self._tok.unk_token):
            if value is not None and value not in self.special_tokens:
                self.special_tokens[value] = int(self._tok.convert_tokens_to_ids(value))
        name = eos_token or self._tok.eos_token
        if name is None:
            raise ValueError(f"the tokenizer at {self.path} has no eos_token; name the "
                             "end-of-document token in its tokenizer_config.json")
        self._eos = self.token_id(name)
        pad = self._tok.pad_token_id
        self._pad = int(pad) if pad is not None else self._eos
        self.bos_id = (int(self._tok.bos_token_id) if self._tok.bos_token_id is not None
                       else None)
        self.chat_template = getattr(self._tok, "chat_template", None)

    @property
    def vocab_size(self) -> int:
        """Ids the embedding must hold: the base vocabulary and every added token."""
        return max(len(self._tok), max(self.special_tokens.values(), default=-1) + 1)

    @property
    def eos_id(self) -> int:
        return self._eos

    @property
    def pad_id(self) -> int:
        return self._pad

    def encode(self, text: str) -> list[int]:
        """Ids of plain text: added/special token strings in the text stay plain text."""
        return list(self._tok.encode(text, add_special_tokens=False, split_special_tokens=True))

    def encode_with_special(self, text: str) -> list[int]:
        return list(self._tok.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids])

    def apply_chat_template(self, messages: Sequence[Mapping[str, Any]],
                            add_generation_prompt: bool = False) -> str:
        """transformers' own rendering of the tokenizer's chat template."""
        return self._tok.apply_chat_template(list(messages), tokenize=False,
                                             add_generation_prompt=add_generation_prompt)

    def save_pretrained(self, out_dir: str | os.PathLike) -> list[Path]:
        return [Path(p) for p in self._tok.save_pretrained(str(out_dir))]

    def describe(self) -> str:
        return f"{type(self._tok).__name__} {self.path} ({self.vocab_size} ids)"
