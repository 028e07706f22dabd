"""The run's tokenizer beside an HF export: which one it is, the special-token ids the exported
config carries, its files, and a check that transformers reads them as we do.

**Which tokenizer** (``run_tokenizer``): ``--tokenizer PATH`` if given, else the checkpoint's
``data.tokenizer`` (SentencePiece wrapped with the media tokens for a VLM, as training does), else
the tiny runs' trained ``spm_<data.tokenizer_vocab_size>.model`` in the run directory (an
absolute ``train.output_dir``, or the directory above the checkpoint root), else none (said so).

**Which ids** (``export_token_ids``): the checkpoint's ``model.token_ids`` (the ids the model was
trained with, recorded at start-up). An older checkpoint records none: its ids come from the
tokenizer, and without one the media ids are Kimi K2.5's defaults (``hf_config``), with a note.
A recorded id the tokenizer disagrees with is refused (it is not the run's tokenizer).

**Which files** (``write_tokenizer``): the tokenizer's own ``save_pretrained`` files and
``chat_template.jinja``. Kimi's release loads through remote code (``tokenization_kimi.py``),
which cannot run offline; the export adds a ``tokenizer.json`` converted from ``tiktoken.model``
by transformers' ``TikTokenConverter`` with Kimi's split pattern and every special token at its
id, and names ``PreTrainedTokenizerFast`` (no ``auto_map``) in ``tokenizer_config.json``, so
``AutoTokenizer.from_pretrained(dir)`` loads it without remote code; ``tiktoken.model`` stays, and
our ``load_tokenizer(dir)`` still reads it as Kimi's tokenizer.

**The check** (``check_with_transformers``): ``AutoTokenizer`` on the written files, offline and
without remote code, must encode a probe (text, CJK, digits, media and chat tokens) to our ids
and render the chat template as we do; a difference is reported (the tiny runs' SentencePiece
model, which transformers converts with Llama's rules, differs), not raised.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megatron_vlm.config.data import DataConfig
from megatron_vlm.config.model import TOKEN_ID_NAMES, ModelConfig, TokenIdsConfig
from megatron_vlm.convert.rules import ConversionError
from megatron_vlm.data.kimi_tokenizer import KIMI_PAT_STR, KimiTokenizer
from megatron_vlm.data.media_rules import MediaRules
from megatron_vlm.data.token_ids import (
    DOCUMENT_ID_NAMES,
    MEDIA_ID_NAMES,
    tokenizer_for_model,
    tokenizer_token_ids,
)
from megatron_vlm.data.tokenizer import SentencePieceTokenizer, Tokenizer, write_tokenizer_config
from megatron_vlm.data.tokenizer_loader import load_tokenizer

logger = logging.getLogger(__name__)

CHAT_TEMPLATE_FILE = "chat_template.jinja"


@dataclass
class RunTokenizer:
    tokenizer: Tokenizer | None
    source: str
    """Where it came from, or why there is none (for the export's report)."""


def run_tokenizer(data: DataConfig | None, is_vlm: bool, run_dirs: list[Path],
                  override: Path | None = None, rules: MediaRules | None = None) -> RunTokenizer:
    """The run's tokenizer (see the module docstring). ``override`` that cannot be read raises;
    the checkpoint's own choice that cannot be read here is reported as none. ``rules``: the
    model family's media rules (their special tokens are appended to a SentencePiece model;
    None: Kimi K2.5's)."""

    def for_model(tok: Tokenizer) -> Tokenizer:
        return tokenizer_for_model(tok, is_vlm, *([rules.special_tokens] if rules else []))

    if override is not None:
        try:
            tok = load_tokenizer(override)
        except ValueError as e:
            raise ConversionError(f"--tokenizer {override}: {e}") from e
        return RunTokenizer(for_model(tok), f"--tokenizer {override}")
    if data is None:
        return RunTokenizer(None, "the checkpoint's config has no data section")
    if data.tokenizer:
        try:
            tok = load_tokenizer(data.tokenizer, data.tokenizer_type)
        except ValueError as e:
            return RunTokenizer(None, f"data.tokenizer={data.tokenizer} cannot be read here "
                                      f"({e}); pass --tokenizer PATH")
        return RunTokenizer(for_model(tok), f"data.tokenizer={data.tokenizer}")
    name = f"spm_{data.tokenizer_vocab_size}.model"
    for d in run_dirs:
        if (d / name).is_file():
            tok = SentencePieceTokenizer(d / name)
            return RunTokenizer(for_model(tok), f"the run's trained {d / name}")
    where = ", ".join(str(d) for d in run_dirs) or "(no run directory known)"
    return RunTokenizer(None, f"data.tokenizer is null and the run's trained {name} is not in "
                              f"{where}; pass --tokenizer PATH")


def _token_ids(tok: Tokenizer, is_vlm: bool, rules: MediaRules | None) -> TokenIdsConfig:
    try:
        return tokenizer_token_ids(tok, is_vlm, rules)
    except ValueError as e:
        raise ConversionError(f"the tokenizer to export cannot serve this VLM: {e}") from e


def export_token_ids(model: ModelConfig, run: RunTokenizer,
                     rules: MediaRules | None = None) -> tuple[TokenIdsConfig, list[str]]:
    """(the ids to export, notes on where any came from other than ``model.token_ids``);
    ``rules``: the model family's media rules (None: Kimi K2.5's).

    Raises:
        ConversionError: A recorded ``model.token_ids`` id differs from the tokenizer's.
    """
    names = TOKEN_ID_NAMES if model.is_vlm else DOCUMENT_ID_NAMES
    recorded = model.token_ids
    tok = run.tokenizer
    actual = _token_ids(tok, model.is_vlm, rules) if tok is not None else TokenIdsConfig()
    wrong = [f"model.token_ids.{n}={getattr(recorded, n)} but the tokenizer has "
             f"{getattr(actual, n)}" for n in names
             if tok is not None and getattr(recorded, n) is not None
             and getattr(recorded, n) != getattr(actual, n)]
    if wrong:
        raise ConversionError(
            "; ".join(wrong) + f": {tok.describe()} ({run.source}) is not the tokenizer the model "
            "was trained with; pass the run's tokenizer with --tokenizer PATH")
    ids = {n: getattr(recorded, n) if getattr(recorded, n) is not None else getattr(actual, n)
           for n in names}
    notes = []
    filled = [n for n in names if getattr(recorded, n) is None and ids[n] is not None]
    if filled:
        notes.append(f"the checkpoint records no model.token_ids {filled} (an older run): taken "
                     f"from the tokenizer ({run.source})")
    unknown = [n for n in MEDIA_ID_NAMES if n in names and ids[n] is None and n != "media_content"]
    if unknown:
        notes.append(f"media ids {unknown} are known neither from the checkpoint nor from a "
                     f"tokenizer ({run.source}): config.json gets Kimi K2.5's defaults")
    return TokenIdsConfig(**ids), notes


def write_tokenizer(tok: Tokenizer, out: Path) -> list[Path]:
    """The tokenizer's files in ``out``, loadable by ``AutoTokenizer`` offline (module
    docstring), and ``chat_template.jinja`` when it has a chat template."""
    files = [Path(p) for p in tok.save_pretrained(out)]
    if isinstance(tok, KimiTokenizer):
        files += _kimi_fast_tokenizer(tok, out)
    if tok.chat_template:
        path = out / CHAT_TEMPLATE_FILE
        path.write_text(tok.chat_template)
        files.append(path)
    return sorted(set(files))


def _kimi_fast_tokenizer(tok: KimiTokenizer, out: Path) -> list[Path]:
    """``tokenizer.json`` for Kimi's tiktoken BPE; ``tokenizer_config.json`` made to use it."""
    try:
        from transformers.convert_slow_tokenizer import TikTokenConverter
    except ImportError:
        logger.warning("transformers is not installed: the exported Kimi tokenizer has no "
                       "tokenizer.json (AutoTokenizer then needs Kimi's remote code)")
        return []
    # The converter appends special tokens in list order after the BPE ranks: list every id from
    # the first special one to the last, unnamed ids under reserved names, so each lands on its id.
    names = {i: name for name, i in tok.special_tokens.items()}
    first, last = tok.num_base_tokens, max(names)
    specials = [names.get(i, f"<|reserved_token_{i}|>") for i in range(first, last + 1)]
    fast = TikTokenConverter(vocab_file=str(tok.bpe_path), pattern=KIMI_PAT_STR,
                             extra_special_tokens=specials).converted()
    moved = [f"{name} ({i} -> {fast.token_to_id(name)})" for name, i in tok.special_tokens.items()
             if fast.token_to_id(name) != i]
    if moved or fast.get_vocab_size() != last + 1:
        raise ConversionError(f"converting {tok.bpe_path} to tokenizer.json moved special tokens: "
                              f"{moved[:5]} (vocabulary {fast.get_vocab_size()}, expected "
                              f"{last + 1})")
    path = out / "tokenizer.json"
    fast.save(str(path))
    config_path = out / "tokenizer_config.json"
    config: dict[str, Any] = json.loads(config_path.read_text())
    config.pop("auto_map", None)
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    return [path, write_tokenizer_config(out, config)]


def _probe(tok: Tokenizer) -> str:
    """Mixed text with the tokenizer's media and chat tokens."""
    specials = [t for t in ("<|media_begin|>", "<|media_content|>", "<|media_pad|>",
                            "<|media_end|>", "<|im_user|>", "<|im_end|>")
                if t in tok.special_tokens]
    return ("Hello world, it's 2024! Don't stop: 3.14159 x 12345. 你好，世界。\n  indented\n"
            + "image".join(specials) + " done.")


def check_with_transformers(out: Path, tok: Tokenizer) -> str | None:
    """None when ``AutoTokenizer`` (offline, no remote code) on ``out`` encodes a probe to our
    ids and renders the chat template as we do; else what differs."""
    try:
        from transformers import AutoTokenizer

        theirs = AutoTokenizer.from_pretrained(str(out), local_files_only=True,
                                               trust_remote_code=False)
    except Exception as e:  # noqa: BLE001 -- transformers raises many types; reported
        return f"transformers' AutoTokenizer cannot load it ({type(e).__name__}: {e})"
    probe = _probe(tok)
    ours_ids = tok.encode_with_special(probe)
    their_ids = list(theirs.encode(probe, add_special_tokens=False))
    if their_ids != ours_ids:
        at = next((k for k, (a, b) in enumerate(zip(ours_ids, their_ids)) if a != b),
                  min(len(ours_ids), len(their_ids)))
        return (f"transformers' {type(theirs).__name__} encodes differently from "
                f"{tok.describe()} (first difference at token {at}: ours "
                f"{ours_ids[at:at + 4]}, theirs {their_ids[at:at + 4]})")
    if tok.chat_template:
        messages = [{"role": "user", "content": "hi"}]
        ours = tok.apply_chat_template(messages, add_generation_prompt=True)
        rendered = theirs.apply_chat_template(messages, tokenize=False,
                                              add_generation_prompt=True)
        if rendered != ours:
            return f"transformers renders the chat template as {rendered!r}, ours as {ours!r}"
    return None
