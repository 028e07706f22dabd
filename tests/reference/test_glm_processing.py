"""GLM-4.1V / GLM-4.5V preprocessing (megatron_vlm.families.glm.processing / media) ==
transformers 5.25's processors that run without torchvision.

Images: ``smart_resize`` over thousands of sizes and several bounds (images: 2 frames; videos:
2..600 frames), the patch counts of ``get_number_of_image_patches``, and the ``pixel_values`` /
``image_grid_thw`` of ``Glm4vImageProcessorPil`` on real encoded images (JPEG photographs of
several sizes: upscaled, rounded, grayscale with aspect 183, a side below 28; a transparent PNG)
given in one call, and one downscaled under tighter bounds, bit for bit; every uint8 value's
normalisation. Videos: ``Glm4vVideoProcessor.sample_frames`` over many frame counts, rates and
durations (past the 300 s rule), ``get_num_of_video_patches``, and H.264 clips written here with
PyAV (29.97, 25, 1 and 5 fps; odd sampled counts) read by transformers' ``read_video_pyav`` with
that ``sample_frames`` and by our media rules (plan and decode): frame times, the prompt text
``Glm4vProcessor.replace_video_token`` writes, and the pixels. The video processor's resize is
torchvision's (not installed): its uint8 bicubic kernel is torch's ``interpolate(antialias=True)``,
called here on transformers' frames; its normalisation constants come from the processor's
``_fuse_mean_std_and_rescale_factor`` and torchvision's ``normalize`` (``(x - mean) / std``), its
patch layout from the processor's ``patchify``. Last, a packed batch of our decoded media gives
the tower (``patch_layout.tower_inputs``) the processors' pixel_values and grids.
"""

from __future__ import annotations

import math
import sys
from fractions import Fraction
from types import SimpleNamespace

import numpy as np
import PIL.Image
import PIL.ImageFilter
import pytest
import torch
import torch.nn.functional as F

from megatron_vlm.data.image import ProcessedImage, unpatchify
from megatron_vlm.data.kimi_tokenizer import SpecialTokensTokenizer
from megatron_vlm.data.media_errors import BadSampleError
from megatron_vlm.data.mm_packing import pack_tokenized
from megatron_vlm.data.templates import Text
from megatron_vlm.families.glm import processing as glm
from megatron_vlm.families.glm.media import (
    GLM_SPECIAL_TOKENS,
    GlmMediaRules,
    glm_token_ids,
    glm_tokenize,
)
from megatron_vlm.families.glm.patch_layout import tower_inputs

av = pytest.importorskip("av")
from transformers.models.glm4v.image_processing_pil_glm4v import (  # noqa: E402
    Glm4vImageProcessorPil,
)
from transformers.models.glm4v.processing_glm4v import Glm4vProcessor  # noqa: E402
from transformers.models.glm4v.video_processing_glm4v import (  # noqa: E402
    Glm4vVideoProcessor,
    smart_resize,
)
from transformers.video_utils import VideoMetadata, read_video_pyav  # noqa: E402

IMAGES = Glm4vImageProcessorPil()
VIDEOS = Glm4vVideoProcessor()


def test_transformers_gave_us_the_processors_without_torchvision():
    assert "torchvision" not in sys.modules
    assert tuple(IMAGES.image_mean) == glm.CLIP_MEAN and tuple(IMAGES.image_std) == glm.CLIP_STD
    assert tuple(VIDEOS.image_mean) == glm.CLIP_MEAN and tuple(VIDEOS.image_std) == glm.CLIP_STD
    assert VIDEOS.fps == glm.VIDEO_FPS and VIDEOS.max_duration == glm.VIDEO_MAX_DURATION


# ------------------------------------------------------------------------------------- sizes


