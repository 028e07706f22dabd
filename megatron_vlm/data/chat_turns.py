"""Role-tagged turns rendered by a chat template, as the model family's tokenizer would.

A conversation sample (VQA, LLaVA/ShareGPT4V turns) is stored as role-tagged segments: a
``{"turn": "user"}`` marker opens a turn, the segments up to the next marker (text with its loss
flag, media) are its content. At encode time the turns are written with the run's chat template
(the tokenizer's own, else the family's default): the template is rendered once over the
conversation with a unique sentinel standing in for each turn's content, and the rendered string
is cut at the sentinels. What lies between is the template's own text (role tokens, separators,
a default system prompt); the contents go back in place as they were (text and media items,
never passed through Jinja). So the result is, character for character, what
``apply_chat_template(messages, tokenize=False)`` writes for the same messages.

Loss: a turn's content keeps its own flags (assistant text: trained on; prompts: not). The
template text right after an assistant turn's content, up to and including the family's
end-of-turn string (``<|im_end|>``), is a target too (the model learns to end its turn); all other
template text is not.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from megatron_vlm.data.chat_template import render_chat_template
from megatron_vlm.data.media_errors import BadSampleError

ROLES = ("system", "user", "assistant")
"""Roles a turn marker may name."""
_SENTINEL = "\ue000TURN{}\ue001"
"""Stands in for turn ``i``'s content while the template renders (private-use code points that
no template writes)."""


@dataclass
class ChatTurn:
    """One turn: its role and its content segments, in order."""

    role: str
    parts: list[Any] = field(default_factory=list)
    """Content segments as the encoder holds them (text segments, media items)."""


@dataclass(frozen=True)
class TemplateText:
    """A piece of the template's own text between turn contents."""

    text: str
    loss: bool


def split_turns(segments: Sequence[Mapping[str, Any]]) -> tuple[list[Any], list[ChatTurn]]:
    """(segments before the first turn marker, the turns) of a canonical sample's segments."""
    head: list[Any] = []
    turns: list[ChatTurn] = []
    for seg in segments:
        if "turn" in seg:
            role = seg["turn"]
            if role not in ROLES:
                raise ValueError(f"turn role {role!r} is not one of {ROLES}")
            turns.append(ChatTurn(role))
        elif turns:
            turns[-1].parts.append(seg)
        else:
            head.append(seg)
    return head, turns


def render_turns(
    turns: Sequence[ChatTurn],
    template: str,
    *,
    end_of_turn: str | None,
    special_tokens: Mapping[str, str | None] | None = None,
) -> list[TemplateText | ChatTurn]:
    """The conversation as template text pieces and the turns themselves, in order.

    Args:
        turns: The conversation (at least one turn).
        template: The Jinja chat template (the tokenizer's ``chat_template``).
        end_of_turn: The string that closes a turn (``<|im_end|>``); the template text after an
            assistant turn up to and including it is a target. None: no template text is.
        special_tokens: Template variables such as ``bos_token`` / ``eos_token``.

    Raises:
        ValueError: The template drops or reorders a turn's content, or writes it twice (a
            template that rewrites messages, e.g. strips reasoning from earlier turns, cannot
            be cut this way: give the family an explicit template).
    """
    if not turns:
        raise ValueError("a conversation needs at least one turn")
    messages = [{"role": t.role, "content": _SENTINEL.format(i)} for i, t in enumerate(turns)]
    rendered = render_chat_template(template, messages, special_tokens=special_tokens)
    out: list[TemplateText | ChatTurn] = []
    pos, prev_role = 0, None
    for i, turn in enumerate(turns):
        sentinel = _SENTINEL.format(i)
        at = rendered.find(sentinel, pos)
        if at < 0 or rendered.count(sentinel) != 1:
            raise ValueError(f"the chat template does not write turn {i} ({turn.role}) exactly "
                             "once, in order; it cannot be used for role-tagged samples")
        out += _template_text(rendered[pos:at], prev_role, end_of_turn)
        out.append(turn)
        pos, prev_role = at + len(sentinel), turn.role
    out += _template_text(rendered[pos:], prev_role, end_of_turn)
    return out


def _template_text(text: str, after_role: str | None,
                   end_of_turn: str | None) -> list[TemplateText]:
    if not text:
        return []
    if after_role == "assistant" and end_of_turn and end_of_turn in text:
        cut = text.index(end_of_turn) + len(end_of_turn)
        return [TemplateText(text[:cut], True)] + ([TemplateText(text[cut:], False)]
                                                   if text[cut:] else [])
    return [TemplateText(text, False)]


def render_string(pieces: Sequence[TemplateText | ChatTurn],
                  content_text: Callable[[ChatTurn], str]) -> str:
    """The rendered conversation as one string (``content_text`` writes a turn's content), for
    checks against ``apply_chat_template(tokenize=False)``."""
    return "".join(p.text if isinstance(p, TemplateText) else content_text(p) for p in pieces)


def chat_segments(segments: list[dict[str, Any]], rules: Any,
                  tokenizer: Any) -> list[dict[str, Any]]:
    """``segments`` with role-tagged turns (``{"turn": role}`` markers) written out by the chat
    template: the tokenizer's own, else the family's (``rules.chat_template``); the template's
    text becomes ``special`` text segments (``data/chat_turns.py``). Unchanged without turns."""
    if not any("turn" in seg for seg in segments):
        return segments
    try:
        head, turns = split_turns(segments)
        template = getattr(tokenizer, "chat_template", None) or rules.chat_template
        pieces = render_turns(turns, template, end_of_turn=rules.end_of_turn)
    except ValueError as exc:  # a bad role, or a template that rewrites the turns
        raise BadSampleError(f"conversation: {exc}", reason="bad_record") from exc
    out = list(head)
    for piece in pieces:
        if isinstance(piece, TemplateText):
            out.append({"text": piece.text, "loss": piece.loss, "special": True})
        else:
            out.extend(piece.parts)
    return out
