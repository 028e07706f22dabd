"""GLM-4.1V / GLM-4.5V M-RoPE position ids (families/glm/positions.py) == transformers 5.25's
``Glm4vMoeModel.get_rope_index`` of a tiny model, on documents written by our GLM template
(families/glm/media.py): text only, two images of different sizes, a video of several temporal
patches with its timestamps, an image and a video together, and a packed multi-document batch
(each document's span against transformers run on that document alone).

transformers gets what its processor would hand it: the token ids, ``mm_token_type_ids`` from
``Glm4vProcessor.create_mm_token_type_ids`` (image tokens inside the video wrappers are video)
and the grids in its convention (an image ``(1, h, w)``, a video ``(T, h, w)`` in temporal
patches); our rule sees only the document's vision blocks (``data.mrope_positions``).
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from megatron_vlm.data.image import ProcessedImage
from megatron_vlm.data.kimi_tokenizer import SpecialTokensTokenizer
from megatron_vlm.data.mrope_positions import (
    VisionBlock,
    document_mrope_ids,
    pack_mrope_position_ids,
)
from megatron_vlm.data.templates import Text
from megatron_vlm.data.video import VideoChunk
from megatron_vlm.families.glm.media import GLM_SPECIAL_TOKENS, glm_token_ids, glm_tokenize
from megatron_vlm.families.glm.positions import glm_position_ids

transformers = pytest.importorskip("transformers")
from transformers import Glm4vMoeConfig, Glm4vMoeModel  # noqa: E402
from transformers.models.glm4v.processing_glm4v import Glm4vProcessor  # noqa: E402


class _Bytes:
    """A tiny byte-level tokenizer (ids 0..255 are the UTF-8 bytes)."""

    vocab_size, eos_id, pad_id = 258, 256, 257

    def encode(self, text: str) -> list[int]:
        return list(text.encode())


TOK = SpecialTokensTokenizer(_Bytes(), GLM_SPECIAL_TOKENS)
IDS = glm_token_ids(TOK)
_NO_PIXELS = torch.empty(0, 3, 14, 14)


@pytest.fixture(scope="module")
def hf_model():
    """A tiny Glm4vMoeModel (get_rope_index reads the vision config's spatial merge, 2)."""
    config = Glm4vMoeConfig(
        text_config=dict(vocab_size=TOK.vocab_size, hidden_size=16, intermediate_size=32,
                         num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                         moe_intermediate_size=8, n_routed_experts=2, num_experts_per_tok=1,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                          "mrope_section": [1, 1, 2],
                                          "partial_rotary_factor": 0.5}),
        vision_config=dict(depth=1, hidden_size=16, num_heads=2, intermediate_size=16,
                           out_hidden_size=16),
        image_token_id=IDS.image, video_token_id=IDS.video,
        image_start_token_id=IDS.begin_of_image, image_end_token_id=IDS.end_of_image,
        video_start_token_id=IDS.begin_of_video, video_end_token_id=IDS.end_of_video)
    return Glm4vMoeModel(config).eval()


def image(h: int, w: int) -> ProcessedImage:
    """An image item of ``h x w`` ViT patches (one temporal patch: 2 frames)."""
    return ProcessedImage(_NO_PIXELS, (2, h, w), (h * 14, w * 14), (h * 14, w * 14))


def video(num_patches: int, h: int, w: int, seconds: list[float]) -> list[VideoChunk]:
    """A video's temporal-patch items (2 frames each) starting at ``seconds``."""
    return [VideoChunk(_NO_PIXELS, (2, h, w), s, (s, s + 0.5), chunk_index=i)
            for i, s in zip(range(num_patches), seconds)]


def hf_positions(model, groups: list) -> np.ndarray:
    """transformers' ``[3, L]`` ids of the document our template writes for ``groups``."""
    doc = glm_tokenize(groups, TOK, IDS, markers_loss=True)
    fake_processor = SimpleNamespace(image_token_id=IDS.image, video_start_id=IDS.begin_of_video,
                                     video_end_id=IDS.end_of_video)
    types = Glm4vProcessor.create_mm_token_type_ids(fake_processor, [doc.tokens.tolist()])
    images = [g.grid_thw for g in groups if isinstance(g, ProcessedImage)]
    videos = [(len(g), *g[0].grid_thw[1:]) for g in groups if isinstance(g, list)]
    with torch.no_grad():
        ids, _ = model.get_rope_index(
            torch.from_numpy(doc.tokens)[None], torch.tensor(types),
            image_grid_thw=torch.tensor([(1, h, w) for _, h, w in images]) if images else None,
            video_grid_thw=torch.tensor(videos) if videos else None)
    return ids[:, 0].numpy()


CASES = {
    "text": [Text("plain text only, no media")],
    "two_images": [Text("look: "), image(4, 6), Text(" and "), image(10, 2), Text(" end")],
    "video": [Text("clip "), video(3, 4, 4, [0.0, 1.0, 12.0]), Text(" what happens?")],
    "image_and_video": [image(6, 4), Text("then"), video(2, 2, 8, [0.0, 3.0]), Text(".")],
    "starts_with_video": [video(4, 8, 2, [0.0, 1.0, 2.0, 3.0])],
}


@pytest.mark.parametrize("name", CASES)
def test_document_ids_equal_get_rope_index(hf_model, name):
    groups = CASES[name]
    doc = glm_tokenize(groups, TOK, IDS, markers_loss=True)
    ours = document_mrope_ids(doc, glm_position_ids)
    np.testing.assert_array_equal(ours, hf_positions(hf_model, groups))


def test_packed_documents_equal_get_rope_index_per_document(hf_model):
    """Three documents packed with padding: each real span equals transformers on that
    document alone; a document's padding continues as text, the tail counts from 0."""
    names = ["two_images", "video", "image_and_video"]
    docs = [glm_tokenize(CASES[n], TOK, IDS, markers_loss=True) for n in names]
    spans = [len(d) + pad for d, pad in zip(docs, (3, 0, 5))]
    cu = np.concatenate([[0], np.cumsum(spans)])
    seq_length = int(cu[-1]) + 7
    packed = pack_mrope_position_ids(docs, cu.tolist(), seq_length, glm_position_ids).numpy()
    for name, doc, start, end in zip(names, docs, cu[:-1], cu[1:]):
        ref = hf_positions(hf_model, CASES[name])
        np.testing.assert_array_equal(packed[:, start : start + len(doc)], ref)
        pad = np.arange(ref.max() + 1, ref.max() + 1 + end - start - len(doc))
        np.testing.assert_array_equal(packed[:, start + len(doc) : end], np.stack([pad] * 3))
    np.testing.assert_array_equal(packed[:, cu[-1]:], np.stack([np.arange(7)] * 3))


def test_image_between_text_by_hand():
    """The rule written out: text, a 2x3 block starting at s = 2, text resumes at 2 + 3."""
    out = glm_position_ids(np.zeros(10, dtype=np.int64), [VisionBlock(start=2, rows=2, cols=3)])
    np.testing.assert_array_equal(out, [
        [0, 1, 2, 2, 2, 2, 2, 2, 5, 6],
        [0, 1, 2, 2, 2, 3, 3, 3, 5, 6],
        [0, 1, 2, 3, 4, 2, 3, 4, 5, 6],
    ])


def test_overlapping_blocks_are_refused():
    blocks = [VisionBlock(start=1, rows=2, cols=2), VisionBlock(start=3, rows=1, cols=1)]
    with pytest.raises(ValueError, match="before the end"):
        glm_position_ids(np.zeros(8, dtype=np.int64), blocks)
