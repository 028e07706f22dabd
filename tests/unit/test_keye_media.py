"""Keye-VL 1.5's data path through the family-neutral media rules (families/keye/media.py):
a document planned and decoded by the loader's encoder tokenises to the token sequence written by
hand from Keye's template, one item per image / video frame with keye-vl-utils' sizes
(families/keye/processing.py), image and frame pixels equal processing's resize normalised
(mean = std = 0.5), packed M-RoPE ids equal keye_position_ids of each document, and the energon
loader on the bundled corpus yields packs whose placeholders match the family's tokens per item.
"""

from __future__ import annotations

import io
import json
import pickle

import numpy as np
import PIL.Image
import pytest
import torch

from megatron_vlm.config.data_mm import MultimodalDataConfig, StageMix
from megatron_vlm.data.corpus import bundled_corpus_dir
from megatron_vlm.data.kimi_tokenizer import SpecialTokensTokenizer
from megatron_vlm.data.media_rules import KIMI_MEDIA_RULES, token_ids_config
from megatron_vlm.data.mm_corpus import bundled_mm_corpus
from megatron_vlm.data.mm_encode import EncodeSettings, decode_document, plan_document
from megatron_vlm.data.mm_loader import MultimodalLoader
from megatron_vlm.data.mm_packing import pack_tokenized
from megatron_vlm.data.mrope_positions import VisionBlock
from megatron_vlm.data.shards import FORMAT
from megatron_vlm.data.token_ids import resolve_token_ids
from megatron_vlm.data.tokenizer import MissingSpecialTokenError, get_or_train_tokenizer
from megatron_vlm.families import get_family
from megatron_vlm.families.keye.config import SiglipVisionConfig
from megatron_vlm.families.keye.media import (
    KEYE_SPECIAL_TOKENS,
    KeyeMediaRules,
    _frame_plan,
    keye_media_rules,
)
from megatron_vlm.families.keye.positions import keye_position_ids
from megatron_vlm.families.keye.processing import plan_video, resize_image, resize_video_frames
from megatron_vlm.recipes import get_recipe
from megatron_vlm.training.data_setup import build_tokenizer, embedding_rows, media_rules_for
from tests.fixtures.formats import image_bytes

av = pytest.importorskip("av")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


class _Bytes:
    """A tiny byte-level tokenizer (ids 0..255 are the UTF-8 bytes)."""

    vocab_size, eos_id, pad_id = 258, 256, 257

    def encode(self, text: str) -> list[int]:
        return list(text.encode())


TOK = SpecialTokensTokenizer(_Bytes(), KEYE_SPECIAL_TOKENS)
VS, VE, IP, VP, FR, FS, FE = (TOK.special_tokens[t] for t in KEYE_SPECIAL_TOKENS)


def E(text: str) -> list[int]:  # noqa: N802 - the byte ids of a text
    return list(text.encode())


def _clip(frames: list[np.ndarray], rate: int = 4, fmt: str = "mp4") -> bytes:
    buf = io.BytesIO()
    with av.open(buf, mode="w", format=fmt) as container:
        stream = container.add_stream("libx264", rate=rate)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "10", "preset": "ultrafast", "threads": "1"}
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def _pictures() -> tuple[np.ndarray, np.ndarray]:
    a = np.full((48, 64, 3), 128, np.uint8)
    a[8:24, 8:24] = (220, 30, 30)
    b = np.full((48, 64, 3), 200, np.uint8)
    b[20:44, 30:60] = (20, 40, 220)
    return a, b


@pytest.fixture(scope="module")
def video() -> bytes:
    # 6 source frames at 4 fps (1.5 s): Keye samples int(1.5 * 2) = 3 frames at
    # linspace(0, 5, 3).round() = [0, 2, 5] (2.5 rounds half to even), timestamps 0.0, 0.5 and
    # 1.25 s, written "0.0", "0.5", "1.2". Frames 0 and 2 show picture a, frame 5 picture b.
    a, b = _pictures()
    return _clip([a, a, a, a, b, b])


def _document(video: bytes) -> tuple[dict, dict]:
    record = {"format": FORMAT,
              "media": [{"type": "image", "ext": "png"}, {"type": "video", "ext": "mp4"}],
              "segments": [{"text": "A cat"}, {"media": 0}, {"text": "then"}, {"media": 1}]}
    members = {"json": json.dumps(record).encode(), "m0.png": image_bytes(0, "png"),
               "m1.mp4": video}
    return record, members


