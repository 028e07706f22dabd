"""InternVL3.5 preprocessing (megatron_vlm.families.internvl.processing / media) == transformers
5.25's classes that run without torchvision.

Tiling: ``get_optimal_tiled_canvas`` and ``get_number_of_image_patches`` of
``GotOcr2ImageProcessorPil(size=448, crop_to_patches=True, min_patches=1, max_patches=12)`` (with
InternVL's ImageNet mean/std) over thousands of sizes and other tile bounds; every uint8 value's
normalisation; the ``pixel_values`` and ``num_patches`` of that processor on real encoded images
(JPEG photographs of several aspect ratios: one tile, 3x2, 1x12 and 12x1 with thumbnails, a
grayscale one, a transparent PNG) given in one call, against our media rules' plan and decode of
the same bytes, bit for bit. The prompt: ``InternVLProcessor`` (built without its ``__init__``,
whose video-processor class check imports torchvision) expands ``<IMG_CONTEXT>`` stand-ins in a
text with those images into the ids our template writes; ``replace_video_token`` gives the
``Frame1:`` ... ``FrameN:`` text of a video. Videos: transformers' own
``InternVLVideoProcessor.sample_frames`` (its source compiled alone: the module imports
torchvision) over many frame counts and rates, and H.264 clips written here with PyAV read by
transformers' ``read_video_pyav`` with that sampler and by our media rules (plan and decode):
indices, times, and every frame's pixels == the image processor's one-tile output for it.
Last, a packed batch of our decoded media gives the model (``hf_pixel_values``) the processors'
``pixel_values``.
"""

from __future__ import annotations

import ast
import inspect
import re
import sys
from fractions import Fraction
from types import SimpleNamespace

import numpy as np
import PIL.Image
import PIL.ImageFilter
import pytest
import torch

from megatron_vlm.data.image import unpatchify
from megatron_vlm.data.kimi_tokenizer import SpecialTokensTokenizer
from megatron_vlm.data.mm_packing import pack_tokenized
from megatron_vlm.data.templates import Text
from megatron_vlm.data.video import VideoChunk
from megatron_vlm.families.internvl import processing as ivl
from megatron_vlm.families.internvl.media import (
    IMG_CONTEXT,
    IMG_END,
    IMG_START,
    INTERNVL_SPECIAL_TOKENS,
    InternVLMediaRules,
    internvl_tokenize,
)

av = pytest.importorskip("av")
tokenizers = pytest.importorskip("tokenizers")
from transformers import PreTrainedTokenizerFast  # noqa: E402
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD  # noqa: E402
from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import (  # noqa: E402
    GotOcr2ImageProcessorPil,
    get_optimal_tiled_canvas,
)
from transformers.models.internvl import processing_internvl  # noqa: E402
from transformers.models.internvl.processing_internvl import InternVLProcessor  # noqa: E402
from transformers.video_utils import VideoMetadata, read_video_pyav  # noqa: E402

IMAGES = GotOcr2ImageProcessorPil(size={"height": 448, "width": 448}, crop_to_patches=True,
                                  min_patches=1, max_patches=12,
                                  image_mean=list(IMAGENET_DEFAULT_MEAN),
                                  image_std=list(IMAGENET_DEFAULT_STD))
ONE_TILE = GotOcr2ImageProcessorPil(size={"height": 448, "width": 448}, crop_to_patches=False,
                                    image_mean=list(IMAGENET_DEFAULT_MEAN),
                                    image_std=list(IMAGENET_DEFAULT_STD))
RULES = InternVLMediaRules()


def test_transformers_gave_us_the_processors_without_torchvision():
    assert "torchvision" not in sys.modules
    assert ivl.IMAGENET_MEAN == tuple(IMAGENET_DEFAULT_MEAN)
    assert ivl.IMAGENET_STD == tuple(IMAGENET_DEFAULT_STD)
    assert (IMAGES.min_patches, IMAGES.max_patches) == (ivl.MIN_TILES, ivl.MAX_TILES)


# ------------------------------------------------------------------------------------ tiling


