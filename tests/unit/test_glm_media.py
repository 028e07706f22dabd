"""GLM-4.1V / GLM-4.5V's data path through the family-neutral media rules (families/glm/media.py):
a document planned and decoded by the loader's encoder tokenises to the token sequence written by
hand from GLM's template (image: begin/end_of_image around h*w/4 <|image|>; video: begin/end_of_
video around one such block per temporal patch, each followed by str(int(ts))), one (2, h, w)
item per image and per temporal patch with the sizes transformers' processors give (checked in
tests/reference/test_glm_processing.py), packed M-RoPE ids per document by the rule, the chat
template's turns and end-of-turn targets, the rules' config mapping and pickling.
"""

from __future__ import annotations

import io
import json
import pickle

import numpy as np
import PIL.Image
import pytest
import torch

from megatron_vlm.config.data_mm import MultimodalDataConfig, SlowFastConfig, StageMix
from megatron_vlm.data.chat_turns import chat_segments
from megatron_vlm.data.corpus import bundled_corpus_dir
from megatron_vlm.data.image import unpatchify
from megatron_vlm.data.kimi_tokenizer import SpecialTokensTokenizer
from megatron_vlm.data.media_rules import MediaRules, MediaTokens, token_ids_config
from megatron_vlm.data.mm_corpus import bundled_mm_corpus
from megatron_vlm.data.mm_encode import EncodeSettings, decode_document, plan_document
from megatron_vlm.data.mm_loader import MultimodalLoader
from megatron_vlm.data.mm_packing import pack_tokenized
from megatron_vlm.data.mrope_positions import VisionBlock
from megatron_vlm.data.shards import FORMAT
from megatron_vlm.data.tokenizer import MissingSpecialTokenError, get_or_train_tokenizer
from megatron_vlm.families.glm import processing as glm
from megatron_vlm.families.glm.media import GLM_SPECIAL_TOKENS, GlmMediaRules, glm_media_rules
from megatron_vlm.families.glm.patch_layout import tower_inputs
from megatron_vlm.families.glm.positions import glm_position_ids
from tests.fixtures.formats import image_bytes

av = pytest.importorskip("av")
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


class _Bytes:
    """A tiny byte-level tokenizer (ids 0..255 are the UTF-8 bytes)."""

    vocab_size, eos_id, pad_id = 258, 256, 257

    def encode(self, text: str) -> list[int]:
        return list(text.encode())


TOK = SpecialTokensTokenizer(_Bytes(), GLM_SPECIAL_TOKENS)
BOI, EOI, BOV, EOV, IMG, VID = (TOK.special_tokens[t] for t in GLM_SPECIAL_TOKENS)


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


def _frames() -> list[np.ndarray]:
    out = []
    for i in range(6):
        f = np.full((48, 64, 3), 40 * i, np.uint8)
        f[8:24, 4 + 8 * i : 20 + 8 * i] = (220, 30, 30)
        out.append(f)
    return out


def _document(video: bytes) -> tuple[dict, dict]:
    record = {"format": FORMAT,
              "media": [{"type": "image", "ext": "png"}, {"type": "video", "ext": "mp4"}],
              "segments": [{"text": "A cat"}, {"media": 0}, {"text": "then"}, {"media": 1}]}
    members = {"json": json.dumps(record).encode(), "m0.png": image_bytes(0, "png"),
               "m1.mp4": video}
    return record, members


SETTINGS = EncodeSettings(seq_length=4096, max_patches=8192, rules=GlmMediaRules())


