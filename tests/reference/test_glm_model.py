"""The whole GLM VLM (``get_family('glm').build_vlm``) == transformers 5.25's
``Glm4vMoeForConditionalGeneration`` (GLM-4.5V) and ``Glm4vForConditionalGeneration`` (GLM-4.1V),
tiny random fp32 models, logits within 1e-5.

Our side is what training runs: documents written by the family's template
(``families/glm/media.py``), packed by ``data/mm_packing.pack_tokenized`` with the family's
position rule, handed to the model by ``training/step.model_inputs`` (THD, ``[3, S]`` M-RoPE
ids, media items ``(2, h, w)`` in frames with raster patches); the model config comes from the
HF config through ``families/glm/hf_config.py`` and the weights through the family's HF table
(``families/glm/hf_table.py``: every tensor of ours from exactly one rule, every HF tensor used).

transformers' side is its released path per document: ``input_ids``, ``mm_token_type_ids``
(``Glm4vProcessor.create_mm_token_type_ids``), ``pixel_values`` / ``pixel_values_videos`` in
the processors' block-major layout (``patch_layout.hf_patch_rows``) with ``(1, h, w)`` image and
``(T, h, w)`` video grids, positions from its own ``get_rope_index``. transformers cannot hold
an image and a video in one GLM sequence (its placeholder mask uses the image token for both);
for that document the reference is built per modality: ``get_image_features`` and
``get_video_features`` scattered into their own placeholders, ``get_rope_index`` positions,
then the same model on ``inputs_embeds``.

One packed batch of four documents: text only; two images of different sizes (4x6 and 8x4
patches, the 4x4 position table up- and down-sampled); a video of 3 temporal patches with its
timestamps; an image and a 2-patch video. Measured max |ours - HF|: see the test docstrings.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("transformers")
from glm_reference import IDS, MEDIA_IDS, TOK, VOCAB, hf_glm, release_state  # noqa: E402

from megatron_vlm.data.image import ProcessedImage  # noqa: E402
from megatron_vlm.data.templates import Text  # noqa: E402
from megatron_vlm.data.video import VideoChunk  # noqa: E402
from megatron_vlm.families.glm.media import glm_tokenize  # noqa: E402

ATOL = 1e-5


def _pixels(h: int, w: int, seed: int, frames: int = 2) -> torch.Tensor:
    """Raster patches ``[frames*h*w, 3, 14, 14]``; an image's second frame repeats its first."""
    gen = torch.Generator().manual_seed(seed)
    if frames == 2 and seed % 2 == 0:  # images (even seeds): duplicated frame
        one = torch.randn(h * w, 3, 14, 14, generator=gen)
        return torch.cat([one, one])
    return torch.randn(frames * h * w, 3, 14, 14, generator=gen)


def image(h: int, w: int, seed: int) -> ProcessedImage:
    return ProcessedImage(_pixels(h, w, 2 * seed), (2, h, w), (h * 14, w * 14), (h * 14, w * 14))


def video(patches: int, h: int, w: int, seconds: list[float], seed: int) -> list[VideoChunk]:
    return [VideoChunk(_pixels(h, w, 2 * seed + 1 + 2 * i), (2, h, w), s, (s, s + 0.5),
                       chunk_index=i) for i, s in zip(range(patches), seconds)]


DOCUMENTS = {
    "text": [Text("a plain text document, no media at all")],
    "two_images": [Text("look: "), image(4, 6, 1), Text(" and "), image(8, 4, 2),
                   Text(" what differs?")],
    "video": [Text("clip "), video(3, 4, 4, [0.0, 1.0, 12.0], 3), Text(" what happens?")],
    "image_and_video": [image(6, 4, 4), Text("then"), video(2, 2, 8, [0.0, 3.0], 5),
                        Text(" same?")],
}


def build_ours(hf, megatron_groups):
    """Our VLM from the HF config (``hf_config.model_from_hf``) with HF's weights through the
    family's table."""
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from megatron_vlm.config import ParallelConfig
    from megatron_vlm.convert.importer import context_for, table_for
    from megatron_vlm.families import get_family
    from megatron_vlm.families.glm.hf_config import model_from_hf
    from megatron_vlm.families.glm.hf_table import HF_FAMILY

    cfg = hf.config.to_dict()
    cfg["architectures"] = [type(hf).__name__]
    model_cfg, interleave = model_from_hf(cfg)
    torch.manual_seed(0)
    model_parallel_cuda_manual_seed(0)
    vlm = get_family("glm").build_vlm(model_cfg, ParallelConfig(),
                                      pg_collection=megatron_groups).eval()
    ctx = context_for(model_cfg, interleave)
    table = table_for(HF_FAMILY, model_cfg, ctx)
    hf_state, used, state = release_state(hf), set(), {}
    for name, ours in vlm.state_dict().items():
        if name.endswith("._extra_state"):
            continue
        rule, binding = table.lookup(name)
        names = rule.hf_names(binding)
        used.update(names)
        state[name] = rule.transform.to_ours([hf_state[n] for n in names], ctx)
        assert state[name].shape == ours.shape, name
    assert used == set(hf_state), sorted(set(hf_state) ^ used)
    missing, unexpected = vlm.load_state_dict(state, strict=False)
    assert not unexpected and all(k.endswith("._extra_state") for k in missing), missing
    return vlm, model_cfg


