"""The whole InternVL3.5 VLM (``get_family('internvl').build_vlm``) == transformers 5.25's
``InternVLForConditionalGeneration`` with each of its three text models (Qwen3 dense, Qwen3-MoE,
GPT-OSS; and Qwen3 with the 6B-style tower), tiny random fp32 models (``internvl_reference.py``),
logits within 1e-5.

Our side is what training runs: documents written by the family's template
(``families/internvl/media.py``: ``<img>`` + 16 ``<IMG_CONTEXT>`` per 112-px tile + ``</img>``,
video frames ``Frame{i}: <img>...</img>``), packed by ``data/mm_packing.pack_tokenized`` (1D
positions per document), handed to the model by ``training/step.model_inputs`` (THD, media items
``(tiles, 8, 8)`` with raster patches, one item per video frame). The model config comes from
the HF config through ``families/internvl/hf_config.py`` and the weights from transformers'
in-memory state through the family's alias passes (fused experts) and HF table: every tensor of
ours from exactly one rule, every HF tensor used.

transformers' side is its released path per document: ``input_ids`` and ``pixel_values [tiles,
3, 112, 112]`` (``processing.hf_pixel_values``: every tile of the document's images and video
frames in order; InternVL puts video frames through the image path with the same placeholder).

One packed batch of five documents: text only; a 3-tile image and a 1-tile image; a 3-frame
video; an image then a video; a 170x300 photo tiled by ``processing.tile_image`` at 112 px (tiles
+ thumbnail; transformers' side gets ``GotOcr2ImageProcessorPil``'s pixel values of the photo).
Measured max |ours - HF|: see :data:`MEASURED`.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")
from internvl_reference import IDS, SIDE, TILE, TOK, VOCAB, hf_internvl, hf_state  # noqa: E402

from megatron_vlm.data.image import ProcessedImage  # noqa: E402
from megatron_vlm.data.templates import Text  # noqa: E402
from megatron_vlm.data.video import VideoChunk  # noqa: E402
from megatron_vlm.families.internvl.media import internvl_tokenize  # noqa: E402

ATOL = 1e-5
MEASURED = {"qwen3": 6.3e-6, "qwen3_moe": 7.0e-6, "gpt_oss": 3.3e-6, "qwen3_vit6b": 5.8e-6}
"""Max |ours - HF| over the four documents (logits up to ~6), Intel Xeon CPU."""
PER_TILE = SIDE * SIDE


def _pixels(tiles: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(tiles * PER_TILE, 3, 14, 14, generator=gen) * 2 - 1


def image(tiles: int, seed: int) -> ProcessedImage:
    return ProcessedImage(_pixels(tiles, seed), (tiles, SIDE, SIDE), (TILE, TILE * 2),
                          (TILE, TILE * 2))


def video(frames: int, seed: int) -> list[VideoChunk]:
    return [VideoChunk(_pixels(1, 100 * seed + i), (1, SIDE, SIDE), float(i), (float(i),),
                       chunk_index=i) for i in range(frames)]


def _photo():
    """A 170x300 RGB image tiled by our processing (``tile_image`` at 112 px: tiles by the
    closest aspect ratio + thumbnail), and transformers' ``GotOcr2ImageProcessorPil`` pixel
    values of the same image (size 112, crop_to_patches, InternVL's mean/std)."""
    import numpy as np
    import PIL.Image
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import (
        GotOcr2ImageProcessorPil,
    )

    from megatron_vlm.families.internvl.processing import IMAGENET_MEAN, IMAGENET_STD, tile_image

    rng = np.random.default_rng(7)
    pixels = rng.integers(0, 256, (17, 30, 3), dtype=np.uint8).repeat(10, 0).repeat(10, 1)
    photo = PIL.Image.fromarray(pixels)
    tiled = tile_image(photo, tile_size=TILE)
    item = ProcessedImage(tiled.patches(), tiled.grid_thw, (170, 300), (170, 300))
    processor = GotOcr2ImageProcessorPil(size={"height": TILE, "width": TILE},
                                         crop_to_patches=True, min_patches=1, max_patches=12,
                                         image_mean=list(IMAGENET_MEAN),
                                         image_std=list(IMAGENET_STD))
    return item, processor(images=[photo], return_tensors="pt")["pixel_values"]


PHOTO, PHOTO_HF_PIXELS = _photo()
DOCUMENTS = {
    "text": [Text("a plain text document, no media at all")],
    "images": [Text("look: "), image(3, 1), Text(" and "), image(1, 2), Text(" what?")],
    "video": [Text("clip "), video(3, 3), Text(" what happens?")],
    "image_and_video": [image(2, 4), Text("then"), video(2, 5), Text(" same?")],
    "photo": [Text("photo: "), PHOTO, Text(" describe it")],
}


def _state_through_aliases(hf) -> dict:
    """transformers' tensors as the importer reads them: the family's alias passes over them."""
    from megatron_vlm.convert.hf_io import AliasedSource, DictSource
    from megatron_vlm.convert.rules import ConvertContext
    from megatron_vlm.families.internvl.hf_table import HF_FAMILY

    source = DictSource(hf_state(hf))
    for aliases in HF_FAMILY.alias_passes:
        source = AliasedSource(source, aliases, ConvertContext())
    return {k: source.read(k) for k in source.keys()}


def build_ours(hf, megatron_groups):
    """Our VLM from the HF config with HF's weights through the family's table."""
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from megatron_vlm.config import ParallelConfig
    from megatron_vlm.convert.importer import context_for, table_for
    from megatron_vlm.families import get_family
    from megatron_vlm.families.internvl.hf_config import model_from_hf
    from megatron_vlm.families.internvl.hf_table import HF_FAMILY

    cfg = hf.config.to_dict()
    cfg["architectures"] = [type(hf).__name__]
    model_cfg, interleave = model_from_hf(cfg)
    torch.manual_seed(0)
    model_parallel_cuda_manual_seed(0)
    vlm = get_family("internvl").build_vlm(model_cfg, ParallelConfig(),
                                           pg_collection=megatron_groups).eval()
    ctx = context_for(model_cfg, interleave)
    table = table_for(HF_FAMILY, model_cfg, ctx)
    hf_tensors, used, state = _state_through_aliases(hf), set(), {}
    for name, ours in vlm.state_dict().items():
        if name.endswith("._extra_state"):
            continue
        rule, binding = table.lookup(name)
        names = rule.hf_names(binding)
        used.update(names)
        state[name] = rule.transform.to_ours([hf_tensors[n] for n in names], ctx)
        assert state[name].shape == ours.shape, name
    assert used == set(hf_tensors), sorted(set(hf_tensors) ^ used)
    missing, unexpected = vlm.load_state_dict(state, strict=False)
    assert not unexpected and all(k.endswith("._extra_state") for k in missing), missing
    return vlm, model_cfg


@pytest.fixture(scope="module", params=["qwen3", "qwen3_moe", "gpt_oss", "qwen3_vit6b"])
def pair(request, megatron_groups):
    """(text model kind, HF model, our VLM, our config); ``qwen3_vit6b``: Qwen3 with the
    6B-style tower."""
    kind = request.param.removesuffix("_vit6b")
    hf = hf_internvl(kind, vit6b=request.param.endswith("_vit6b"))
    return (kind, hf, *build_ours(hf, megatron_groups))


# ------------------------------------------------------------------------------ both sides


def ours_logits(vlm, docs: list) -> tuple[torch.Tensor, list[tuple[int, int]]]:
    """Our logits ``[S, V]`` of ``docs`` packed into one micro-batch, and each document's
    (start, length)."""
    from megatron_vlm.data.mm_packing import pack_tokenized
    from megatron_vlm.training.step import model_inputs

    samples = [internvl_tokenize(d, TOK, IDS, markers_loss=True) for d in docs]
    seq_length = sum(len(s) + 3 for s in samples) + 5
    batch = pack_tokenized(samples, seq_length, TOK.pad_id, pad_to_multiple=4)
    inputs = model_inputs(batch, torch.device("cpu"), vlm)
    inputs["labels"] = None
    with torch.no_grad():
        logits = vlm(**inputs)[0]
    starts = batch.cu_seqlens_padded[:-1].tolist()
    return logits, [(s, len(x)) for s, x in zip(starts, samples)]


def hf_logits(hf, doc: list) -> torch.Tensor:
    """transformers' logits ``[L, V]`` of one document (its tiles and frames as pixel_values;
    the photo's from transformers' own image processor)."""
    from megatron_vlm.families.internvl.processing import hf_pixel_values

    if doc is DOCUMENTS["photo"]:
        ids = torch.from_numpy(internvl_tokenize(doc, TOK, IDS, markers_loss=True).tokens)[None]
        with torch.no_grad():
            return hf(input_ids=ids.long(), pixel_values=PHOTO_HF_PIXELS).logits[0]
    ids = torch.from_numpy(internvl_tokenize(doc, TOK, IDS, markers_loss=True).tokens)[None]
    items = [i for g in doc if not isinstance(g, Text)
             for i in (g if isinstance(g, list) else [g])]  # document order
    kwargs = {}
    if items:
        kwargs["pixel_values"] = hf_pixel_values(torch.cat([i.pixel_values for i in items]),
                                                 tile_size=TILE)
    with torch.no_grad():
        return hf(input_ids=ids.long(), **kwargs).logits[0]


def _check(hf, vlm, names: list[str]) -> float:
    got, spans = ours_logits(vlm, [DOCUMENTS[n] for n in names])
    worst = 0.0
    for name, (start, length) in zip(names, spans):
        expected = hf_logits(hf, DOCUMENTS[name])
        assert expected.shape == (length, VOCAB) and expected.abs().max() > 1.0
        ours = got[start:start + length, :VOCAB]
        worst = max(worst, (ours - expected).abs().max().item())
        torch.testing.assert_close(ours, expected, atol=ATOL, rtol=0, msg=name)
    return worst


# ------------------------------------------------------------------------------ tests


def test_packed_documents_equal_transformers(pair):
    """Five documents (text; a 3-tile and a 1-tile image; a 3-frame video; an image and a
    video; a photo tiled by our processing with its thumbnail, transformers given its own
    processor's pixels) in one packed micro-batch: each document's logits equal transformers'
    on that document alone, for each text model."""
    kind, hf, vlm, _ = pair
    assert PHOTO.grid_thw[0] == PHOTO_HF_PIXELS.shape[0] == 9  # 4x2 tiles + thumbnail
    worst = _check(hf, vlm, ["text", "images", "video", "image_and_video", "photo"])
    print(f"{kind}: max |ours - HF| = {worst:.1e}")


def test_pixels_and_frame_order_matter(pair):
    """Controls: another image changes its own document's logits after the image, not the text
    document's packed beside it (beyond rounding: GPT-OSS moves it by 1.7e-6); swapping two
    video frames changes the logits (each frame's placeholders take that frame's features)."""
    _, _, vlm, _ = pair
    base, spans = ours_logits(vlm, [DOCUMENTS["text"], DOCUMENTS["images"]])
    other = [image(g.grid_thw[0], seed=9) if isinstance(g, ProcessedImage) else g
             for g in DOCUMENTS["images"]]
    changed, _ = ours_logits(vlm, [DOCUMENTS["text"], other])
    (s0, n0), (s1, n1) = spans
    # Within rounding (MoE experts see another token mix), not bit for bit.
    torch.testing.assert_close(changed[s0:s0 + n0], base[s0:s0 + n0], atol=ATOL, rtol=0)
    assert (changed[s1:s1 + n1] - base[s1:s1 + n1]).abs().max() > 1e3 * ATOL
    clip = DOCUMENTS["video"][1]
    swapped = [Text("clip "), [VideoChunk(c.pixel_values, c.grid_thw, o.timestamp,
                                          o.frame_timestamps, chunk_index=o.chunk_index)
                               for c, o in zip([clip[1], clip[0], clip[2]], clip)],
               Text(" what happens?")]
    a, _ = ours_logits(vlm, [DOCUMENTS["video"]])
    b, _ = ours_logits(vlm, [swapped])
    assert (a - b).abs().max() > 1e3 * ATOL


def test_config_maps_both_ways(pair):
    """HF config -> ours -> HF: every key we write has transformers' value (read as its config
    object does, so Qwen3-MoE's ``num_experts`` reaches ``num_local_experts``), and the text
    model's choices: Qwen3 q/k norms without biases, Qwen3-MoE's dense middle layer and
    renormalised softmax top-k, GPT-OSS's sinks, window on layers 0 and 2, biases, YaRN."""
    from megatron_vlm.families.internvl.hf_config import model_to_hf

    kind, hf, _, model_cfg = pair
    llm = model_cfg.llm
    assert llm.position_embedding == "rope" and llm.untie_embeddings
    assert model_cfg.token_ids.image == IDS.img_context
    if kind == "qwen3":
        assert llm.qk_layernorm and not llm.add_qkv_bias and llm.num_experts is None
    elif kind == "qwen3_moe":
        assert (llm.num_experts, llm.moe_layer_pattern, llm.num_dense_layers) == (8, [1, 0, 1], 1)
        assert llm.moe_router_score_function == "softmax" and not llm.moe_router_pre_softmax
        assert llm.num_shared_experts == 0 and not llm.moe_router_enable_expert_bias
    else:
        assert llm.attention_sinks and not llm.qk_layernorm and llm.add_bias_linear
        assert (llm.sliding_window, llm.window_attn_skip_freq) == (6, 2)
        assert llm.mlp_activation == "clamped_swiglu" and llm.swiglu_limit == 1.5
        assert (llm.yarn.factor, llm.yarn.truncate, llm.yarn.mscale_all_dim) == (4.0, False, 0.0)
    back = model_to_hf(model_cfg, "fp32", model_cfg.token_ids)
    assert back["architectures"] == [type(hf).__name__] and back["model_type"] == "internvl"
    for key, value in back["text_config"].items():
        assert getattr(hf.config.text_config, key) == value, ("text_config", key)
    hf_vision = hf.config.vision_config.to_dict()
    for key, value in back["vision_config"].items():
        assert hf_vision[key] == value, ("vision_config", key)
    for key in ("downsample_ratio", "image_token_id", "tie_word_embeddings",
                "vision_feature_layer", "vision_feature_select_strategy",
                "projector_hidden_act"):
        assert back[key] == getattr(hf.config, key), key
