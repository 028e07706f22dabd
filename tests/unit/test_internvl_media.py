"""InternVL3.5's data path through the family-neutral media rules (families/internvl/media.py):
a document planned and decoded by the loader's encoder tokenises to the token sequence written by
hand from InternVL's template (image: <img> + 256 <IMG_CONTEXT> per tile + </img>; video:
"Frame1: " <img>...</img> "\\nFrame2: " ..., 1-based), one (tiles, 32, 32) item per image and one
(1, 32, 32) item per sampled frame with pixels computed here from PIL and the processor's
arithmetic (transformers' own classes: tests/reference/test_internvl_processing.py), 1D
position ids per document (no M-RoPE), the ChatML turns and end-of-turn targets, the rules'
config mapping and pickling, and the energon loader on the bundled corpus with these rules; also
a container without frame counts, a clip span and an EXIF-rotated JPEG.
"""

from __future__ import annotations

import io
import json
import pickle
import re

import numpy as np
import PIL.Image
import pytest
import torch

from megatron_vlm.config.data_mm import MultimodalDataConfig, StageMix
from megatron_vlm.data.chat_turns import chat_segments
from megatron_vlm.data.corpus import bundled_corpus_dir
from megatron_vlm.data.image import unpatchify
from megatron_vlm.data.kimi_tokenizer import SpecialTokensTokenizer
from megatron_vlm.data.media_rules import MediaRules, MediaTokens, token_ids_config
from megatron_vlm.data.mm_corpus import bundled_mm_corpus
from megatron_vlm.data.mm_encode import EncodeSettings, decode_document, plan_document
from megatron_vlm.data.mm_loader import MultimodalLoader
from megatron_vlm.data.mm_packing import pack_tokenized
from megatron_vlm.data.shards import FORMAT
from megatron_vlm.data.tokenizer import MissingSpecialTokenError, get_or_train_tokenizer
from megatron_vlm.families.internvl.media import (
    INTERNVL_SPECIAL_TOKENS,
    InternVLMediaRules,
    internvl_media_rules,
)

av = pytest.importorskip("av")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


class _Bytes:
    """A tiny byte-level tokenizer (ids 0..255 are the UTF-8 bytes)."""

    vocab_size, eos_id, pad_id = 258, 256, 257

    def encode(self, text: str) -> list[int]:
        return list(text.encode())


TOK = SpecialTokensTokenizer(_Bytes(), INTERNVL_SPECIAL_TOKENS)
S, E_, C = (TOK.special_tokens[t] for t in ("<img>", "</img>", "<IMG_CONTEXT>"))
MEAN = np.array([0.485, 0.456, 0.406], np.float32)
STD = np.array([0.229, 0.224, 0.225], np.float32)


def E(text: str) -> list[int]:  # noqa: N802 - the byte ids of a text
    return list(text.encode())


def _clip(frames: list[np.ndarray], rate: int = 4) -> bytes:
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
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


def _frames() -> list[np.ndarray]:
    out = []
    for i in range(6):
        f = np.full((48, 64, 3), 40 * i, np.uint8)
        f[8:24, 4 + 8 * i : 20 + 8 * i] = (220, 30, 30)
        out.append(f)
    return out


def _png(height: int, width: int) -> bytes:
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 255 // width, y * 255 // height, (x + y) % 256], -1).astype(np.uint8)
    buf = io.BytesIO()
    PIL.Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def _document(video: bytes) -> tuple[dict, dict]:
    record = {"format": FORMAT,
              "media": [{"type": "image", "ext": "png"}, {"type": "video", "ext": "mp4"}],
              "segments": [{"text": "A cat"}, {"media": 0}, {"text": "then"}, {"media": 1}]}
    members = {"json": json.dumps(record).encode(), "m0.png": _png(48, 96), "m1.mp4": video}
    return record, members


SETTINGS = EncodeSettings(seq_length=4096, max_patches=16384, video_fps=2.0,
                          rules=InternVLMediaRules())


def _expected() -> list[int]:
    """The document by hand.

    The 96x48 PNG has aspect 2: the 2x1 grid (2 tiles) plus the thumbnail, 3 tiles = 768
    <IMG_CONTEXT>. The 6-frame 4 fps clip samples int(6 / 4 * 2) = 3 frames at the middles of
    3 equal spans: 1, 3, 5 (0.25, 0.75, 1.25 s), 256 <IMG_CONTEXT> each.
    """
    tokens = E("A cat") + [S] + [C] * 768 + [E_] + E("then")
    for i in range(3):
        tokens += E(f"Frame{i + 1}: " if i == 0 else f"\nFrame{i + 1}: ")
        tokens += [S] + [C] * 256 + [E_]
    return tokens + [TOK.eos_id]


