"""A tiny tokenizer in Kimi K2 / K2.5's released format, written by the tests: ``tiktoken.model``
(one ``base64(token) rank`` line per token: the 256 bytes, then byte-pair merges learnt here on a
text) and a ``tokenizer_config.json`` naming the special ids after the BPE tokens as Kimi's does
(``added_tokens_decoder``, ``bos_token``/``eos_token``/``pad_token``, a chat template), with
``tokenizer_class`` pointing at the remote code that cannot run offline, as in the release.

The merges are learnt by plain counting (most frequent adjacent pair, ties by bytes) over the text
split with Kimi's pre-tokenisation regex, so the file is a real BPE table of the kind tiktoken and
transformers' converter expect (every merged token is the join of two lower-ranked tokens).
"""

from __future__ import annotations

import base64
import json
from collections import Counter
from pathlib import Path

import regex

from megatron_vlm.data.kimi_tokenizer import (
    KIMI_NUM_RESERVED_SPECIAL_TOKENS,
    KIMI_PAT_STR,
    KIMI_SPECIAL_TOKEN_OFFSETS,
    KIMI_VIDEO_PLACEHOLDER_OFFSET,
)
from megatron_vlm.data.templates import VIDEO_PLACEHOLDER

#: A Kimi-style chat template (roles as <|im_user|>/<|im_assistant|>/<|im_system|> + name +
#: <|im_middle|>, turns closed by <|im_end|>), the structure of the release's template.
KIMI_STYLE_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}<|im_system|>system<|im_middle|>"
    "{% elif message['role'] == 'user' %}<|im_user|>user<|im_middle|>"
    "{% else %}<|im_assistant|>assistant<|im_middle|>{% endif %}"
    "{{ message['content'] }}<|im_end|>"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_assistant|>assistant<|im_middle|>{% endif %}"
)


def learn_merges(text: str, num_merges: int) -> list[bytes]:
    """Byte-pair merges of ``text`` (pre-split with Kimi's regex), most frequent first."""
    words = Counter(regex.findall(KIMI_PAT_STR, text, flags=regex.V1))  # V1: [..&&..]
    seqs = {w: [bytes([b]) for b in w.encode("utf-8")] for w in words}
    merges: list[bytes] = []
    for _ in range(num_merges):
        pairs: Counter = Counter()
        for w, count in words.items():
            seq = seqs[w]
            for a, b in zip(seq, seq[1:]):
                pairs[(a, b)] += count
        if not pairs:
            break
        (a, b), _ = max(pairs.items(), key=lambda kv: (kv[1], kv[0]))
        merges.append(a + b)
        for w, seq in seqs.items():
            i, out = 0, []
            while i < len(seq):
                if i + 1 < len(seq) and seq[i] == a and seq[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(seq[i])
                    i += 1
            seqs[w] = out
    return merges


def write_kimi_tokenizer(out_dir: Path, text: str, num_merges: int,
                         chat_template: str | None = KIMI_STYLE_CHAT_TEMPLATE) -> Path:
    """Write ``tiktoken.model`` + ``tokenizer_config.json`` into ``out_dir``; returns it.

    The BPE has ``256 + num_merges`` tokens (fewer if the text runs out of pairs); the special
    ids follow at the same offsets as Kimi's (``[BOS]`` = BPE size, media tokens at +18..+21,
    the video placeholder at +256).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    tokens = [bytes([b]) for b in range(256)] + learn_merges(text, num_merges)
    lines = [f"{base64.b64encode(tok).decode()} {rank}" for rank, tok in enumerate(tokens)]
    (out_dir / "tiktoken.model").write_text("\n".join(lines) + "\n")
    base = len(tokens)
    named = {base + off: name for name, off in KIMI_SPECIAL_TOKEN_OFFSETS.items()}
    decoder = {
        str(i): {"content": named.get(i, f"<|reserved_token_{i}|>"), "lstrip": False,
                 "normalized": False, "rstrip": False, "single_word": False, "special": True}
        for i in range(base, base + KIMI_NUM_RESERVED_SPECIAL_TOKENS)}
    video = base + KIMI_VIDEO_PLACEHOLDER_OFFSET
    decoder[str(video)] = {"content": VIDEO_PLACEHOLDER, "lstrip": False, "normalized": False,
                           "rstrip": False, "single_word": False, "special": True}
    config = {
        "added_tokens_decoder": decoder,
        "auto_map": {"AutoTokenizer": ["tokenization_kimi.TikTokenTokenizer", None]},
        "tokenizer_class": "TikTokenTokenizer",
        "bos_token": "[BOS]", "eos_token": "[EOS]", "pad_token": "[PAD]", "unk_token": "[UNK]",
        "model_max_length": 1048576,
    }
    if chat_template is not None:
        config["chat_template"] = chat_template
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return out_dir