@pytest.fixture(scope="module")
def glm45(megatron_groups):
    hf = hf_glm(moe=True)
    return (hf, *build_ours(hf, megatron_groups))


@pytest.fixture(scope="module")
def glm41(megatron_groups):
    hf = hf_glm(moe=False)
    return (hf, *build_ours(hf, megatron_groups))


# ------------------------------------------------------------------------------ both sides


def ours_logits(vlm, docs: list) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """Our logits ``[S, V]`` of ``docs`` packed into one micro-batch, and each document's
    (start, length)."""
    from megatron_vlm.data.mm_packing import pack_tokenized
    from megatron_vlm.families.glm.positions import glm_position_ids
    from megatron_vlm.training.step import model_inputs

    samples = [glm_tokenize(d, TOK, IDS, markers_loss=True) for d in docs]
    seq_length = sum(len(s) + 3 for s in samples) + 5
    batch = pack_tokenized(samples, seq_length, TOK.pad_id, pad_to_multiple=4,
                           position_rule=glm_position_ids)
    inputs = model_inputs(batch, torch.device("cpu"), vlm)
    inputs["labels"] = None
    with torch.no_grad():
        logits = vlm(**inputs)[0]
    starts = batch.cu_seqlens_padded[:-1].tolist()
    return logits, [(s, len(x)) for s, x in zip(starts, samples)]


def _hf_inputs(doc: list) -> dict:
    """What ``Glm4vProcessor`` hands the model for one document, from our items."""
    from transformers.models.glm4v.processing_glm4v import Glm4vProcessor

    from megatron_vlm.families.glm.patch_layout import hf_patch_rows

    ids = torch.from_numpy(glm_tokenize(doc, TOK, IDS, markers_loss=True).tokens)[None]
    fake = SimpleNamespace(image_token_id=IDS.image, video_start_id=IDS.begin_of_video,
                           video_end_id=IDS.end_of_video)
    types = torch.tensor(Glm4vProcessor.create_mm_token_type_ids(fake, [ids[0].tolist()]))
    images = [g for g in doc if isinstance(g, ProcessedImage)]
    videos = [g for g in doc if isinstance(g, list)]
    out = {"input_ids": ids, "mm_token_type_ids": types}
    if images:
        out["pixel_values"] = torch.cat([hf_patch_rows(i.pixel_values, i.grid_thw)
                                         for i in images])
        out["image_grid_thw"] = torch.tensor([(1, *i.grid_thw[1:]) for i in images])
    if videos:
        out["pixel_values_videos"] = torch.cat([hf_patch_rows(c.pixel_values, c.grid_thw)
                                                for v in videos for c in v])
        out["video_grid_thw"] = torch.tensor([(len(v), *v[0].grid_thw[1:]) for v in videos])
    return out


def hf_logits(hf, doc: list) -> torch.Tensor:
    """transformers' logits ``[L, V]`` of one image-only / video-only / text document."""
    with torch.no_grad():
        return hf(**_hf_inputs(doc)).logits[0]


def hf_logits_per_modality(hf, doc: list) -> torch.Tensor:
    """transformers' logits of a document with images AND videos: each modality's features
    from its own released path, scattered into its own placeholders."""
    inputs = _hf_inputs(doc)
    ids, types = inputs["input_ids"], inputs["mm_token_type_ids"]
    model = hf.model
    with torch.no_grad():
        embeds = model.get_input_embeddings()(ids)
        for kind, pixels, grid, features in (
                (1, "pixel_values", "image_grid_thw", model.get_image_features),
                (2, "pixel_values_videos", "video_grid_thw", model.get_video_features)):
            rows = torch.cat(features(inputs[pixels], inputs[grid]).pooler_output)
            mask = (types == kind)[..., None].expand_as(embeds)
            assert int((types == kind).sum()) == rows.shape[0]
            embeds = embeds.masked_scatter(mask, rows)
        positions, _ = model.get_rope_index(ids, types, image_grid_thw=inputs["image_grid_thw"],
                                            video_grid_thw=inputs["video_grid_thw"])
        return hf(inputs_embeds=embeds, position_ids=positions).logits[0]