def _expected() -> tuple[list[int], list[VisionBlock]]:
    """The document by hand.

    The 64x48 PNG counts as 2 frames: 2*56*56 px after rounding is below 112*112, so both
    sides scale by sqrt(12544 / 6144) and are ceiled to 28: 84 x 112 px, grid (2, 6, 8), 12
    <|image|> (3 x 4). The 6-frame 4 fps clip (1.5 s) samples floor(1.5 * 2) = 3 frames at
    ceil(i * 4 / 2) = 0, 2, 4, padded to 4 with frame 4 again; 4*56*56 px is exactly the
    112*112 floor: 56 x 56 px, grid (2, 4, 4), 4 <|image|> (2 x 2) per temporal patch, whose
    first frames are at 0.0 s and 1.0 s: "0", "1".
    """
    tokens: list[int] = []
    blocks: list[VisionBlock] = []

    def block(rows: int, cols: int) -> None:
        tokens.append(BOI)
        blocks.append(VisionBlock(start=len(tokens), rows=rows, cols=cols))
        tokens.extend([IMG] * rows * cols)
        tokens.append(EOI)

    tokens += E("A cat")
    block(3, 4)
    tokens += E("then") + [BOV]
    for stamp in ("0", "1"):
        block(2, 2)
        tokens += E(stamp)
    tokens += [EOV, TOK.eos_id]
    return tokens, blocks


@pytest.fixture(scope="module")
def video() -> bytes:
    return _clip(_frames())


def _source_frames(data: bytes, indices: list[int]) -> np.ndarray:
    with av.open(io.BytesIO(data)) as container:
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    return np.stack([frames[i] for i in indices])


def test_document_is_glm_template_with_one_item_per_image_and_temporal_patch(video):
    record, members = _document(video)
    doc, media = plan_document(record, members, SETTINGS, TOK, SETTINGS.rules.media_ids(TOK))
    tokens, _ = _expected()
    assert doc.tokens.tolist() == tokens
    assert doc.target_mask.tolist() == [t != IMG for t in tokens]  # placeholders never
    decoded = decode_document(doc, media, SETTINGS)
    image, *patches = decoded.items
    assert [i.grid_thw for i in decoded.items] == [(2, 6, 8), (2, 4, 4), (2, 4, 4)]
    assert [p.timestamp for p in patches] == [0.0, 1.0]
    assert [p.frame_timestamps for p in patches] == [(0.0, 0.5), (1.0, 1.0)]
    # image: the frame twice, raster patches, processing's resize and normalisation
    ref = glm.resize_image(PIL.Image.open(io.BytesIO(members["m0.png"])))
    frames = unpatchify(image.pixel_values, image.grid_thw)
    assert torch.equal(frames[0], frames[1])
    assert torch.equal(image.pixel_values, ref.patches())
    # video: source frames 0, 2, 4, 4 resized to 56 x 56 with the video normalisation
    source = _source_frames(video, [0, 2, 4, 4])
    expected = glm.resize_video_frames(source, (56, 56))
    assert torch.equal(torch.cat([p.pixel_values for p in patches]), expected)
    assert not torch.equal(expected[:16], expected[16:32])  # frames 0 and 2 differ


def test_a_container_without_frame_counts_gives_the_same_document():
    # Matroska carries no frame count: the video is decoded whole and sampled by the same rule.
    record, members = _document(_clip(_frames(), fmt="matroska"))
    doc, media = plan_document(record, members, SETTINGS, TOK, SETTINGS.rules.media_ids(TOK))
    assert doc.tokens.tolist() == _expected()[0]
    decoded = decode_document(doc, media, SETTINGS)
    source = _source_frames(members["m1.mp4"], [4, 4])
    assert torch.equal(decoded.items[2].pixel_values, glm.resize_video_frames(source, (56, 56)))


def test_a_clip_span_is_sampled_inside_the_span(video):
    """Span [0.5, 1.75) s of the 6-frame 4 fps clip: source frames 2..5, 1.0 s: floor(2.0) = 2
    frames at 2 + ceil(i * 4 / 2) = 2, 4 (indices of the source), one temporal patch at 0.5 s;
    2 frames of 64x48 are below the 112*112 floor like the image: 84 x 112 px."""
    planned, _ = SETTINGS.rules.plan_video(video, SETTINGS, (0.5, 1.75))
    (item,) = SETTINGS.rules.decode(
        type("M", (), {"type": "video", "data": video, "clip": (0.5, 1.75)})(), SETTINGS)
    assert [(p.grid_thw, p.frame_timestamps) for p in planned] == [((2, 6, 8), (0.5, 1.0))]
    assert item.frame_timestamps == (0.5, 1.0)
    source = _source_frames(video, [2, 4])
    assert torch.equal(item.pixel_values, glm.resize_video_frames(source, (84, 112)))