def _sizes() -> list[tuple[int, int]]:
    cases = [(h, w) for h in range(1, 60, 3) for w in range(1, 60, 4)]
    rng = np.random.default_rng(0)
    while len(cases) < 2500:
        h, w = np.exp(rng.uniform(0, math.log(20000), size=2)).astype(int) + 1
        if max(h, w) / min(h, w) <= 150:
            cases.append((int(h), int(w)))
    return cases + [(1, 200), (200, 1), (100, 20000), (4200, 2800), (2100, 2800), (28, 28),
                    (56, 112), (14, 14), (79, 79), (80, 80)]


BOUNDS = [(glm.IMAGE_MIN_PIXELS, glm.IMAGE_MAX_PIXELS), (glm.VIDEO_MIN_PIXELS,
          glm.VIDEO_MAX_PIXELS), (28 * 28 * 16, 28 * 28 * 256), (56 * 56, 28 * 28 * 4)]


@pytest.mark.parametrize("num_frames", [2, 3, 4, 10, 31, 600])
def test_smart_resize_equals_transformers(num_frames):
    for min_pixels, max_pixels in BOUNDS:
        for h, w in _sizes():
            ref = smart_resize(num_frames, h, w, min_pixels=min_pixels, max_pixels=max_pixels)
            ours = glm.smart_resize(num_frames, h, w, min_pixels=min_pixels,
                                    max_pixels=max_pixels)
            assert ours == ref, (num_frames, h, w, min_pixels, max_pixels)


def test_refusals_match_transformers():
    for h, w in ((1, 201), (402, 2), (30, 6100)):
        with pytest.raises(ValueError):
            smart_resize(2, h, w)
        with pytest.raises(BadSampleError):
            glm.smart_resize(2, h, w)
    with pytest.raises(ValueError):
        smart_resize(1, 100, 100)
    with pytest.raises(ValueError, match="temporal_factor"):
        glm.smart_resize(1, 100, 100)


def test_image_and_video_patch_counts_equal_transformers():
    for h, w in _sizes()[::5]:
        size = glm.image_size(h, w)
        assert math.prod(glm.patch_grid(size)) == IMAGES.get_number_of_image_patches(h, w)
        for t in (2, 7, 64):
            assert glm.num_video_patches(t, h, w) == VIDEOS.get_num_of_video_patches(t, h, w)
    with pytest.raises(ValueError):  # a single frame: both refuse (sample_frames pads to 2)
        VIDEOS.get_num_of_video_patches(1, 100, 100)
    with pytest.raises(ValueError):
        glm.num_video_patches(1, 100, 100)


class _Bytes:
    """A tiny byte-level tokenizer (ids 0..255 are the UTF-8 bytes)."""

    vocab_size, eos_id, pad_id = 258, 256, 257

    def encode(self, text: str) -> list[int]:
        return list(text.encode())


TOK = SpecialTokensTokenizer(_Bytes(), GLM_SPECIAL_TOKENS)


def _our_text(groups: list) -> str:
    """Our template's tokens of ``groups``, written back as text."""
    doc = glm_tokenize(groups, TOK, glm_token_ids(TOK), markers_loss=True)
    names = {i: t for t, i in TOK.special_tokens.items()}
    return "".join(names[i] if i in names else chr(i) for i in doc.tokens.tolist())


# ------------------------------------------------------------------------------------ images


