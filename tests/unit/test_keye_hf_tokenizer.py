"""A Keye job on a team's own Qwen-style tokenizer (``data.tokenizer`` = a directory with
``tokenizer.json`` + ``tokenizer_config.json``, as shipped beside a Qwen3 / Keye checkpoint):
byte-level BPE, Qwen's ChatML specials and Keye's media tokens as the tokenizer's own added
tokens, a ChatML chat template. The trainer's wiring takes the media ids from that tokenizer (no
tokens appended), and the loader's packs hold its ids in Keye's template, decoding back to the
template's text."""

from __future__ import annotations

import re

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from megatron_vlm.data.corpus import bundled_corpus_dir
from megatron_vlm.data.hf_tokenizer import HFTokenizer
from megatron_vlm.data.mm_loader import MultimodalLoader
from megatron_vlm.data.token_ids import resolve_token_ids
from megatron_vlm.families.keye.media import KEYE_SPECIAL_TOKENS
from megatron_vlm.recipes import get_recipe
from megatron_vlm.training.data_setup import build_tokenizer, media_rules_for

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = (
    "{% for message in messages %}"
    "<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def qwen_style_dir(tmp_path_factory):
    """A byte-level BPE tokenizer trained on the bundled text, saved as transformers does."""
    texts = (bundled_corpus_dir() / "train.txt").read_text().splitlines()[:2000]
    texts += ["a video of a red square on a black background. the square moves from the left"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=600, special_tokens=QWEN_SPECIALS + list(KEYE_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")
    fast.chat_template = CHATML
    out = tmp_path_factory.mktemp("qwen_style_tokenizer")
    fast.save_pretrained(out)
    return out


def test_keye_job_uses_the_tokenizers_own_media_ids_and_packs_its_template(qwen_style_dir,
                                                                           tmp_path):
    job = get_recipe("tiny_keye_cpu")
    job.data.tokenizer = str(qwen_style_dir)
    tok = build_tokenizer(job, bundled_corpus_dir(), tmp_path)
    assert isinstance(tok, HFTokenizer) and tok.chat_template == CHATML
    own = {t: tok.token_id(t) for t in QWEN_SPECIALS + list(KEYE_SPECIAL_TOKENS)}
    # The special tokens were trained first: ids 0..9 in that order, nothing appended.
    assert list(own.values()) == list(range(10)) and tok.vocab_size == 600
    rules = media_rules_for(job)
    ids, _ = resolve_token_ids(job.model.token_ids, tok, True, rules)
    assert (ids.media_begin, ids.media_end, ids.image, ids.video) == (
        own["<|vision_start|>"], own["<|vision_end|>"], own["<|image_pad|>"],
        own["<|video_pad|>"])
    assert tok.eos_id == own["<|endoftext|>"]

    mm = job.data.multimodal
    mm.num_workers = 0
    with MultimodalLoader(mm, tok, seq_length=512, global_batch_size=4, dp_rank=0, dp_size=1,
                          seed=1, pad_to_multiple=4, media_rules=rules) as loader:
        batches = loader.next_global_batch()
    text = "".join(tok.decode(b.tokens[0].tolist()) for b in batches)
    # Keye's template in the tokenizer's own pieces: frames as <|frame|> + "t.t" timestamp +
    # 2x2 video pads (the tiny recipe's frames), images inside vision_start/end.
    frames = re.findall(r"<\|frame\|>(\d+\.\d)((?:<\|video_pad\|>)+)", text)
    assert frames and all(len(pads) == 4 * len("<|video_pad|>") for _, pads in frames)
    assert re.search(r"<\|vision_start\|>(<\|image_pad\|>)+<\|vision_end\|>", text)
    assert "moves from the" in text and "<|endoftext|>" in text
    for b in batches:
        tokens = b.tokens[0]
        assert int((tokens == own["<|image_pad|>"]).sum() + (tokens == own["<|video_pad|>"])
                   .sum()) == int(b.vision.grid_thw.prod(dim=1).sum()) // 4
