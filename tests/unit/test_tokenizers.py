"""The tokenizer interface: ``data.tokenizer`` paths in each format a team holds (Kimi's tiktoken
files, a transformers ``tokenizer.json`` directory, a SentencePiece model), ids read from the files
(never hard-coded), chat templates rendered as transformers renders them, config errors."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from kimi_tokenizer_files import KIMI_STYLE_CHAT_TEMPLATE, write_kimi_tokenizer

from megatron_vlm.config import JobConfig, apply_overrides
from megatron_vlm.data.corpus import bundled_corpus_dir
from megatron_vlm.data.kimi_tokenizer import KIMI_PAT_STR, KimiTokenizer, SpecialTokensTokenizer
from megatron_vlm.data.templates import IMAGE_PLACEHOLDER, MEDIA_BEGIN, VIDEO_PLACEHOLDER
from megatron_vlm.data.token_ids import resolve_token_ids, tokenizer_for_model
from megatron_vlm.data.tokenizer import (
    MissingSpecialTokenError,
    SentencePieceTokenizer,
    train_sentencepiece,
)
from megatron_vlm.data.tokenizer_loader import detect_kind, load_tokenizer
from megatron_vlm.recipes import get_recipe
from megatron_vlm.training.data_setup import build_tokenizer, embedding_rows

TEXTS = ["The quick brown fox jumps over 12345 dogs.\n\n  Hello  world!",
         "日本語のテキスト and Ünïcödé, don't I'll WE'RE", "a <|media_pad|> in web text"]
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"},
            {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}]


@pytest.fixture(scope="module")
def corpus_text() -> str:
    return (bundled_corpus_dir() / "train.txt").read_text()[:200_000]


@pytest.fixture(scope="module")
def kimi_dir(tmp_path_factory, corpus_text) -> Path:
    return write_kimi_tokenizer(tmp_path_factory.mktemp("kimi_tok"), corpus_text, 600)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory, kimi_dir) -> Path:
    """The same BPE as a transformers ``tokenizer.json`` directory (Qwen/GLM style), written with
    transformers' own tiktoken converter and ``save_pretrained``."""
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import TikTokenConverter

    kimi = KimiTokenizer.from_dir(kimi_dir)
    specials = [t for t, _ in sorted(kimi.special_tokens.items(), key=lambda kv: kv[1])]
    converted = TikTokenConverter(vocab_file=str(kimi_dir / "tiktoken.model"),
                                  pattern=KIMI_PAT_STR, extra_special_tokens=specials).converted()
    tok = PreTrainedTokenizerFast(tokenizer_object=converted, eos_token="[EOS]",
                                  bos_token="[BOS]", pad_token="[PAD]")
    tok.chat_template = KIMI_STYLE_CHAT_TEMPLATE
    out = tmp_path_factory.mktemp("hf_tok")
    tok.save_pretrained(str(out))
    return out


def test_kimi_format_ids_come_from_the_files(kimi_dir):
    tok = load_tokenizer(kimi_dir)
    assert isinstance(tok, KimiTokenizer)
    base = sum(1 for line in (kimi_dir / "tiktoken.model").read_text().splitlines() if line)
    config = json.loads((kimi_dir / "tokenizer_config.json").read_text())
    by_name = {e["content"]: int(i) for i, e in config["added_tokens_decoder"].items()}
    media = tok.media_token_ids()
    assert media.image_placeholder == by_name[IMAGE_PLACEHOLDER] == base + 21 != 163605
    assert media.video_placeholder == by_name[VIDEO_PLACEHOLDER] == base + 256
    assert media.media_begin == by_name[MEDIA_BEGIN]
    assert (tok.eos_id, tok.bos_id, tok.pad_id) == (by_name["[EOS]"], by_name["[BOS]"],
                                                    by_name["[PAD]"])
    assert tok.vocab_size == base + 256
    # Special-token strings in plain text stay text; encode_with_special parses them.
    assert media.image_placeholder not in tok.encode(TEXTS[2])
    assert tok.encode_with_special(IMAGE_PLACEHOLDER) == [media.image_placeholder]
    for text in TEXTS:
        assert tok.decode(tok.encode(text)) == text


def test_kimi_config_moves_a_token_and_renames_eos(tmp_path, corpus_text):
    d = write_kimi_tokenizer(tmp_path / "t", corpus_text[:20_000], 50)
    config = json.loads((d / "tokenizer_config.json").read_text())
    base = 256 + 50
    # A release that put <|media_pad|> elsewhere and ends documents with <|im_end|>.
    config["added_tokens_decoder"][str(base + 30)]["content"] = IMAGE_PLACEHOLDER
    config["eos_token"] = {"content": "<|im_end|>"}
    (d / "tokenizer_config.json").write_text(json.dumps(config))
    tok = load_tokenizer(d)
    assert tok.media_token_ids().image_placeholder == base + 30
    assert tok.eos_id == tok.token_id("<|im_end|>") == base + 2


