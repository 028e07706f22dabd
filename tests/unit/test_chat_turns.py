"""Role-tagged turns written by a chat template (``data/chat_turns.py``) equal what transformers'
``apply_chat_template(tokenize=False)`` writes for the same messages -- for a Kimi-style template
and a ChatML one with a default system prompt (Keye / Qwen) -- with the contents put back as they
were (media never go through Jinja) and loss only on assistant contents and their end of turn."""

from __future__ import annotations

import pytest
from kimi_tokenizer_files import KIMI_STYLE_CHAT_TEMPLATE
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast

from megatron_vlm.data.chat_turns import (
    ChatTurn,
    TemplateText,
    render_string,
    render_turns,
    split_turns,
)

#: Qwen ChatML with its default system prompt (FAMILIES.md §1: Keye's chat is Qwen ChatML,
#: default system "You are a helpful assistant.").
CHATML = (
    "{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _hf(template: str) -> PreTrainedTokenizerFast:
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(WordLevel({"<unk>": 0},
                                                                       unk_token="<unk>")))
    tok.chat_template = template
    return tok


SEGMENTS = [
    {"turn": "user"}, {"media": 0}, {"text": "What colour is the {{square}}?", "loss": False},
    {"turn": "assistant"}, {"text": "Red.", "loss": True},
    {"turn": "user"}, {"text": "And the circle?", "loss": False},
    {"turn": "assistant"}, {"text": "Blue.", "loss": True},
]


def _content(turn: ChatTurn) -> str:
    return "".join(p.get("text", "<image>") for p in turn.parts)


@pytest.mark.parametrize("template,end", [(KIMI_STYLE_CHAT_TEMPLATE, "<|im_end|>"),
                                          (CHATML, "<|im_end|>")])
def test_turns_equal_apply_chat_template(template, end):
    head, turns = split_turns(SEGMENTS)
    assert head == [] and [t.role for t in turns] == ["user", "assistant"] * 2
    pieces = render_turns(turns, template, end_of_turn=end)
    # Contents are put back untouched ("{{square}}" is not Jinja, the image stays an item).
    assert turns[0].parts[0] == {"media": 0}
    messages = [{"role": t.role, "content": _content(t)} for t in turns]
    expected = _hf(template).apply_chat_template(messages, tokenize=False)
    assert render_string(pieces, _content) == expected
    # Loss: the template text right after an assistant turn, through <|im_end|>, and nothing
    # else of the template's.
    trained = [p.text for p in pieces if isinstance(p, TemplateText) and p.loss]
    assert trained == [end, end], pieces
    # Every piece of the template's text after a user turn (role tokens, separators) is
    # prompt, not target.
    after_user = [pieces[i + 1] for i, p in enumerate(pieces[:-1])
                  if isinstance(p, ChatTurn) and p.role == "user"]
    assert after_user and not any(p.loss for p in after_user)


def test_chatml_default_system_prompt_is_template_text():
    _, turns = split_turns(SEGMENTS[:5])
    pieces = render_turns(turns, CHATML, end_of_turn="<|im_end|>")
    assert pieces[0] == TemplateText(
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n", False)
    assert pieces[-2:] == [TemplateText("<|im_end|>", True), TemplateText("\n", False)]


def test_segments_before_the_first_turn_and_bad_roles():
    head, turns = split_turns([{"text": "caption", "loss": True}, {"turn": "user"}])
    assert head == [{"text": "caption", "loss": True}] and turns[0].parts == []
    with pytest.raises(ValueError, match="not one of"):
        split_turns([{"turn": "tool"}])


def test_a_template_that_rewrites_contents_is_refused():
    dropping = ("{% for m in messages %}{% if m['role'] == 'user' %}{{ m['content'] }}"
                "{% endif %}{% endfor %}")
    _, turns = split_turns(SEGMENTS)
    with pytest.raises(ValueError, match="does not write turn 1"):
        render_turns(turns, dropping, end_of_turn=None)
