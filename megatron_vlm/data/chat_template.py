"""Render a tokenizer's Jinja chat template (the ``chat_template`` of ``tokenizer_config.json`` or
``chat_template.jinja``) with jinja2, as transformers' ``apply_chat_template(tokenize=False)`` does:
a sandboxed environment with ``trim_blocks``/``lstrip_blocks``, ``raise_exception`` and a
``tojson`` filter, and the tokenizer's special-token strings as variables (``bos_token``,
``eos_token``, ...). Used by tokenizers that are not transformers objects (Kimi's tiktoken file,
whose own tokenizer class is remote code); an ``HFTokenizer`` calls transformers itself.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Any

from jinja2.exceptions import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment


class ChatTemplateError(ValueError):
    """The template is missing, malformed, or raised while rendering."""


def _raise(message: str) -> None:
    raise TemplateError(message)


def _tojson(value: Any, indent: int | None = None, ensure_ascii: bool = False, **_: Any) -> str:
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii)


@lru_cache(maxsize=8)
def _compile(template: str):
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    return env.from_string(template)


def render_chat_template(
    template: str | None,
    messages: Sequence[Mapping[str, Any]],
    *,
    add_generation_prompt: bool = False,
    special_tokens: Mapping[str, str | None] | None = None,
    **extra: Any,
) -> str:
    """The prompt text of ``messages`` under ``template``.

    Args:
        template: Jinja source; None raises (the tokenizer ships no template).
        messages: ``[{"role": ..., "content": ...}, ...]``.
        add_generation_prompt: Append the assistant turn's opening.
        special_tokens: Variables such as ``{"bos_token": "[BOS]", "eos_token": "[EOS]"}``.
        **extra: More template variables (e.g. ``tools``).

    Raises:
        ChatTemplateError: No template, a syntax error, or the template's ``raise_exception``.
    """
    if not template:
        raise ChatTemplateError("the tokenizer has no chat template (tokenizer_config.json "
                                "'chat_template' or chat_template.jinja)")
    try:
        return _compile(template).render(
            messages=list(messages), add_generation_prompt=add_generation_prompt,
            **dict(special_tokens or {}), **extra)
    except TemplateError as e:
        raise ChatTemplateError(f"chat template: {e}") from e