def test_packed_mrope_ids_are_glm_position_ids_of_each_document(video):
    record, members = _document(video)
    ids = SETTINGS.rules.media_ids(TOK)
    first = decode_document(*plan_document(record, members, SETTINGS, TOK, ids), SETTINGS)
    image_text = {"format": FORMAT, "media": [{"type": "image", "ext": "png"}],
                  "segments": [{"media": 0}, {"text": "red square"}]}
    second = decode_document(*plan_document(
        image_text, {"json": b"", "m0.png": image_bytes(0, "png")}, SETTINGS, TOK, ids),
        SETTINGS)
    batch = pack_tokenized([first, second], 256, TOK.pad_id, pad_to_multiple=8,
                           position_rule=SETTINGS.rules.position_rule)
    tokens, blocks = _expected()
    n = len(tokens)
    pos = batch.mrope_position_ids
    assert torch.equal(pos[:, :n], torch.from_numpy(glm_position_ids(np.array(tokens), blocks)))
    # by hand: "A cat" 0..4, <|begin_of_image|> 5, the 3x4 block t=6, h=6..8, w=6..9, then 10
    assert pos[:, 6].tolist() == [6, 6, 6] and pos[:, 17].tolist() == [6, 8, 9]
    assert pos[:, 18].tolist() == [10, 10, 10]
    start = -(-n // 8) * 8
    second_tokens = [BOI] + [IMG] * 12 + [EOI] + E("red square") + [TOK.eos_id]
    assert batch.tokens[0, start : start + len(second_tokens)].tolist() == second_tokens
    expected = glm_position_ids(np.array(second_tokens), [VisionBlock(1, 3, 4)])
    assert torch.equal(pos[:, start : start + len(second_tokens)], torch.from_numpy(expected))
    assert batch.vision.grid_thw.tolist() == [[2, 6, 8], [2, 4, 4], [2, 4, 4], [2, 6, 8]]
    assert batch.vision.is_video.tolist() == [False, True, True, False]
    assert batch.vision.media_index.tolist() == [0, 1, 1, 2]


def test_rotated_jpeg_is_planned_and_decoded_upright():
    """EXIF orientation 6 (90 degrees): the planned grid is the upright image's, as decoded."""
    img = PIL.Image.new("RGB", (200, 60), (10, 200, 30))
    exif = PIL.Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    img.save(buf, format="JPEG", exif=exif)
    planned = SETTINGS.rules.plan_image(buf.getvalue(), SETTINGS)
    assert planned.original_hw == (200, 60)
    (decoded,) = SETTINGS.rules.decode(
        type("M", (), {"type": "image", "data": buf.getvalue(), "clip": None})(), SETTINGS)
    assert decoded.grid_thw == planned.grid_thw == (2, *glm.patch_grid(glm.image_size(200, 60)))


def test_chat_turns_use_glm_template_and_end_assistant_turns_at_user():
    segments = [{"turn": "user"}, {"text": "Q1", "loss": False}, {"turn": "assistant"},
                {"text": "A1"}, {"turn": "user"}, {"text": "Q2", "loss": False},
                {"turn": "assistant"}, {"text": "A2"}]
    out = chat_segments(segments, SETTINGS.rules, TOK)
    assert [(s["text"], s.get("loss", True)) for s in out] == [
        ("[gMASK]<sop><|user|>\n", False), ("Q1", False), ("<|assistant|>\n", False),
        ("A1", True), ("<|user|>", True), ("\n", False), ("Q2", False),
        ("<|assistant|>\n", False), ("A2", True)]


def test_rules_pickle_map_the_config_and_refuse_a_tokenizer_without_glm_tokens():
    cfg = MultimodalDataConfig(image_max_patches=30000)
    rules = glm_media_rules(cfg)
    assert rules == GlmMediaRules()  # GLM's released image ceiling is 30,000 patches
    small = glm_media_rules(MultimodalDataConfig(
        image_max_patches=256, image_min_patches=16,
        slowfast=SlowFastConfig(max_video_tokens=1000)))
    assert (small.image_min_pixels, small.image_max_pixels) == (16 * 392, 256 * 392)
    assert small.video_max_pixels == 1000 * 2 * 28 * 28
    assert rules.video_max_pixels == 28 * 28 * 2 * 30000
    settings = EncodeSettings.from_config(cfg, 512, 1, small)
    assert pickle.loads(pickle.dumps(settings)) == settings
    assert token_ids_config(rules.media_ids(TOK)) == {
        "image": IMG, "video": VID, "media_begin": BOI, "media_content": None,
        "media_end": EOI}
    assert rules.media_ids(TOK).placeholder_ids == {IMG}
    assert isinstance(rules, MediaRules) and isinstance(rules.media_ids(TOK), MediaTokens)
    with pytest.raises(MissingSpecialTokenError, match="begin_of_image"):
        rules.media_ids(SpecialTokensTokenizer(_Bytes()))  # Kimi's tokens only


def test_loader_packs_match_the_glm_tokens_per_item(tmp_path_factory):
    """The energon loader on the bundled corpus with GLM's rules: every item's h*w/4
    <|image|> placeholders sit between <|begin_of_image|> and <|end_of_image|>, a video's inside
    its wrappers, the patches fill the micro-batch's vision inputs, M-RoPE ids per pack."""
    sizes = {"image_caption": (12, 2), "video": (8, 2), "text": (20, 2)}
    corpus = bundled_mm_corpus(tmp_path_factory.mktemp("cache"), sizes, seed=3,
                               samples_per_shard=20)
    spm = get_or_train_tokenizer(bundled_corpus_dir(), tmp_path_factory.mktemp("spm"), 1024,
                                 1234)
    tok = SpecialTokensTokenizer(spm, GLM_SPECIAL_TOKENS)
    boi, eoi, bov, eov, img, _ = (tok.special_tokens[t] for t in GLM_SPECIAL_TOKENS)
    cfg = MultimodalDataConfig(
        root=str(corpus), num_workers=0, shuffle_buffer_size=8, packing_buffer_size=16,
        max_patches_per_micro_batch=4096, image_max_patches=256, video_fps=1.0,
        mixes={"all": StageMix(weights={n: 1 for n in sizes}, unit="samples")}, stage="all")
    with MultimodalLoader(cfg, tok, seq_length=512, global_batch_size=2, dp_rank=0, dp_size=1,
                          seed=1, pad_to_multiple=4, media_rules=glm_media_rules(cfg)) as loader:
        batches = loader.next_global_batch() + loader.next_global_batch()
    patches = images = 0
    for batch in batches:
        tokens = batch.tokens[0]
        assert batch.mrope_position_ids.shape == (3, 512)
        v = batch.vision
        if v is None:
            continue
        _, grid = tower_inputs(v.pixel_values, v.grid_thw)
        counts = (grid.prod(dim=1) // 4).tolist()
        assert bool((v.grid_thw[:, 0] == 2).all()) and int((tokens == img).sum()) == sum(counts)
        for start, count, is_video in zip(v.placeholder_starts.tolist(), counts,
                                          v.is_video.tolist()):
            assert int(tokens[start - 1]) == boi and int(tokens[start + count]) == eoi
            assert bool((tokens[start : start + count] == img).all())
            inside = int((tokens[:start] == bov).sum()) - int((tokens[:start] == eov).sum())
            assert inside == int(is_video)
            patches += is_video
            images += not is_video
        assert int(v.cu_seqlens[-1]) == v.pixel_values.shape[0] <= 4096
    assert patches > 0 and images > 0