def _settings(sampler: str) -> EncodeSettings:
    return EncodeSettings(seq_length=4096, max_patches=8192, rules=KeyeMediaRules(),
                          video_sampler=sampler)


def _expected(fast: bool) -> tuple[list[int], list[VisionBlock]]:
    """The document by hand: Keye's template, with each vision block's start.

    The 64x48 PNG: smart_resize rounds both sides to 56 px (2 x 28; 3,136 px = the 4-token
    floor), grid (1, 4, 4): 4 <|image_pad|>. Each 64x48 frame: Keye's 48-token frame floor
    (37,632 px) scales it by sqrt(37632 / 3072) = 3.5 to 168 x 224 px, grid (1, 12, 16): 48
    <|video_pad|> (a fast frame's ceiling, max(int(0.3 * 48), 48) tokens, is the same here).
    """
    tokens: list[int] = []
    blocks: list[VisionBlock] = []

    def pads(token: int, rows: int, cols: int) -> None:
        blocks.append(VisionBlock(start=len(tokens), rows=rows, cols=cols))
        tokens.extend([token] * rows * cols)

    tokens += E("A cat") + [VS]
    pads(IP, 2, 2)
    tokens += [VE] + E("then") + [VS]
    for stamp, is_fast in (("0.0", False), ("0.5", fast), ("1.2", False)):
        tokens += [FR] + E(stamp)
        tokens += [FS] if is_fast else []
        pads(VP, 6, 8)
        tokens += [FE] if is_fast else []
    tokens += [VE, TOK.eos_id]
    return tokens, blocks


def _patches(frame: np.ndarray) -> torch.Tensor:
    """(x/255 - 0.5)/0.5 of a [H, W, 3] uint8 frame in raster 14-px patches [n, 3, 14, 14]."""
    x = (frame.astype(np.float32) / 255.0 - 0.5) / 0.5
    h, w = frame.shape[0] // 14, frame.shape[1] // 14
    x = x.reshape(h, 14, w, 14, 3).transpose(0, 2, 4, 1, 3).reshape(h * w, 3, 14, 14)
    return torch.from_numpy(np.ascontiguousarray(x))