def _sizes() -> list[tuple[int, int]]:
    cases = [(h, w) for h in (1, 2, 7, 100, 223, 224, 448, 449, 896) for w in (1, 3, 224, 448,
                                                                               672, 5000)]
    rng = np.random.default_rng(0)
    while len(cases) < 3000:
        h, w = np.exp(rng.uniform(0, np.log(12000), size=2)).astype(int) + 1
        cases.append((int(h), int(w)))
    # exact ties: an image of the aspect of several grids (1:1 -> 1x1, 2x2, 3x3) near the
    # area rule's border 0.5 * 448^2 * cols * rows
    cases += [(s, s) for s in (316, 317, 448, 633, 634, 950, 951)]
    cases += [(s, 2 * s) for s in (316, 317, 447, 448, 449)]
    # ties whose area is exactly 0.5 * 448^2 * cols * rows (the rule is ">", not ">=")
    cases += [(588, 2048), (882, 1024), (896, 1008), (1008, 896)]
    return cases


@pytest.mark.parametrize("bounds", [(1, 12), (1, 6), (2, 12), (1, 1), (4, 4)])
def test_tile_grid_and_count_equal_transformers(bounds):
    lo, hi = bounds
    kwargs = {"min_patches": lo, "max_patches": hi}
    for h, w in _sizes():
        grid = ivl.tile_grid(h, w, min_tiles=lo, max_tiles=hi)
        assert grid == get_optimal_tiled_canvas((h, w), (448, 448), lo, hi), (h, w)
        assert lo <= grid[0] * grid[1] <= hi
        count = ivl.num_tiles(h, w, min_tiles=lo, max_tiles=hi)
        assert count == IMAGES.get_number_of_image_patches(h, w, kwargs), (h, w)
    assert ivl.tile_grid(10, 120) == (12, 1) and ivl.tile_grid(120, 10) == (1, 12)
    assert ivl.num_tiles(896, 1344) == 7  # 3x2 + thumbnail


def test_normalisation_of_every_value_equals_the_processor():
    values = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16).expand(1, 3, 16, 16)
    chw = values[0].numpy()
    ref = IMAGES.normalize(IMAGES.rescale(chw, 1 / 255), IMAGES.image_mean, IMAGES.image_std)
    assert ref.dtype == np.float32
    assert torch.equal(ivl.normalize_patches(values.contiguous())[0], torch.from_numpy(ref))