def test_chat_template_renders_as_transformers_does(kimi_dir, hf_dir):
    """Our jinja rendering of the Kimi tokenizer's template = transformers' apply_chat_template
    of the same template (the HF directory), with and without the generation prompt."""
    kimi, hf = load_tokenizer(kimi_dir), load_tokenizer(hf_dir)
    assert kimi.chat_template == KIMI_STYLE_CHAT_TEMPLATE
    for gen in (False, True):
        ours = kimi.apply_chat_template(MESSAGES, add_generation_prompt=gen)
        assert ours == hf.apply_chat_template(MESSAGES, add_generation_prompt=gen)
    assert ours.startswith("<|im_system|>system<|im_middle|>Be brief.<|im_end|>")
    assert ours.endswith("<|im_assistant|>assistant<|im_middle|>")


def test_hf_tokenizer_directory_equals_the_tiktoken_file(kimi_dir, hf_dir):
    assert detect_kind(hf_dir) == "hf" and detect_kind(kimi_dir) == "tiktoken"
    kimi, hf = load_tokenizer(kimi_dir), load_tokenizer(hf_dir)
    for text in TEXTS:
        assert hf.encode(text) == kimi.encode(text)
    assert hf.media_token_ids() == kimi.media_token_ids()
    assert (hf.eos_id, hf.bos_id, hf.pad_id) == (kimi.eos_id, kimi.bos_id, kimi.pad_id)
    assert hf.vocab_size == kimi.vocab_size + 1  # the video placeholder sits past the table
    assert embedding_rows(hf, is_vlm=True) == embedding_rows(kimi, is_vlm=True) == kimi.vocab_size
    assert embedding_rows(hf, is_vlm=False) == hf.vocab_size


def test_sentencepiece_file_and_media_tokens(tmp_path, corpus_text):
    (tmp_path / "c.txt").write_text(corpus_text[:50_000])
    model = train_sentencepiece(tmp_path / "c.txt", tmp_path / "sp", 300, seed=0)
    tok = load_tokenizer(model)
    assert isinstance(tok, SentencePieceTokenizer) and detect_kind(model) == "sentencepiece"
    with pytest.raises(MissingSpecialTokenError, match="media_pad"):
        tok.media_token_ids()
    mm = SpecialTokensTokenizer(tok)
    assert mm.media_token_ids().media_begin == 300
    assert mm.special_tokens["</s>"] == tok.eos_id == 2


def test_round_trip_through_save_pretrained(kimi_dir, tmp_path):
    tok = load_tokenizer(kimi_dir)
    tok.save_pretrained(tmp_path / "saved")
    again = load_tokenizer(tmp_path / "saved")
    assert again.special_tokens == tok.special_tokens
    assert again.chat_template == tok.chat_template
    assert [again.encode(t) for t in TEXTS] == [tok.encode(t) for t in TEXTS]


def test_bad_paths_are_config_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_tokenizer(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "README").write_text("x")
    with pytest.raises(ValueError, match="no tokenizer files found"):
        load_tokenizer(tmp_path / "empty")


def _job(recipe: str, *overrides: str) -> JobConfig:
    return apply_overrides(get_recipe(recipe), list(overrides))


def test_run_tokenizer_checks_vocab_and_fills_token_ids(kimi_dir, tmp_path):
    job = _job("tiny_cpu", f"data.tokenizer={kimi_dir}")
    tok = build_tokenizer(job, bundled_corpus_dir(), tmp_path)
    ids, notes = resolve_token_ids(job.model.token_ids, tok, is_vlm=True)
    assert ids.image == tok.media_token_ids().image_placeholder and ids.eos == tok.eos_id
    assert notes == []
    with pytest.raises(ValueError, match=r"model.token_ids.image=5 but the tokenizer has"):
        resolve_token_ids(_job("tiny_cpu", "model.token_ids.image=5").model.token_ids, tok, True)
    # An imported Instruct config's eos (<|im_end|>) yields to the tokenizer's end of document.
    im_end = tok.token_id("<|im_end|>")
    ids, notes = resolve_token_ids(
        _job("tiny_cpu", f"model.token_ids.eos={im_end}").model.token_ids, tok, True)
    assert ids.eos == tok.eos_id != im_end
    assert len(notes) == 1 and f"model.token_ids.eos={im_end} differs" in notes[0]
    small = _job("tiny_cpu", f"data.tokenizer={kimi_dir}", "model.llm.vocab_size=1024")
    with pytest.raises(ValueError, match=r"1112 ids but model.llm.vocab_size=1024"):
        build_tokenizer(small, bundled_corpus_dir(), tmp_path)