def _source_frames(data: bytes, indices: list[int]) -> np.ndarray:
    with av.open(io.BytesIO(data)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    return np.stack([frames[i] for i in indices])


@pytest.mark.parametrize("sampler", ["uniform", "slowfast"])
def test_document_is_keye_template_with_one_item_per_image_and_frame(video, sampler):
    record, members = _document(video)
    s = _settings(sampler)
    doc, media = plan_document(record, members, s, TOK, s.rules.media_ids(TOK))
    tokens, _ = _expected(fast=sampler == "slowfast")
    assert doc.tokens.tolist() == tokens
    # placeholders and the fast markers are never targets; text, wrappers and timestamps are
    assert doc.target_mask.tolist() == [t not in (IP, VP, FS, FE) for t in tokens]
    decoded = decode_document(doc, media, s)
    image, *frames = decoded.items
    assert [i.grid_thw for i in decoded.items] == [(1, 4, 4)] + [(1, 12, 16)] * 3
    assert [f.timestamp for f in frames] == [0.0, 0.5, 1.25]
    assert [f.is_fast for f in frames] == [False, sampler == "slowfast", False]
    # the grids are keye-vl-utils' sizes (processing.py is checked against the package)
    ref_image = resize_image(PIL.Image.open(io.BytesIO(members["m0.png"])))
    assert image.grid_thw == (1, *ref_image.grid_hw)
    source = _source_frames(video, [0, 2, 5])
    ref = plan_video(source, np.array([0, 2, 5]), 4.0, 6,
                     **({} if sampler == "slowfast" else {"min_frame_similarity": 2.0}))
    assert [f.grid_thw for f in frames] == [(1, *g) for g in ref.frame_grids]
    assert [f.is_fast for f in frames] == ref.is_fast.tolist()
    # pixels: processing's resize, normalised with mean = std = 0.5, raster patches
    torch.testing.assert_close(image.pixel_values, _patches(ref_image.pixels), atol=1e-6,
                               rtol=0)
    for f, src, size in zip(frames, source, ref.frame_sizes):
        expected = _patches(resize_video_frames(src[None], size)[0])
        torch.testing.assert_close(f.pixel_values, expected, atol=1e-6, rtol=0)


def test_a_container_without_frame_counts_gives_the_same_document():
    # Matroska carries no frame count: the video is decoded whole and sampled by the same rule.
    a, b = _pictures()
    record, members = _document(_clip([a, a, a, a, b, b], fmt="matroska"))
    s = _settings("uniform")
    doc, media = plan_document(record, members, s, TOK, s.rules.media_ids(TOK))
    assert doc.tokens.tolist() == _expected(fast=False)[0]
    decoded = decode_document(doc, media, s)
    source = _source_frames(members["m1.mp4"], [0, 2, 5])
    torch.testing.assert_close(decoded.items[3].pixel_values,
                               _patches(resize_video_frames(source[2:], (168, 224))[0]),
                               atol=1e-6, rtol=0)


def test_packed_mrope_ids_are_keye_position_ids_of_each_document(video):
    record, members = _document(video)
    s = _settings("slowfast")
    ids = s.rules.media_ids(TOK)
    first = decode_document(*plan_document(record, members, s, TOK, ids), s)
    text_image = {"format": FORMAT, "media": [{"type": "image", "ext": "png"}],
                  "segments": [{"media": 0}, {"text": "red square"}]}
    second = decode_document(*plan_document(
        text_image, {"json": b"", "m0.png": image_bytes(0, "png")}, s, TOK, ids), s)
    batch = pack_tokenized([first, second], 256, TOK.pad_id, pad_to_multiple=8,
                           position_rule=s.rules.position_rule)
    tokens, blocks = _expected(fast=True)
    n = len(tokens)
    pos = batch.mrope_position_ids
    assert torch.equal(pos[:, :n], torch.from_numpy(keye_position_ids(np.array(tokens), blocks)))
    start = -(-n // 8) * 8
    second_tokens = [VS] + [IP] * 4 + [VE] + E("red square") + [TOK.eos_id]
    assert batch.tokens[0, start : start + len(second_tokens)].tolist() == second_tokens
    expected = keye_position_ids(np.array(second_tokens), [VisionBlock(1, 2, 2)])
    assert torch.equal(pos[:, start : start + len(second_tokens)], torch.from_numpy(expected))
    # one vision item per image / frame, each t = 1
    assert batch.vision.grid_thw.tolist() == [[1, 4, 4]] + [[1, 12, 16]] * 3 + [[1, 4, 4]]


def test_rules_pickle_map_the_config_and_refuse_a_tokenizer_without_keye_tokens():
    cfg = MultimodalDataConfig(image_max_patches=256, image_min_patches=16,
                               video_chunk_max_patches=3072)
    rules = keye_media_rules(cfg)
    assert (rules.image_min_tokens, rules.image_max_tokens, rules.video_max_tokens,
            rules.video_total_tokens) == (4, 64, 768, 65536)
    settings = EncodeSettings.from_config(cfg, 512, 1, rules)
    assert pickle.loads(pickle.dumps(settings)) == settings
    assert EncodeSettings.from_config(cfg, 512, 1).rules == KIMI_MEDIA_RULES
    assert token_ids_config(rules.media_ids(TOK)) == {
        "image": IP, "video": VP, "media_begin": VS, "media_content": None, "media_end": VE}
    with pytest.raises(MissingSpecialTokenError, match="vision_start"):
        rules.media_ids(SpecialTokensTokenizer(_Bytes()))  # Kimi's tokens only


def test_frame_floor_is_keyes_48_tokens_unless_a_tiny_run_lowers_it():
    # Keye's released floor: a 112 px frame is upscaled to 196 px = 7 x 7 = 49 tokens, whatever
    # the frame ceiling says; data.multimodal.video_frame_min_patches lowers it (tiny runs only).
    def frame_grids(cfg):
        rules = keye_media_rules(cfg)
        _, sizes = _frame_plan(None, 112, 112, 3, False, rules)
        return [s // 14 for s in sizes.slow_size]

    assert frame_grids(MultimodalDataConfig(video_chunk_max_patches=16)) == [14, 14]
    assert keye_media_rules(MultimodalDataConfig()).video_frame_floor == 48
    small = MultimodalDataConfig(video_chunk_max_patches=16, video_frame_min_patches=16)
    assert keye_media_rules(small).video_frame_floor == 4
    assert frame_grids(small) == [4, 4]  # 56 px: 2 x 2 LLM tokens
    with pytest.raises(ValueError, match="video_frame_min_patches must be >= 4"):
        MultimodalDataConfig(video_frame_min_patches=2)


@pytest.fixture(scope="module")
def spm_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("spm")


def test_a_keye_job_gets_keye_tokens_ids_and_rules(spm_dir):
    # The trainer's wiring: the family's media tokens appended to the tiny SentencePiece model
    # in KEYE_SPECIAL_TOKENS order (ids 1024..1030), model.token_ids filled from them, the
    # family's rules built from data.multimodal (image_max_patches 256 -> 64 tokens).
    job = get_recipe("tiny_keye_cpu")
    tok = build_tokenizer(job, bundled_corpus_dir(), spm_dir)
    assert [tok.special_tokens[t] for t in KEYE_SPECIAL_TOKENS] == list(range(1024, 1031))
    rules = media_rules_for(job)
    assert isinstance(rules, KeyeMediaRules) and rules.image_max_tokens == 64
    assert rules.position_rule is keye_position_ids
    ids, _ = resolve_token_ids(job.model.token_ids, tok, True, rules)
    assert (ids.media_begin, ids.media_end, ids.image, ids.video, ids.media_content) == (
        1024, 1025, 1026, 1027, None)
    assert embedding_rows(tok, True, rules) == 1031 <= job.model.llm.vocab_size


def test_loader_packs_match_the_keye_family_tokens_per_item(tmp_path_factory, spm_dir):
    sizes = {"image_caption": (24, 2), "video": (16, 2), "interleaved": (12, 2),
             "text": (40, 4)}
    corpus = bundled_mm_corpus(tmp_path_factory.mktemp("cache"), sizes, seed=3,
                               samples_per_shard=20)
    spm = get_or_train_tokenizer(bundled_corpus_dir(), spm_dir, 1024, 1234)
    tok = SpecialTokensTokenizer(spm, KEYE_SPECIAL_TOKENS)
    ids = {t: tok.special_tokens[t] for t in KEYE_SPECIAL_TOKENS}
    # 1 fps: the corpus's 4-6 s clips give 4-6 frames of Keye's 49-token floor (112 px -> 196)
    cfg = MultimodalDataConfig(
        root=str(corpus), num_workers=0, shuffle_buffer_size=16, packing_buffer_size=32,
        max_patches_per_micro_batch=2048, image_max_patches=256, video_fps=1.0,
        mixes={"all": StageMix(weights={n: 1 for n in sizes}, unit="samples")}, stage="all")
    family = get_family("keye")
    vision = SiglipVisionConfig()
    with MultimodalLoader(cfg, tok, seq_length=512, global_batch_size=4, dp_rank=0, dp_size=1,
                          seed=1, pad_to_multiple=4,
                          media_rules=family.media_rules(cfg)) as loader:
        batches = loader.next_global_batch() + loader.next_global_batch()
    frames = images = 0
    for batch in batches:
        tokens = batch.tokens[0]
        assert batch.mrope_position_ids.shape == (3, 512)
        v = batch.vision
        if v is None:
            continue
        counts = family.llm_tokens_per_item(vision, v.grid_thw)
        assert bool((v.grid_thw[:, 0] == 1).all())
        pads = (tokens == ids["<|image_pad|>"]) | (tokens == ids["<|video_pad|>"])
        assert int(pads.sum()) == int(counts.sum())
        for start, count, is_video in zip(v.placeholder_starts.tolist(), counts.tolist(),
                                          v.is_video.tolist()):
            pad = ids["<|video_pad|>" if is_video else "<|image_pad|>"]
            assert bool((tokens[start : start + count] == pad).all())
            before = int(tokens[start - 1])
            if is_video:  # after the frame's timestamp text (or its fast_start)
                assert before not in (ids["<|vision_start|>"], pad)
                frames += 1
            else:
                assert before == ids["<|vision_start|>"]
                images += 1
            assert int(tokens[start + count]) in (ids["<|vision_end|>"], ids["<|frame|>"],
                                                  ids["<|fast_end|>"])
        assert int(v.cu_seqlens[-1]) == v.pixel_values.shape[0] <= 2048
    assert frames > 0 and images > 0