def photo(height: int, width: int, seed: int) -> np.ndarray:
    """A photograph-like RGB image: sky gradient, sun, textured hills, noise, blurred."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.empty((height, width, 3), np.float32)
    img[..., 0] = 90 + 100 * y / height
    img[..., 1] = 140 + 60 * y / height
    img[..., 2] = 230 - 40 * y / height
    sun = (y - 0.25 * height) ** 2 + (x - 0.7 * width) ** 2 < (0.08 * min(height, width)) ** 2
    img[sun] = (255, 230, 120)
    hill = y > 0.55 * height + 0.1 * height * np.sin(x / max(width, 1) * 7 + seed)
    texture = 25 * rng.standard_normal((height, width), dtype=np.float32)
    img[hill] = np.stack([60 + texture, 110 + texture, 40 + 0.5 * texture], -1)[hill]
    img += 6 * rng.standard_normal(img.shape, dtype=np.float32)
    pil = PIL.Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    return np.asarray(pil.filter(PIL.ImageFilter.GaussianBlur(1.2)))


IMAGE_CASES = {  # name: (height, width, mode), tiles in the comment
    "one_tile": (300, 280, "RGB"),  # aspect ~1, area below half of 2x2: 1 tile, no thumbnail
    "3x2": (400, 610, "RGB"),  # 3 cols x 2 rows + thumbnail: 7
    "tall_1x12": (1200, 96, "RGB"),  # aspect 0.08: 1 col x 12 rows + thumbnail: 13
    "wide_12x1_gray": (40, 700, "L"),  # aspect 17.5, grayscale: 12 cols x 1 row + thumbnail
}


@pytest.fixture(scope="module")
def image_files(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("images")
    out = {}
    for name, (height, width, mode) in IMAGE_CASES.items():
        path = d / f"{name}.jpg"
        PIL.Image.fromarray(photo(height, width, seed=height)).convert(mode).save(path,
                                                                                  quality=90)
        out[name] = path
    rgba = np.dstack([photo(90, 200, seed=3),
                      np.tile(np.arange(200, dtype=np.uint8), (90, 1))])
    out["transparent_2x1"] = d / "transparent.png"
    PIL.Image.fromarray(rgba, "RGBA").save(out["transparent_2x1"])  # composited on white by both
    return out


def _tiles_from_patches(patches: torch.Tensor, grid_thw: tuple[int, int, int]) -> torch.Tensor:
    """Our ``[t*h*w, 3, 14, 14]`` raster patches back to ``[t, 3, 14h, 14w]`` tiles."""
    return unpatchify(patches, grid_thw)


def test_image_tiles_equal_the_processor(image_files):
    names = list(image_files)
    pil = [PIL.Image.open(image_files[n]) for n in names]
    ref = IMAGES(images=pil, return_tensors="pt")
    assert ref["num_patches"].tolist() == [1, 7, 13, 13, 3]
    first = 0
    for name, k in zip(names, ref["num_patches"].tolist()):
        data = image_files[name].read_bytes()
        planned = RULES.plan_image(data, None)
        (decoded,) = RULES.decode(SimpleNamespace(type="image", data=data, clip=None), None)
        assert planned.grid_thw == decoded.grid_thw == (k, 32, 32), name
        assert decoded.pixel_values.shape == (k * 1024, 3, 14, 14)
        tiles = ref["pixel_values"][first : first + k]
        first += k
        assert torch.equal(_tiles_from_patches(decoded.pixel_values, decoded.grid_thw), tiles)
    assert first == ref["pixel_values"].shape[0]


# ------------------------------------------------------------------------------------ prompt


def _hf_tokenizer() -> PreTrainedTokenizerFast:
    """Byte-level ids 0..255 (ASCII text), eos 256, pad 257, then InternVL's tokens in the order
    SpecialTokensTokenizer appends them (258, 259, 260) and <video> (261)."""
    vocab = {chr(i): i for i in range(256)}
    vocab.update({"<eos>": 256, "<pad>": 257, IMG_START: 258, IMG_END: 259, IMG_CONTEXT: 260,
                  "<video>": 261})
    tk = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab=vocab, unk_token="\x00"))
    tk.pre_tokenizer = tokenizers.pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, eos_token="<eos>", pad_token="<pad>",
        extra_special_tokens={"start_image_token": IMG_START, "end_image_token": IMG_END,
                              "context_image_token": IMG_CONTEXT, "video_token": "<video>"})


class _Bytes:
    vocab_size, eos_id, pad_id = 258, 256, 257

    def encode(self, text: str) -> list[int]:
        return list(text.encode())


OURS = SpecialTokensTokenizer(_Bytes(), INTERNVL_SPECIAL_TOKENS)


def _hf_processor(tok: PreTrainedTokenizerFast) -> InternVLProcessor:
    """``InternVLProcessor`` with the attributes its ``__init__`` sets (that ``__init__`` checks
    the video processor's class, whose module imports torchvision)."""
    proc = InternVLProcessor.__new__(InternVLProcessor)
    proc.image_processor, proc.tokenizer, proc.video_processor = IMAGES, tok, None
    proc.chat_template, proc.image_seq_length = None, 256
    proc.start_image_token, proc.end_image_token = tok.start_image_token, tok.end_image_token
    proc.start_image_token_id = tok.start_image_token_id
    proc.end_image_token_id = tok.end_image_token_id
    proc.image_token, proc.image_token_id = tok.context_image_token, tok.context_image_token_id
    proc.video_token = tok.video_token
    proc.multimodal_pattern = re.compile(
        f"(?P<image>{re.escape(proc.image_token)})|(?P<video>{re.escape(proc.video_token)})")
    return proc


def test_prompt_expansion_equals_internvl_processor(image_files):
    tok = _hf_tokenizer()
    assert OURS.special_tokens == {IMG_START: 258, IMG_END: 259, IMG_CONTEXT: 260}
    names = ["one_tile", "3x2", "transparent_2x1"]
    pil = [PIL.Image.open(image_files[n]) for n in names]
    text = f"Look: {IMG_CONTEXT}\nand {IMG_CONTEXT}{IMG_CONTEXT} done."
    ref = _hf_processor(tok)(images=pil, text=[text], return_tensors="pt")
    items = [RULES.plan_image(image_files[n].read_bytes(), None) for n in names]
    groups = [Text("Look: "), items[0], Text("\nand "), items[1], items[2], Text(" done.")]
    doc = internvl_tokenize(groups, OURS, RULES.media_ids(OURS), markers_loss=True)
    assert doc.tokens.tolist() == ref["input_ids"][0].tolist()
    assert [s.length for s in doc.placeholder_spans] == [256, 7 * 256, 3 * 256]
    assert ref["pixel_values"].shape[0] == sum(i.grid_thw[0] for i in items) == 11


def test_video_prompt_equals_replace_video_token():
    """``Frame1: <img>..</img>\\nFrame2: ...``, 1-based, 256 <IMG_CONTEXT> a frame."""
    tok = _hf_tokenizer()
    proc = SimpleNamespace(start_image_token=IMG_START, end_image_token=IMG_END,
                           image_token=IMG_CONTEXT, image_seq_length=256)
    inputs = {"pixel_values_videos": [torch.zeros(3, 3, 448, 448)]}
    ref_text = InternVLProcessor.replace_video_token(proc, inputs, 0)
    assert ref_text.startswith("Frame1: <img>") and "\nFrame3: <img>" in ref_text
    frames = [VideoChunk(torch.empty(0), (1, 32, 32), i / 2, (i / 2,), chunk_index=i)
              for i in range(3)]
    doc = internvl_tokenize([Text("Watch "), frames, Text("!")], OURS, RULES.media_ids(OURS),
                            markers_loss=False)
    assert doc.tokens.tolist() == tok("Watch " + ref_text + "!")["input_ids"]
    assert [(s.length, s.is_video) for s in doc.placeholder_spans] == [(256, True)] * 3


# ------------------------------------------------------------------------------------- videos


def _hf_sample_frames():
    """transformers' ``InternVLVideoProcessor.sample_frames``, compiled from its module's
    source alone (the module imports torchvision at the top)."""
    path = inspect.getsourcefile(processing_internvl).replace("processing_internvl",
                                                              "video_processing_internvl")
    with open(path) as f:
        tree = ast.parse(f.read())
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef)
               and n.name == "InternVLVideoProcessor")
    fn = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == "sample_frames")
    namespace = {"torch": torch, "VideoMetadata": VideoMetadata}
    exec(compile(ast.Module([fn], type_ignores=[]), path, "exec"), namespace)
    self = SimpleNamespace(num_frames=None, initial_shift=True)
    return lambda metadata, fps, num_frames=None: namespace["sample_frames"](
        self, metadata, num_frames=num_frames, fps=fps)


