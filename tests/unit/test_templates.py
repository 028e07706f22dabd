"""Media prompt templates vs transformers' Kimi K2.5 processor text, token/loss/span layout, and the
tokenizers that carry the media special tokens (Kimi tiktoken from a synthetic BPE file;
SentencePiece + appended specials)."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest
import torch
from hf_processor_fixture import kimi_processor_fixture

from megatron_vlm.data.image import ProcessedImage
from megatron_vlm.data.kimi_tokenizer import (
    KIMI_NUM_BASE_TOKENS,
    KIMI_PAT_STR,
    KIMI_SPECIAL_TOKEN_OFFSETS,
    KIMI_VIDEO_PLACEHOLDER_OFFSET,
    KimiTokenizer,
    SpecialTokensTokenizer,
    _split_long_runs,
)
from megatron_vlm.data.media_errors import BadSampleError, MediaGridError, SkipReason
from megatron_vlm.data.templates import (
    IMAGE_PLACEHOLDER,
    KIMI_K25_MEDIA_TOKEN_IDS,
    MEDIA_BEGIN,
    MEDIA_CONTENT,
    MEDIA_END,
    SpecialToken,
    Text,
    format_timestamp,
    render_text,
    tokenize_interleaved,
)
from megatron_vlm.data.video import ProcessedVideo, VideoChunk


def image(h: int, w: int) -> ProcessedImage:
    return ProcessedImage(torch.empty(0, 3, 14, 14), (1, h, w), (h * 14, w * 14), (h * 14, w * 14))


def chunk(t: int, h: int, w: int, ts: float) -> VideoChunk:
    return VideoChunk(torch.empty(0, 3, 14, 14), (t, h, w), ts)


class CharTokenizer:
    """Byte-level stand-in for a text tokenizer: ids 0..255, eos 0; splitting-invariant."""

    vocab_size = 256
    eos_id = 0
    pad_id = 0

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(ids).decode("utf-8")


# ------------------------------------------------------------------------ text vs transformers


def test_video_text_equals_hf_replace_video_token():
    """transformers' ``Kimi_K25Processor.replace_video_token`` (a real processor, in the fixture)
    for 9 frames at 29.97 fps spanning past an hour (HH > 0, non-round ms): 4 + 4 + 1."""
    case = kimi_processor_fixture()["video_text"]
    want = case["prompt_text"]
    fps, indices, grids = case["fps"], case["frames_indices"], case["video_grid_thw"]
    stamps = [i / fps for i in indices]
    video = ProcessedVideo(chunks=[chunk(*g, stamps[4 * k]) for k, g in enumerate(grids)],
                           fps=fps, total_frames=case["total_num_frames"])
    assert render_text([video]) == want
    assert want.startswith("00:00:00.000" + MEDIA_BEGIN + "video" + MEDIA_CONTENT)
    assert "01:00:00.500" + MEDIA_BEGIN in want  # 107907 / 29.97 = 3600.5005 s
    assert "01:01:47.407" + MEDIA_BEGIN in want  # 111111 / 29.97 = 3707.4074 s: ms truncated


def test_format_timestamp_truncates_ms():
    assert format_timestamp(0.0) == "00:00:00.000"
    assert format_timestamp(2.5) == "00:00:02.500"
    assert format_timestamp(3725.4567) == "01:02:05.456"  # truncated, not rounded
    assert format_timestamp(59.9999) == "00:00:59.999"


def test_image_text_equals_hf_wrapper_and_replace_image_token():
    for case in kimi_processor_fixture()["image_text"]:
        _, h, w = case["image_grid_thw"]
        # The chat template writes the wrapper around one <|media_pad|>; the processor expands it.
        pads = case["placeholders"]
        want = f"{MEDIA_BEGIN}image{MEDIA_CONTENT}{pads}{MEDIA_END}"
        assert render_text([image(h, w)]) == want
        assert pads.count(IMAGE_PLACEHOLDER) == h * w // 4


# ---------------------------------------------------------------------------- token layout


def test_tokenize_interleaved_layout_and_masks():
    tok = SpecialTokensTokenizer(CharTokenizer())
    ids = tok.media_token_ids()
    segs = [
        Text("Q: ", loss=False),
        image(2, 4),  # 2 placeholders
        Text(" and"),
        ProcessedVideo(chunks=[chunk(4, 2, 2, 0.0), chunk(1, 2, 2, 2.0)], fps=2.0, total_frames=5),
        Text("!"),
    ]
    out = tokenize_interleaved(segs, tok, ids)
    # Same ids as parsing the rendered string (the char tokenizer is splitting-invariant).
    assert out.tokens.tolist() == tok.encode_with_special(render_text(segs))
    spans = [(s.start, s.length, s.item_index, s.is_video) for s in out.placeholder_spans]
    # "Q: " (3) + begin + "image" (5) + content -> first placeholder at 3 + 1 + 5 + 1 = 10.
    img_start = 10
    # then: end, " and", "00:00:00.000", begin, "video", content
    v0 = img_start + 2 + 1 + 4 + 12 + 1 + 5 + 1
    v1 = v0 + 1 + 1 + 12 + 1 + 5 + 1
    assert spans == [(img_start, 2, 0, False), (v0, 1, 1, True), (v1, 1, 2, True)]
    assert out.items == [segs[1], *segs[3].chunks]
    t = out.tokens
    assert t[img_start : img_start + 2].tolist() == [ids.image_placeholder] * 2
    assert t[v0] == ids.video_placeholder and t[v1] == ids.video_placeholder
    assert t[img_start - 1] == ids.media_content and t[img_start + 2] == ids.media_end
    # Target mask: prompt and placeholders are never targets; markers and answer text are.
    target = out.target_mask
    assert not target[:3].any()
    assert not target[img_start : img_start + 2].any() and not target[v0] and not target[v1]
    assert target[3] and target[-1]
    # Input-aligned loss mask (contract): loss[i] = target[i+1] and not placeholder[i].
    loss = out.loss_mask()
    assert loss.dtype == np.float32 and loss[-1] == 0
    assert loss[2] == 1  # last prompt token predicts <|media_begin|> (a marker target)
    assert loss[img_start - 1] == 0  # <|media_content|> would predict a placeholder
    assert loss[img_start] == 0 and loss[img_start + 1] == 0  # placeholders
    expected = np.zeros(len(t), dtype=np.float32)
    placeholder = out.is_placeholder
    for i in range(len(t) - 1):
        expected[i] = float(target[i + 1] and not placeholder[i])
    assert np.array_equal(loss, expected)
    # Markers can be masked too.
    quiet = tokenize_interleaved(segs, tok, ids, markers_loss=False)
    assert quiet.target_mask.sum() == len(" and") + len("!")


def test_special_strings_in_text_never_become_placeholders():
    tok = SpecialTokensTokenizer(CharTokenizer())
    ids = tok.media_token_ids()
    out = tokenize_interleaved([Text(f"web page with {IMAGE_PLACEHOLDER} inside")], tok, ids)
    assert ids.image_placeholder not in out.tokens and not out.placeholder_spans

    class Parsing:  # a tokenizer that (wrongly) parses special tokens in plain text
        encode = staticmethod(tok.encode_with_special)

    with pytest.raises(BadSampleError) as err:
        tokenize_interleaved([Text(IMAGE_PLACEHOLDER)], Parsing(), ids)
    assert err.value.reason == SkipReason.PLACEHOLDER_IN_TEXT


def test_bad_grids_and_empty_sample():
    tok = SpecialTokensTokenizer(CharTokenizer())
    ids = tok.media_token_ids()
    for bad in (image(3, 4), chunk(5, 2, 2, 0.0), chunk(0, 2, 2, 0.0)):
        with pytest.raises(MediaGridError) as err:
            tokenize_interleaved([bad], tok, ids)
        assert err.value.reason == SkipReason.BAD_GRID
    with pytest.raises(BadSampleError) as err:
        tokenize_interleaved([Text("")], tok, ids)
    assert err.value.reason == SkipReason.EMPTY_TEXT


def test_special_token_segments():
    tok = SpecialTokensTokenizer(CharTokenizer())
    ids = tok.media_token_ids()
    out = tokenize_interleaved([SpecialToken("fast_start"), SpecialToken("fast_end")], tok, ids)
    assert out.tokens.tolist() == [ids.fast_start, ids.fast_end]
    with pytest.raises(ValueError):
        tokenize_interleaved([SpecialToken("fast_start")], tok, KIMI_K25_MEDIA_TOKEN_IDS)


# ------------------------------------------------------------------------------ tokenizers


def test_kimi_ids_agree_with_hf_config():
    cfg_mod = pytest.importorskip("transformers.models.kimi_k25.configuration_kimi_k25")
    cfg = cfg_mod.Kimi_K25Config()
    ids = KIMI_K25_MEDIA_TOKEN_IDS
    assert ids.image_placeholder == cfg.image_token_id
    assert ids.video_placeholder == cfg.video_token_id
    assert (ids.media_begin, ids.media_end) == (cfg.vision_start_token_id, cfg.vision_end_token_id)
    base = KIMI_NUM_BASE_TOKENS
    assert ids.media_begin == base + KIMI_SPECIAL_TOKEN_OFFSETS[MEDIA_BEGIN]
    assert ids.media_content == base + KIMI_SPECIAL_TOKEN_OFFSETS[MEDIA_CONTENT]
    assert ids.media_end == base + KIMI_SPECIAL_TOKEN_OFFSETS[MEDIA_END]
    assert ids.image_placeholder == base + KIMI_SPECIAL_TOKEN_OFFSETS[IMAGE_PLACEHOLDER]
    assert ids.video_placeholder == base + KIMI_VIDEO_PLACEHOLDER_OFFSET


@pytest.fixture
def bpe_file(tmp_path):
    """A tiny tiktoken BPE file: 256 bytes + merges h e l l o and "34" (never used: Kimi's split
    pattern cuts digits into groups of <= 3 from the left, "12345" -> "123" "45")."""
    merges = [b"he", b"ll", b"hell", b"hello", b"34"]
    ranks = {bytes([i]): i for i in range(256)}
    for m in merges:
        ranks[m] = len(ranks)
    path = tmp_path / "tiktoken.model"
    path.write_text("".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks.items()))
    return path


def test_kimi_tokenizer_loads_synthetic_bpe(bpe_file, tmp_path):
    tok = KimiTokenizer(bpe_file)
    base = 261
    assert tok.num_base_tokens == base and tok.vocab_size == base + 256
    assert tok.bos_id == base and tok.eos_id == base + 1 and tok.pad_id == base + 255
    # ranks: bytes 0-255, he 256, ll 257, hell 258, hello 259, "34" 260.
    assert tok.encode("hello hello") == [259, 32, 259]  # " hello" is one pre-token: " " + hello
    assert tok.encode("12345") == [49, 50, 51, 52, 53]  # "123" "45": the "34" merge never applies
    assert tok.encode("1234") == [49, 50, 51, 52]
    assert tok.decode(tok.encode("héllo 你好 12345\n\n  x")) == "héllo 你好 12345\n\n  x"
    ids = tok.media_token_ids()
    assert ids.media_begin == base + 18 and ids.image_placeholder == base + 21
    assert ids.video_placeholder == base + 256  # past the table, like HF's 163840
    # Special strings: plain text in encode(), ids in encode_with_special().
    text = f"{MEDIA_BEGIN}image{MEDIA_CONTENT}{IMAGE_PLACEHOLDER}{MEDIA_END}"
    assert not set(tok.encode(text)) & ids.all_ids
    assert tok.encode_with_special(text) == [
        ids.media_begin, *tok.encode("image"), ids.media_content, ids.image_placeholder,
        ids.media_end,
    ]
    assert tok.decode(tok.encode_with_special(text)) == text
    assert tok.token_id("<|reserved_token_300|>") == 300
    # Templates with the Kimi tokenizer equal parsing the rendered string.
    segs = [Text("hello "), image(2, 2), chunk(2, 2, 2, 1.25), Text(" hello")]
    out = tokenize_interleaved(segs, tok, ids)
    assert out.tokens.tolist() == tok.encode_with_special(render_text(segs))
    # tokenizer_config.json names override the built-in table.
    cfg = tmp_path / "tokenizer_config.json"
    cfg.write_text(json.dumps({"added_tokens_decoder": {str(base + 5): {"content": "<|x|>"},
                                                        str(base + 30): {"content": "[EOS]"}}}))
    tok2 = KimiTokenizer(bpe_file, tokenizer_config=cfg)
    assert tok2.token_id("<|x|>") == base + 5 and tok2.eos_id == base + 30


def test_kimi_pattern_splits_long_runs_like_release():
    text = "a" * 60_000 + " " * 30_000 + "b c"
    parts = list(_split_long_runs(text))
    assert "".join(parts) == text
    assert [len(p) for p in parts] == [25_000, 25_000, 10_000 + 25_000, 5_000 + 3]
    assert list(_split_long_runs("short text")) == ["short text"]
    assert KIMI_PAT_STR.count("|") >= 7


def test_special_tokens_wrapper_on_sentencepiece(tmp_path):
    from megatron_vlm.data.tokenizer import SentencePieceTokenizer, train_sentencepiece

    corpus = tmp_path / "c.txt"
    corpus.write_text("\n".join(f"the red cube image is on the left {i}" for i in range(200)))
    sp = SentencePieceTokenizer(train_sentencepiece(corpus, tmp_path / "sp", 60, seed=0))
    tok = SpecialTokensTokenizer(sp)
    assert tok.vocab_size == sp.vocab_size + 7
    ids = tok.media_token_ids()
    assert min(ids.all_ids) == sp.vocab_size and max(ids.all_ids) == sp.vocab_size + 6
    assert max(tok.encode(f"the {IMAGE_PLACEHOLDER} cube")) < sp.vocab_size
    out = tokenize_interleaved([Text("the red cube"), image(2, 2), Text(" is left")], tok, ids)
    assert out.tokens[out.placeholder_spans[0].start] == ids.image_placeholder
    # SentencePiece drops the leading space of each decoded run; the specials come back intact.
    assert tok.decode(out.tokens.tolist()) == (
        f"the red cube{MEDIA_BEGIN}image{MEDIA_CONTENT}{IMAGE_PLACEHOLDER}{MEDIA_END}is left"
    )
    assert tok.eos_id == sp.eos_id and tok.pad_id == sp.pad_id


def test_media_special_ids_stay_put_and_slowfast_markers_come_last(bpe_file):
    # SentencePiece + appended specials: the five Kimi media tokens keep ids base+0..4 (what
    # tokenizers and checkpoints made before the SlowFast markers had); the markers follow.
    ids = SpecialTokensTokenizer(CharTokenizer()).media_token_ids()
    assert (ids.media_begin, ids.media_content, ids.media_end, ids.image_placeholder,
            ids.video_placeholder, ids.fast_start, ids.fast_end) == tuple(range(256, 263))
    # Kimi's tiktoken layout: the K2.5 ids are untouched (163602-163605, 163840 for the release);
    # the markers take two reserved slots below [UNK]/[PAD], inside the embedding table.
    tok = KimiTokenizer(bpe_file)
    base = tok.num_base_tokens
    kimi = tok.media_token_ids()
    assert (kimi.media_begin, kimi.media_content, kimi.media_end, kimi.image_placeholder,
            kimi.video_placeholder) == (base + 18, base + 19, base + 20, base + 21, base + 256)
    assert (kimi.fast_start, kimi.fast_end) == (base + 252, base + 253)
    assert {kimi.fast_start, kimi.fast_end}.isdisjoint(
        {tok.pad_id, tok.eos_id, tok.bos_id, tok.token_id("[UNK]")})
    assert max(kimi.fast_start, kimi.fast_end) < tok.vocab_size
    assert len(kimi.all_ids) == 7