def frames_from_hf_rows(rows: torch.Tensor, grid_thw: list[int]) -> torch.Tensor:
    """transformers' ``pixel_values`` rows ``[T*h*w, 3*2*14*14]`` (T temporal patches) back to
    ``[2T, 3, 14h, 14w]`` frames: rows are 2x2 merge blocks in raster order, each block's patches
    in raster order, a row is (channel, frame, y, x)."""
    t, h, w = grid_thw
    x = rows.reshape(t, h // 2, w // 2, 2, 2, 3, 2, 14, 14)  # T, bh, bw, mh, mw, C, tp, y, x
    x = x.permute(0, 6, 5, 1, 3, 7, 2, 4, 8)  # T, tp, C, bh, mh, y, bw, mw, x
    return x.reshape(2 * t, 3, 14 * h, 14 * w)


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


@pytest.fixture(scope="module")
def image_files(tmp_path_factory) -> list:
    d = tmp_path_factory.mktemp("images")
    paths = []
    for height, width, mode in ((480, 640, "RGB"),  # rounded to 28
                                (37, 53, "RGB"),  # below 112*112 over 2 frames: scaled up
                                (60, 11000, "L"),  # aspect ratio 183, grayscale
                                (13, 300, "RGB")):  # a side below 28: scaled to 28 first
        path = d / f"photo_{height}x{width}.jpg"
        PIL.Image.fromarray(photo(height, width, seed=height)).convert(mode).save(path,
                                                                                  quality=90)
        paths.append(path)
    rgba = np.dstack([photo(90, 70, seed=3), np.tile(np.arange(70, dtype=np.uint8) * 3, (90, 1))])
    path = d / "transparent.png"
    PIL.Image.fromarray(rgba, "RGBA").save(path)  # composited on white by both
    return paths + [path]


def test_normalisation_of_every_value_equals_processors():
    """All 256 values per channel: the image path against Glm4vImageProcessorPil's own rescale
    and normalize, the video path against the video processor's fused constants with
    torchvision's ``normalize`` arithmetic (``(x - mean) / std``)."""
    values = torch.arange(256, dtype=torch.uint8).reshape(1, 1, 16, 16).expand(1, 3, 16, 16)
    chw = values[0].numpy()
    ref = IMAGES.normalize(IMAGES.rescale(chw, 1 / 255), glm.CLIP_MEAN, glm.CLIP_STD)
    assert ref.dtype == np.float32
    assert torch.equal(glm.normalize_patches(values.contiguous(), video=False)[0],
                       torch.from_numpy(ref))
    mean, std, _ = VIDEOS._fuse_mean_std_and_rescale_factor(
        do_normalize=True, image_mean=glm.CLIP_MEAN, image_std=glm.CLIP_STD, do_rescale=True,
        rescale_factor=1 / 255)
    ref = (values.to(torch.float32) - mean.view(-1, 1, 1)) / std.view(-1, 1, 1)
    assert torch.equal(glm.normalize_patches(values.contiguous(), video=True), ref)
    assert not torch.equal(glm.normalize_patches(values.contiguous(), video=False), ref)


def test_image_pixels_equal_processor(image_files):
    """All images in one processor call: rows concatenated in order, grids (1, h, w)."""
    pil = [PIL.Image.open(p) for p in image_files]
    ref = IMAGES(images=pil, return_tensors="pt")
    grids, rows = [], []
    for img in pil:
        ours = glm.resize_image(img)
        patches = ours.patches()
        assert patches.shape == (2 * math.prod(ours.grid_hw), 3, 14, 14)
        grids.append((1, *ours.grid_hw))
        rows.append(glm.hf_patch_rows(patches, (2, *ours.grid_hw)))
    assert ref["image_grid_thw"].tolist() == [list(g) for g in grids]
    assert torch.equal(torch.cat(rows), ref["pixel_values"])
    # The prompt: the processor puts h*w/4 <|image|> in place of the chat template's one.
    processor = SimpleNamespace(image_processor=IMAGES, image_token="<|image|>")
    for k, (_, h, w) in enumerate(grids):
        ref_text = Glm4vProcessor.replace_image_token(processor, ref, k)
        ours = _our_text([ProcessedImage(torch.empty(0), (2, h, w), (0, 0), (0, 0))])
        assert ours == f"<|begin_of_image|>{ref_text}<|end_of_image|>"
    # Our patches are raster order (frame, row, col) of the image's two equal frames.
    first = 0
    for img, (_, h, w) in zip(pil, grids):
        frames = frames_from_hf_rows(ref["pixel_values"][first : first + h * w], [1, h, w])
        first += h * w
        assert torch.equal(unpatchify(glm.resize_image(img).patches(), (2, h, w)), frames)
        assert torch.equal(frames[0], frames[1])


def test_image_pixels_under_other_bounds_equal_processor(image_files):
    img = PIL.Image.open(image_files[0])
    bounds = {"shortest_edge": 28 * 28 * 40, "longest_edge": 28 * 28 * 2 * 60}
    ref = IMAGES(images=[img], size=bounds, return_tensors="pt")
    ours = glm.resize_image(img, min_pixels=bounds["shortest_edge"],
                            max_pixels=bounds["longest_edge"])
    assert ref["image_grid_thw"].tolist() == [[1, *ours.grid_hw]]
    assert torch.equal(glm.hf_patch_rows(ours.patches(), (2, *ours.grid_hw)),
                       ref["pixel_values"])


# ---------------------------------------------------------------------------- frame sampling


def test_sample_frames_equals_processor():
    cases = 0
    for fps in (1.0, 2.0, 5.0, 23.976, 25.0, 29.97, 30.0, 60.0, 0.5):
        for total in (1, 2, 3, 5, 16, 47, 100, 601, 1800, 9001, 20000, 40000):
            for duration in (total / fps, None):
                metadata = VideoMetadata(total_num_frames=total, fps=fps, duration=duration)
                ref = VIDEOS.sample_frames(metadata)
                ours = glm.sample_frames(total, fps, duration=duration)
                np.testing.assert_array_equal(ours, ref, err_msg=f"{total} at {fps}")
                assert len(ours) % 2 == 0
                cases += 1
    metadata = VideoMetadata(total_num_frames=300, fps=30.0, duration=10.0)
    np.testing.assert_array_equal(glm.sample_frames(300, 30.0, duration=10.0, fps=4.5),
                                  VIDEOS.sample_frames(metadata, fps=4.5))
    assert cases == 216


# ------------------------------------------------------------------------------------- clips


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


CLIPS = {  # name: (frames, height, width, rate); sampled frames in the comment
    "320x240_ntsc": (150, 240, 320, Fraction(30000, 1001)),  # 10 at 2 fps: 5 temporal patches
    "64x48_25fps": (75, 48, 64, 25),  # 6: upscaled to the 112*112 floor over the frames
    "120x200_1fps": (7, 200, 120, 1),  # 7 -> the last repeated: 4 temporal patches
    "90x60_one_frame": (1, 60, 90, 5),  # 1 -> 2
}


@pytest.fixture(scope="module")
def clip_files(tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("clips")
    out = {}
    for name, (num, h, w, rate) in CLIPS.items():
        _write_clip(d / f"{name}.mp4", num, h, w, rate)
        out[name] = d / f"{name}.mp4"
    return out


def _hf_video_rows(frames: np.ndarray, num_frames: int) -> tuple[torch.Tensor, list[int]]:
    """transformers' pipeline on its decoded frames: resize (torchvision's uint8 kernel),
    fused rescale+normalise, ``patchify``; ``(pixel_values_videos, video_grid_thw)``."""
    h, w = smart_resize(num_frames, *frames.shape[1:3], temporal_factor=2, factor=28,
                        min_pixels=VIDEOS.size["shortest_edge"],
                        max_pixels=VIDEOS.size["longest_edge"])
    x = torch.from_numpy(frames).permute(0, 3, 1, 2)
    if (h, w) != tuple(x.shape[-2:]):
        x = F.interpolate(x.contiguous(), size=(h, w), mode="bicubic", antialias=True)
    mean, std, _ = VIDEOS._fuse_mean_std_and_rescale_factor(
        do_normalize=True, image_mean=tuple(VIDEOS.image_mean),
        image_std=tuple(VIDEOS.image_std), do_rescale=True, rescale_factor=VIDEOS.rescale_factor)
    x = (x.to(torch.float32) - mean.view(-1, 1, 1)) / std.view(-1, 1, 1)
    rows, t, gh, gw = VIDEOS.patchify(x[None], patch_size=14, merge_size=2,
                                      temporal_patch_size=2)
    return rows[0], [t, gh, gw]


def _hf_video_text(metadata, grid: list[int]) -> str:
    """What ``Glm4vProcessor`` puts in place of the chat template's ``<|video|>``."""
    processor = SimpleNamespace(image_token="<|image|>", video_processor=VIDEOS)
    processor.replace_frame_token_id = lambda ts, num_image_tokens: (
        Glm4vProcessor.replace_frame_token_id(processor, ts, num_image_tokens))
    inputs = {"video_grid_thw": torch.tensor([grid]), "video_metadata": [metadata]}
    return Glm4vProcessor.replace_video_token(processor, inputs, 0)


@pytest.mark.parametrize("name", CLIPS)
def test_clip_equals_processor(clip_files, name):
    path = clip_files[name]
    frames, metadata = read_video_pyav(str(path), sample_indices_fn=VIDEOS.sample_frames)
    ref_rows, ref_grid = _hf_video_rows(frames, len(metadata.frames_indices))
    ref_text = _hf_video_text(metadata, ref_grid)

    rules, settings = GlmMediaRules(), SimpleNamespace(video_fps=2.0, video_backend="auto")
    data = path.read_bytes()
    planned, repaired = rules.plan_video(data, settings, None)
    items = rules.decode(SimpleNamespace(type="video", data=data, clip=None), settings)
    assert not repaired
    assert [(i.grid_thw, i.timestamp) for i in items] == [(p.grid_thw, p.timestamp)
                                                         for p in planned]
    times = [t for item in items for t in item.frame_timestamps]
    assert times == list(metadata.timestamps)
    assert len(items) == ref_grid[0]
    assert all(item.grid_thw == (2, *ref_grid[1:]) for item in items)
    ours = torch.cat([glm.hf_patch_rows(i.pixel_values, i.grid_thw) for i in items])
    assert torch.equal(ours, ref_rows)
    raster = torch.cat([unpatchify(i.pixel_values, i.grid_thw) for i in items])
    assert torch.equal(raster, frames_from_hf_rows(ref_rows, ref_grid))
    # The chat template writes <|begin_of_video|><|video|><|end_of_video|>; the processor
    # replaces <|video|>.
    assert _our_text([items]) == f"<|begin_of_video|>{ref_text}<|end_of_video|>"


def test_packed_batch_gives_the_tower_the_processors_pixel_values(image_files, clip_files):
    """Two images and a video decoded by our media rules, packed (mm_packing), then
    ``patch_layout.tower_inputs``: the processors' pixel_values of the images, then of the
    video, and their grids with the video split per temporal patch (as the tower and
    ``Glm4vModel.get_video_features`` split it)."""
    rules, settings = GlmMediaRules(), SimpleNamespace(video_fps=2.0, video_backend="auto")
    pictures = [image_files[0], image_files[3]]
    images = [rules.decode(SimpleNamespace(type="image", data=p.read_bytes(), clip=None),
                           settings)[0] for p in pictures]
    clip = clip_files["320x240_ntsc"]
    patches = rules.decode(SimpleNamespace(type="video", data=clip.read_bytes(), clip=None),
                           settings)
    doc = glm_tokenize([images[0], Text("and"), images[1], patches], TOK, glm_token_ids(TOK),
                       markers_loss=True)
    batch = pack_tokenized([doc], 1024, TOK.pad_id)
    rows, grid = tower_inputs(batch.vision.pixel_values, batch.vision.grid_thw)

    ref_images = IMAGES(images=[PIL.Image.open(p) for p in pictures], return_tensors="pt")
    frames, metadata = read_video_pyav(str(clip), sample_indices_fn=VIDEOS.sample_frames)
    ref_video, (t, h, w) = _hf_video_rows(frames, len(metadata.frames_indices))
    assert torch.equal(rows, torch.cat([ref_images["pixel_values"], ref_video]))
    assert grid.tolist() == ref_images["image_grid_thw"].tolist() + [[1, h, w]] * t
    # the model's placeholders: h*w/4 per tower item, as Glm4vProcessor expands them
    assert (grid.prod(dim=1) // 4).tolist() == [s.length for s in doc.placeholder_spans]