def _normalised(tiles_u8: np.ndarray) -> torch.Tensor:
    """[k, 448, 448, 3] uint8 -> [k, 3, 448, 448] by transformers' numpy arithmetic."""
    x = (tiles_u8.astype(np.float64) * (1 / 255)).astype(np.float32)
    return torch.from_numpy(((x - MEAN) / STD).transpose(0, 3, 1, 2).copy())


def _resized(rgb: np.ndarray, height: int, width: int) -> np.ndarray:
    img = PIL.Image.fromarray(rgb).resize((width, height), PIL.Image.Resampling.BICUBIC)
    return np.asarray(img)


@pytest.fixture(scope="module")
def video() -> bytes:
    return _clip(_frames())


def test_document_is_internvl_template_with_tiles_and_one_item_per_frame(video):
    record, members = _document(video)
    doc, media = plan_document(record, members, SETTINGS, TOK, SETTINGS.rules.media_ids(TOK))
    tokens = _expected()
    assert doc.tokens.tolist() == tokens
    assert doc.target_mask.tolist() == [t != C for t in tokens]  # placeholders never
    decoded = decode_document(doc, media, SETTINGS)
    image, *frames = decoded.items
    assert [i.grid_thw for i in decoded.items] == [(3, 32, 32)] + [(1, 32, 32)] * 3
    assert [f.timestamp for f in frames] == [0.25, 0.75, 1.25]
    assert [(s.start, s.length, s.is_video) for s in doc.placeholder_spans] == [
        (6, 768, False), (6 + 768 + 1 + 4 + 8 + 1, 256, True),
        (6 + 768 + 1 + 4 + 8 + 1 + 256 + 1 + 9 + 1, 256, True),
        (6 + 768 + 1 + 4 + 8 + 1 + 2 * (256 + 1 + 9 + 1), 256, True)]
    # image: the 896x448 canvas cut into its left and right tiles, then the 448x448 thumbnail
    rgb = np.asarray(PIL.Image.open(io.BytesIO(members["m0.png"])))
    canvas = _resized(rgb, 448, 896)
    tiles = np.stack([canvas[:, :448], canvas[:, 448:], _resized(rgb, 448, 448)])
    assert torch.equal(unpatchify(image.pixel_values, image.grid_thw), _normalised(tiles))
    # video: source frames 1, 3, 5, each resized to one tile
    with av.open(io.BytesIO(video)) as container:
        source = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    want = _normalised(np.stack([_resized(source[i], 448, 448) for i in (1, 3, 5)]))
    got = torch.cat([unpatchify(f.pixel_values, f.grid_thw) for f in frames])
    assert torch.equal(got, want)
    assert not torch.equal(want[0], want[1])  # frames 1 and 3 differ


def _clip_matroska(frames: list[np.ndarray]) -> bytes:
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="matroska") as container:
        stream = container.add_stream("libx264", rate=4)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "10", "preset": "ultrafast", "threads": "1"}
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


def _decoded(data: bytes) -> list[np.ndarray]:
    with av.open(io.BytesIO(data)) as container:
        return [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]


def test_a_container_without_frame_counts_gives_the_same_document():
    # Matroska carries no frame count: the video is decoded whole and sampled by the same rule.
    mkv = _clip_matroska(_frames())
    record, members = _document(mkv)
    doc, media = plan_document(record, members, SETTINGS, TOK, SETTINGS.rules.media_ids(TOK))
    assert doc.tokens.tolist() == _expected()
    frames = decode_document(doc, media, SETTINGS).items[1:]
    assert [f.timestamp for f in frames] == [0.25, 0.75, 1.25]
    source = _decoded(mkv)
    want = _normalised(np.stack([_resized(source[i], 448, 448) for i in (1, 3, 5)]))
    assert torch.equal(torch.cat([unpatchify(f.pixel_values, f.grid_thw) for f in frames]), want)


