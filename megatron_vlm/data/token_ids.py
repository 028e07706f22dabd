"""A model's special-token ids from its tokenizer: what ``model.token_ids`` records (and an HF
export's config.json carries), and the one rule that decides which tokenizer serves a model.

- ``tokenizer_for_model``: a VLM's SentencePiece model gets the media tokens appended (the tiny
  recipes; ``SpecialTokensTokenizer``); every other tokenizer serves as it is.
- ``tokenizer_token_ids``: bos/eos/pad, and for a VLM the media ids looked up by name.
- ``resolve_token_ids``: ``model.token_ids`` filled from the tokenizer. A configured media id
  that differs is refused (the placeholders would not be the model's); a configured document id
  (bos/eos/pad, e.g. an imported Instruct config whose eos is ``<|im_end|>``) yields to the
  tokenizer's, which ends every pretraining document, with a note.
"""

from __future__ import annotations

from collections.abc import Sequence

from megatron_vlm.config.model import TOKEN_ID_NAMES, TokenIdsConfig
from megatron_vlm.data.kimi_tokenizer import SpecialTokensTokenizer
from megatron_vlm.data.media_rules import KIMI_MEDIA_RULES, MediaRules, token_ids_config
from megatron_vlm.data.templates import MEDIA_SPECIAL_TOKENS
from megatron_vlm.data.tokenizer import SentencePieceTokenizer, Tokenizer

DOCUMENT_ID_NAMES = ("bos", "eos", "pad")
"""The ``TokenIdsConfig`` fields every model carries."""
MEDIA_ID_NAMES = tuple(n for n in TOKEN_ID_NAMES if n not in DOCUMENT_ID_NAMES)
"""The ``TokenIdsConfig`` fields only a VLM carries."""


def tokenizer_for_model(tok: Tokenizer, is_vlm: bool,
                        special_tokens: Sequence[str] = MEDIA_SPECIAL_TOKENS) -> Tokenizer:
    """``tok`` as the model uses it: a VLM's SentencePiece model with the media tokens of its
    family (``MediaRules.special_tokens``; Kimi's by default) appended."""
    if is_vlm and isinstance(tok, SentencePieceTokenizer):
        return SpecialTokensTokenizer(tok, tuple(special_tokens))
    return tok


def tokenizer_token_ids(tok: Tokenizer, is_vlm: bool,
                        rules: MediaRules | None = None) -> TokenIdsConfig:
    """The special-token ids of ``tok`` (media ones for a VLM, by the family's media ``rules``,
    Kimi's by default; raises naming missing ones)."""
    ids: dict[str, int | None] = {"bos": tok.bos_id, "eos": tok.eos_id, "pad": tok.pad_id}
    if is_vlm:
        ids.update(token_ids_config((rules or KIMI_MEDIA_RULES).media_ids(tok)))
    return TokenIdsConfig(**ids)


def resolve_token_ids(configured: TokenIdsConfig, tok: Tokenizer, is_vlm: bool,
                      rules: MediaRules | None = None) -> tuple[TokenIdsConfig, list[str]]:
    """(``model.token_ids`` filled from ``tok``, notes on document ids that yielded to it).

    Raises:
        ValueError: Naming each ``model.token_ids.<media>`` that disagrees with the tokenizer.
    """
    actual = tokenizer_token_ids(tok, is_vlm, rules)
    differs = [n for n in TOKEN_ID_NAMES if getattr(configured, n) is not None
               and getattr(actual, n) is not None
               and getattr(configured, n) != getattr(actual, n)]
    wrong = [f"model.token_ids.{n}={getattr(configured, n)} but the tokenizer has "
             f"{getattr(actual, n)}" for n in differs if n in MEDIA_ID_NAMES]
    if wrong:
        raise ValueError("; ".join(wrong) + f" ({tok.describe()}): the media placeholders would "
                         "not be the model's; use the model's tokenizer, or set them null")
    notes = [f"model.token_ids.{n}={getattr(configured, n)} differs from the tokenizer's "
             f"{getattr(actual, n)}: pretraining documents end with the tokenizer's tokens, "
             "which the saved config now records" for n in differs]
    return actual, notes