HF_SAMPLE = _hf_sample_frames()


def test_sample_frames_equals_the_video_processor():
    cases = 0
    for total in (1, 2, 3, 7, 30, 31, 100, 299, 1001, 4500):
        for src in (1.0, 5.0, 24.0, 30000 / 1001, 60.0):
            for fps in (0.5, 1.0, 2.0):
                meta = VideoMetadata(total_num_frames=total, fps=src)
                n = int(total / src * fps)
                ours = ivl.sample_frame_indices(total, src, fps=fps).tolist()
                if n < 1:  # transformers divides by zero; we sample one frame
                    assert ours == [total // 2]
                    continue
                if n > total:  # transformers refuses; we keep every frame
                    with pytest.raises(ValueError, match="exceeds"):
                        HF_SAMPLE(meta, fps)
                    assert ours == list(range(total))
                    continue
                assert ours == HF_SAMPLE(meta, fps).tolist()
                capped = min(n, 8)
                ref = HF_SAMPLE(meta, None, num_frames=capped).tolist()
                assert ivl.sample_frame_indices(total, src, fps=fps, max_frames=8).tolist() == ref
                cases += 1
    assert cases > 80
    assert ivl.sample_frame_indices(4, 1.0, fps=2.0).tolist() == [0, 1, 2, 3]


def _clip_frame(i: int, h: int, w: int) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w]
    img = np.stack([(x * 255 // w + 9 * i) % 256, (y * 255 // h) % 256,
                    np.full((h, w), (37 * i) % 256)], -1).astype(np.uint8)
    s = max(2, h // 6)
    img[h // 3:h // 3 + s, (3 * i) % (w - s):(3 * i) % (w - s) + s] = (250, 250, 20)
    return img


def _write_clip(path, num: int, h: int, w: int, rate) -> None:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=rate)
        stream.height, stream.width, stream.pix_fmt = h, w, "yuv420p"
        stream.options = {"crf": "18", "preset": "ultrafast", "threads": "1"}
        for i in range(num):
            frame = av.VideoFrame.from_ndarray(_clip_frame(i, h, w), format="rgb24")
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


CLIPS = {  # name: (frames, height, width, rate); sampled frames at 1 fps in the comment
    "320x240_ntsc": (90, 240, 320, Fraction(30000, 1001)),  # 3 (2.999 s)
    "64x48_25fps": (60, 48, 64, 25),  # 2
    "90x60_one_frame": (1, 60, 90, 5),  # 0 at 1 fps: one frame
}


@pytest.fixture(scope="module")
def clip_files(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("clips")
    out = {}
    for name, (num, h, w, rate) in CLIPS.items():
        _write_clip(d / f"{name}.mp4", num, h, w, rate)
        out[name] = d / f"{name}.mp4"
    return out


@pytest.mark.parametrize("name", CLIPS)
def test_clip_frames_equal_the_processors(clip_files, name):
    path = clip_files[name]

    def sample(metadata, **kwargs):
        n = int(metadata.total_num_frames / metadata.fps * 1.0)
        return HF_SAMPLE(metadata, None, num_frames=max(n, 1))

    frames, metadata = read_video_pyav(str(path), sample_indices_fn=sample)
    settings = SimpleNamespace(video_fps=1.0, video_max_frames=16, video_backend="auto")
    data = path.read_bytes()
    planned, repaired = RULES.plan_video(data, settings, None)
    items = RULES.decode(SimpleNamespace(type="video", data=data, clip=None), settings)
    assert not repaired
    times = [int(k) / metadata.fps for k in metadata.frames_indices]  # transformers' sampling
    assert len(times) == len(frames) == max(1, int(CLIPS[name][0] / float(CLIPS[name][3])))
    assert [(i.grid_thw, i.timestamp) for i in items] == [((1, 32, 32), t) for t in times]
    assert [(p.grid_thw, p.timestamp) for p in planned] == [((1, 32, 32), t) for t in times]
    assert [i.chunk_index for i in items] == list(range(len(times)))
    ref = ONE_TILE(images=list(frames), return_tensors="pt")["pixel_values"]
    ours = torch.cat([unpatchify(i.pixel_values, i.grid_thw) for i in items])
    assert torch.equal(ours, ref)


def test_packed_batch_gives_the_model_the_processors_pixel_values(image_files, clip_files):
    """An image document and a video document packed by the loader's packer: the micro-batch's
    patches in transformers' layout (``hf_pixel_values``) == the processors' ``pixel_values``
    (image tiles, then one tile per frame), the placeholders == 256 per tile."""
    ids = RULES.media_ids(OURS)
    settings = SimpleNamespace(video_fps=1.0, video_max_frames=16, video_backend="auto")
    image = RULES.decode(SimpleNamespace(type="image", data=image_files["3x2"].read_bytes(),
                                         clip=None), None)
    data = clip_files["320x240_ntsc"].read_bytes()
    frames = RULES.decode(SimpleNamespace(type="video", data=data, clip=None), settings)
    docs = [internvl_tokenize([Text("see "), image[0]], OURS, ids, True),
            internvl_tokenize([frames, Text("ok")], OURS, ids, True)]
    batch = pack_tokenized(docs, 4096, OURS.pad_id, pad_to_multiple=8)
    ref_image = IMAGES(images=[PIL.Image.open(image_files["3x2"])],
                       return_tensors="pt")["pixel_values"]
    video, _ = read_video_pyav(str(clip_files["320x240_ntsc"]),
                               sample_indices_fn=lambda metadata, **kw: HF_SAMPLE(metadata, 1.0))
    ref_video = ONE_TILE(images=list(video), return_tensors="pt")["pixel_values"]
    got = ivl.hf_pixel_values(batch.vision.pixel_values)
    assert torch.equal(got, torch.cat([ref_image, ref_video]))
    assert batch.vision.grid_thw.tolist() == [[7, 32, 32]] + [[1, 32, 32]] * 3
    assert int((batch.tokens == ids.img_context).sum()) == (7 + 3) * 256