def test_a_clip_span_is_sampled_inside_the_span(video):
    """Span [0.5, 1.75) s of the 6-frame 4 fps clip: source frames 2..5 (1.0 s), int(4 / 4 * 2)
    = 2 frames at the middles of 2 spans: 2 + 1, 2 + 3 = 3, 5 (0.75 s, 1.25 s)."""
    planned, _ = SETTINGS.rules.plan_video(video, SETTINGS, (0.5, 1.75))
    items = SETTINGS.rules.decode(
        type("M", (), {"type": "video", "data": video, "clip": (0.5, 1.75)})(), SETTINGS)
    assert [(p.grid_thw, p.timestamp) for p in planned] == [((1, 32, 32), 0.75),
                                                           ((1, 32, 32), 1.25)]
    assert [(i.grid_thw, i.timestamp) for i in items] == [((1, 32, 32), 0.75),
                                                         ((1, 32, 32), 1.25)]
    source = _decoded(video)
    want = _normalised(np.stack([_resized(source[i], 448, 448) for i in (3, 5)]))
    assert torch.equal(torch.cat([unpatchify(i.pixel_values, i.grid_thw) for i in items]), want)


def test_rotated_jpeg_is_planned_and_decoded_upright():
    """EXIF orientation 6 (90 degrees): a 200x60 (w x h) JPEG is 60 wide and 200 tall upright,
    aspect 0.3: the 1x3 grid + thumbnail, as decoded."""
    img = PIL.Image.new("RGB", (200, 60), (10, 200, 30))
    exif = PIL.Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif)
    planned = SETTINGS.rules.plan_image(buf.getvalue(), SETTINGS)
    (decoded,) = SETTINGS.rules.decode(
        type("M", (), {"type": "image", "data": buf.getvalue(), "clip": None})(), SETTINGS)
    assert planned.original_hw == decoded.original_hw == (200, 60)
    assert planned.grid_thw == decoded.grid_thw == (4, 32, 32)
    assert planned.resized_hw == decoded.resized_hw == (3 * 448, 448)