def _check(hf, vlm, names: list[str]) -> float:
    got, spans = ours_logits(vlm, [DOCUMENTS[n] for n in names])
    worst = 0.0
    for name, (start, length) in zip(names, spans):
        doc = DOCUMENTS[name]
        mixed = any(isinstance(g, ProcessedImage) for g in doc) and any(
            isinstance(g, list) for g in doc)
        expected = hf_logits_per_modality(hf, doc) if mixed else hf_logits(hf, doc)
        assert expected.shape == (length, VOCAB) and expected.abs().max() > 1.0
        ours = got[start:start + length, :VOCAB]
        worst = max(worst, (ours - expected).abs().max().item())
        torch.testing.assert_close(ours, expected, atol=ATOL, rtol=0, msg=name)
    return worst


# ------------------------------------------------------------------------------ tests


@pytest.mark.parametrize("which", ["glm45", "glm41"])
def test_packed_documents_equal_transformers(request, which):
    """Four documents (text; two images of different sizes; a 3-temporal-patch video; an image
    and a video) in one packed micro-batch: each document's logits equal transformers' on that
    document alone (the mixed one against the per-modality reference). Measured max diff:
    GLM-4.5V 2.4e-6, GLM-4.1V 4.0e-6 (logits up to ~5)."""
    hf, vlm, _ = request.getfixturevalue(which)
    _check(hf, vlm, ["text", "two_images", "video", "image_and_video"])


def test_pixels_and_positions_matter(glm45):
    """Controls: the pixels reach the logits (another image changes its document's logits
    after the image, not the text document's), and the video's temporal patches are ordered
    (swapping two changes the logits)."""
    hf, vlm, _ = glm45
    base, spans = ours_logits(vlm, [DOCUMENTS["text"], DOCUMENTS["two_images"]])
    other = [g if not isinstance(g, ProcessedImage) else image(*g.grid_thw[1:], seed=9)
             for g in DOCUMENTS["two_images"]]
    changed, _ = ours_logits(vlm, [DOCUMENTS["text"], other])
    (s0, n0), (s1, n1) = spans
    assert torch.equal(changed[s0:s0 + n0], base[s0:s0 + n0])
    assert (changed[s1:s1 + n1] - base[s1:s1 + n1]).abs().max() > 1e3 * ATOL
    clip = DOCUMENTS["video"][1]
    swapped = [Text("clip "), [VideoChunk(c.pixel_values, c.grid_thw, o.timestamp,
                                          o.frame_timestamps, chunk_index=o.chunk_index)
                               for c, o in zip([clip[1], clip[0], clip[2]], clip)],
               Text(" what happens?")]
    a, _ = ours_logits(vlm, [DOCUMENTS["video"]])
    b, _ = ours_logits(vlm, [swapped])
    assert (a - b).abs().max() > 1e3 * ATOL


def test_config_maps_both_ways(glm45, glm41):
    """The HF config -> ours -> HF gives transformers' values back (every key we write) and the
    family-specific choices: GLM-4.5V NeoX M-RoPE, dense first layer, sigmoid router with bias;
    GLM-4.1V interleaved M-RoPE with sandwich norms and fused gate/up."""
    from megatron_vlm.families.glm.hf_config import model_to_hf

    for hf, _, model_cfg in (glm45, glm41):
        llm, moe = model_cfg.llm, type(hf).__name__.startswith("Glm4vMoe")
        assert (llm.mrope_style, llm.sandwich_norms) == (("neox", False) if moe
                                                          else ("interleaved", True))
        assert llm.rotary_fraction == 0.5 and llm.mrope_section == [2, 3, 3]
        assert (llm.num_experts, llm.num_dense_layers) == ((8, 1) if moe else (None, 2))
        assert model_cfg.token_ids.image == IDS.image
        assert model_cfg.token_ids.media_begin == IDS.begin_of_image
        back = model_to_hf(model_cfg, "fp32", model_cfg.token_ids)
        hf_cfg = hf.config.to_dict()
        assert back["architectures"] == [type(hf).__name__]
        for section in ("text_config", "vision_config"):
            for key, value in back[section].items():
                assert hf_cfg[section][key] == value, (section, key)
        for key in MEDIA_IDS:
            if key in back:
                assert back[key] == hf_cfg[key], key