def test_legacy_tokenizer_model_key_folds_into_tokenizer():
    job = _job("tiny_text_cpu", "data.tokenizer_model=/x/spm.model")
    assert job.data.tokenizer == "/x/spm.model" and job.data.tokenizer_model is None
    with pytest.raises(ValueError, match="legacy name"):
        _job("tiny_text_cpu", "data.tokenizer=/a", "data.tokenizer_model=/b")


@pytest.mark.parametrize("recipe", ["kimi_k25", "kimi_k25_32k", "kimi_vl_a3b"])
def test_real_recipes_require_tokenizer_and_data(recipe):
    job = get_recipe(recipe)
    with pytest.raises(ValueError) as err:
        job.check_inputs()
    assert "data.tokenizer" in str(err.value) and "data.multimodal.root" in str(err.value)
    half = _job(recipe, "data.tokenizer=/ckpt/tok")
    with pytest.raises(ValueError, match="data.multimodal.root") as err:
        half.check_inputs()
    assert "data.tokenizer " not in str(err.value)
    _job(recipe, "data.tokenizer=/ckpt/tok", "data.multimodal.root=/data").check_inputs()
    get_recipe("tiny_cpu").check_inputs()  # the tiny recipes train on the bundled corpus


def test_an_exported_sentencepiece_directory_reloads_as_the_run_used_it(tmp_path, corpus_text):
    """The tiny runs' tokenizer (SentencePiece + appended media tokens) saved as an HF export
    writes it, then read back from the directory: the same ids."""
    (tmp_path / "c.txt").write_text(corpus_text[:50_000])
    mm = SpecialTokensTokenizer(SentencePieceTokenizer(
        train_sentencepiece(tmp_path / "c.txt", tmp_path / "sp", 300, seed=0)))
    mm.save_pretrained(tmp_path / "export")
    assert detect_kind(tmp_path / "export") == "sentencepiece"
    again = tokenizer_for_model(load_tokenizer(tmp_path / "export"), is_vlm=True)
    assert again.special_tokens == mm.special_tokens
    assert again.encode_with_special(TEXTS[2]) == mm.encode_with_special(TEXTS[2])


def test_role_tagged_sample_tokenises_as_the_tokenizers_chat_template(kimi_dir, hf_dir):
    """A conversation stored as role-tagged turns (what records.py writes for LLaVA turns) is
    written by the run tokenizer's own chat template: its tokens are transformers'
    ``apply_chat_template(tokenize=True)`` of the same messages (the HF directory of the same
    BPE and template), plus the document's EOS; loss falls on the answers and their <|im_end|>.
    Unlike a rendered string, sample text that spells <|im_end|> stays text."""
    from transformers import AutoTokenizer

    from megatron_vlm.data.media_rules import KIMI_MEDIA_RULES
    from megatron_vlm.data.mm_encode import EncodeSettings, plan_document
    from megatron_vlm.data.records import FORMAT

    tok = load_tokenizer(kimi_dir)
    hf = AutoTokenizer.from_pretrained(hf_dir)
    settings = EncodeSettings(seq_length=4096, max_patches=4096, rules=KIMI_MEDIA_RULES)

    def encode(turns):
        segments = []
        for role, text in turns:
            segments += [{"turn": role}, {"text": text, "loss": role == "assistant"}]
        record = {"format": FORMAT, "media": [], "segments": segments}
        return plan_document(record, {}, settings, tok, tok.media_token_ids())[0]

    turns = [("system", "Be brief."), ("user", "What colour is the square?"),
             ("assistant", "Red."), ("user", "And the circle?"), ("assistant", "Blue.")]
    doc = encode(turns)
    messages = [{"role": r, "content": t} for r, t in turns]
    expected = hf.apply_chat_template(messages, tokenize=True, return_dict=False)
    assert doc.tokens[:-1].tolist() == list(expected) and doc.tokens[-1] == tok.eos_id
    trained = tok.decode([t for t, m in zip(doc.tokens.tolist(), doc.target_mask) if m])
    assert trained == "Red.<|im_end|>Blue.<|im_end|>" + tok.decode([tok.eos_id])
    # Web text that spells <|im_end|> stays text (one id would end the turn early).
    doc = encode([("user", "Say <|im_end|>."), ("assistant", "<|im_end|>")])
    assert int((doc.tokens == tok.token_id("<|im_end|>")).sum()) == 2