def test_packed_positions_are_1d_per_document_without_mrope(video):
    record, members = _document(video)
    ids = SETTINGS.rules.media_ids(TOK)
    first = decode_document(*plan_document(record, members, SETTINGS, TOK, ids), SETTINGS)
    image_text = {"format": FORMAT, "media": [{"type": "image", "ext": "png"}],
                  "segments": [{"media": 0}, {"text": "red square"}]}
    second = decode_document(*plan_document(
        image_text, {"json": b"", "m0.png": _png(50, 50)}, SETTINGS, TOK, ids), SETTINGS)
    assert SETTINGS.rules.position_rule is None
    batch = pack_tokenized([first, second], 2304, TOK.pad_id, pad_to_multiple=8,
                           position_rule=SETTINGS.rules.position_rule)
    assert batch.mrope_position_ids is None
    n = len(_expected())
    start = -(-n // 8) * 8
    second_tokens = [S] + [C] * 256 + [E_] + E("red square") + [TOK.eos_id]
    assert batch.tokens[0, :n].tolist() == _expected()
    assert batch.tokens[0, start : start + len(second_tokens)].tolist() == second_tokens
    assert batch.position_ids[0, :n].tolist() == list(range(n))
    assert batch.position_ids[0, start : start + len(second_tokens)].tolist() == list(
        range(len(second_tokens)))
    v = batch.vision
    assert v.grid_thw.tolist() == [[3, 32, 32]] + [[1, 32, 32]] * 3 + [[1, 32, 32]]
    assert v.is_video.tolist() == [False, True, True, True, False]
    assert v.media_index.tolist() == [0, 1, 1, 1, 2]
    assert v.placeholder_starts.tolist()[-1] == start + 1
    assert v.pixel_values.shape[0] == int(v.cu_seqlens[-1]) == 7 * 1024


def test_chat_turns_use_chatml_and_end_assistant_turns_at_im_end():
    segments = [{"turn": "user"}, {"text": "Q1", "loss": False}, {"turn": "assistant"},
                {"text": "A1"}, {"turn": "user"}, {"text": "Q2", "loss": False},
                {"turn": "assistant"}, {"text": "A2"}]
    out = chat_segments(segments, SETTINGS.rules, TOK)
    assert [(s["text"], s.get("loss", True)) for s in out] == [
        ("<|im_start|>user\n", False), ("Q1", False), ("<|im_end|>\n<|im_start|>assistant\n",
                                                       False),
        ("A1", True), ("<|im_end|>", True), ("\n<|im_start|>user\n", False), ("Q2", False),
        ("<|im_end|>\n<|im_start|>assistant\n", False), ("A2", True), ("<|im_end|>", True),
        ("\n", False)]


def test_rules_pickle_map_the_config_and_refuse_bad_settings():
    rules = internvl_media_rules(MultimodalDataConfig())
    assert rules == InternVLMediaRules() and rules.max_tiles == 12  # 16,384 patches: 12 + 1
    assert internvl_media_rules(MultimodalDataConfig(image_max_patches=4096)).max_tiles == 3
    assert internvl_media_rules(MultimodalDataConfig(image_max_patches=2048)).max_tiles == 1
    with pytest.raises(ValueError, match="data.multimodal.image_max_patches=1000"):
        internvl_media_rules(MultimodalDataConfig(image_max_patches=1000))
    with pytest.raises(ValueError, match="tile_size=100"):
        InternVLMediaRules(tile_size=100)
    small = internvl_media_rules(MultimodalDataConfig(image_max_patches=4096))
    planned = small.plan_image(_png(40, 700), SETTINGS)  # aspect 17.5: 3x1 + thumbnail
    assert planned.grid_thw == (4, 32, 32)
    assert small.placeholder_count(planned) == 4 * 256
    settings = EncodeSettings.from_config(MultimodalDataConfig(), 512, 1, small)
    assert pickle.loads(pickle.dumps(settings)) == settings
    assert token_ids_config(rules.media_ids(TOK)) == {
        "image": C, "video": None, "media_begin": S, "media_content": None, "media_end": E_}
    assert rules.media_ids(TOK).placeholder_ids == {C}
    assert isinstance(rules, MediaRules) and isinstance(rules.media_ids(TOK), MediaTokens)
    with pytest.raises(MissingSpecialTokenError, match="IMG_CONTEXT"):
        rules.media_ids(SpecialTokensTokenizer(_Bytes()))  # Kimi's tokens only


def test_loader_packs_match_the_internvl_tokens_per_item(tmp_path_factory):
    """The energon loader on the bundled corpus with InternVL's rules: every item's
    256-per-tile <IMG_CONTEXT> placeholders sit between <img> and </img>, video frames after
    their "FrameN: " prefix, the patches fill the micro-batch's vision inputs, 1D positions."""
    sizes = {"image_caption": (12, 2), "video": (8, 2), "text": (20, 2)}
    corpus = bundled_mm_corpus(tmp_path_factory.mktemp("cache"), sizes, seed=3,
                               samples_per_shard=20)
    spm = get_or_train_tokenizer(bundled_corpus_dir(), tmp_path_factory.mktemp("spm"), 1024,
                                 1234)
    tok = SpecialTokensTokenizer(spm, INTERNVL_SPECIAL_TOKENS)
    s, e, c = (tok.special_tokens[t] for t in INTERNVL_SPECIAL_TOKENS)
    cfg = MultimodalDataConfig(
        root=str(corpus), num_workers=0, shuffle_buffer_size=8, packing_buffer_size=16,
        max_patches_per_micro_batch=8192, video_fps=1.0, video_max_frames=3,
        mixes={"all": StageMix(weights={n: 1 for n in sizes}, unit="samples")}, stage="all")
    with MultimodalLoader(cfg, tok, seq_length=2048, global_batch_size=2, dp_rank=0, dp_size=1,
                          seed=1, pad_to_multiple=4,
                          media_rules=internvl_media_rules(cfg)) as loader:
        batches = loader.next_global_batch() + loader.next_global_batch()
    frames = images = tiled = 0
    for batch in batches:
        tokens = batch.tokens[0]
        assert batch.mrope_position_ids is None
        v = batch.vision
        if v is None:
            continue
        counts = (v.grid_thw.prod(dim=1) // 4).tolist()
        assert bool((v.grid_thw[:, 1:] == 32).all()) and int((tokens == c).sum()) == sum(counts)
        for start, count, is_video, grid in zip(v.placeholder_starts.tolist(), counts,
                                                v.is_video.tolist(), v.grid_thw.tolist()):
            assert int(tokens[start - 1]) == s and int(tokens[start + count]) == e
            assert bool((tokens[start : start + count] == c).all())
            prefix = tok.decode(tokens[max(0, start - 8) : start - 1].tolist())
            # the tiny SentencePiece model has no "F"
            assert bool(re.search(r"rame[1-3]:\s*$", prefix)) == is_video, prefix
            assert grid[0] == 1 or not is_video
            frames += is_video
            images += not is_video
            tiled += grid[0] > 1  # tiles + thumbnail
        assert int(v.cu_seqlens[-1]) == v.pixel_values.shape[0] <= 8192
    assert frames > 0 and images > 0 and tiled > 0
