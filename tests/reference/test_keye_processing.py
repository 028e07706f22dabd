"""Keye-VL 1.5 preprocessing (megatron_vlm.families.keye.processing / slowfast) == keye-vl-utils
1.5.2, the released package, imported with a stub torchvision (tests/keye_reference.py).

Images: smart_resize over many sizes (tiny, huge, aspect ratios up to 200) and bounds, and the
resized pixels of photograph-like JPEGs. Videos: H.264 clips written here with PyAV (64x48 to
320x240, scene changes so SlowFast has slow and fast frames, one clip long enough for the 65,536
token budget to bind) read by the package's ``fetch_video`` (decord) and by ours: sampled frames,
timestamps, slow/fast types, slow and fast sizes and the slow-token search result. The search is
also compared over many (slow, fast) counts with the package's own ``fetch_video`` arithmetic (its
decoder replaced by one returning chosen frame types), and its off-by-one checked by hand.
"""

from __future__ import annotations

import math
import sys
from fractions import Fraction
from pathlib import Path

import av
import cv2
import numpy as np
import PIL.Image
import PIL.ImageFilter
import pytest
import torch
from keye_reference import import_keye_vl_utils

from megatron_vlm.data.media_errors import BadSampleError
from megatron_vlm.families.keye import processing as keye
from megatron_vlm.families.keye import slowfast

vp = import_keye_vl_utils()


def test_stub_torchvision_is_gone_after_import():
    """The stub exists only while the package is imported (torchvision is never installed)."""
    assert "torchvision" not in sys.modules
    assert vp.torchvision.__name__ == "torchvision"  # the package holds the stub
    with pytest.raises(RuntimeError, match="stub"):
        vp.transforms.Resize(224)


# ------------------------------------------------------------------------------------ images


def _resize_cases() -> list[tuple[int, int]]:
    cases = [(h, w) for h in range(1, 81) for w in range(1, 81)]
    rng = np.random.default_rng(0)
    while len(cases) < 9400:
        h, w = np.exp(rng.uniform(0, math.log(60000), size=2)).astype(int) + 1
        if max(h, w) / min(h, w) <= 200:
            cases.append((int(h), int(w)))
    cases += [(1, 200), (200, 1), (100, 20000), (20000, 100), (4096, 3920), (4008, 4007),
              (30000, 30000), (60000, 300), (13, 2600), (28, 28), (14, 14), (42, 42)]
    return cases


BOUNDS = [  # (min_pixels, max_pixels) the package uses: images, video frames, similarity frames,
    (4 * 784, 20480 * 784), (48 * 784, 768 * 784), (48 * 784, 256 * 784),  # searched slow and
    (48 * 784, 531 * 784), (48 * 784, 48 * 784), (48 * 784, 159 * 784), (64 * 784, 1024 * 784),
]  # fast bounds, other min/max


def test_smart_resize_equals_package():
    for min_pixels, max_pixels in BOUNDS:
        for h, w in _resize_cases():
            ours = keye.smart_resize(h, w, min_pixels=min_pixels, max_pixels=max_pixels)
            ref = vp.smart_resize(h, w, min_pixels=min_pixels, max_pixels=max_pixels)
            assert ours == ref, (h, w, min_pixels, max_pixels, ours, ref)


def test_aspect_ratio_above_200_is_refused_like_the_package():
    for h, w in ((1, 201), (402, 2), (5, 1003)):
        with pytest.raises(ValueError):
            vp.smart_resize(h, w)
        with pytest.raises(BadSampleError):
            keye.smart_resize(h, w)


def photo(height: int, width: int, seed: int) -> np.ndarray:
    """A photograph-like RGB image: sky gradient, sun, hills with texture, noise, blurred."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.empty((height, width, 3), np.float32)
    img[..., 0] = 90 + 100 * y / height
    img[..., 1] = 140 + 60 * y / height
    img[..., 2] = 230 - 40 * y / height
    sun = (y - 0.25 * height) ** 2 + (x - 0.7 * width) ** 2 < (0.08 * min(height, width)) ** 2
    img[sun] = (255, 230, 120)
    ridge = 0.55 * height + 0.1 * height * np.sin(x / max(width, 1) * 7 + seed)
    hill = y > ridge
    texture = 25 * rng.standard_normal((height, width), dtype=np.float32)
    img[hill] = np.stack([60 + texture, 110 + texture, 40 + 0.5 * texture], -1)[hill]
    img += 6 * rng.standard_normal(img.shape, dtype=np.float32)
    pil = PIL.Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    return np.asarray(pil.filter(PIL.ImageFilter.GaussianBlur(1.2)))


@pytest.mark.parametrize("height,width,mode,max_tokens", [
    (480, 640, "RGB", None),  # rounded to 28
    (37, 53, "RGB", None),  # below 4 tokens: scaled up
    (600, 800, "RGB", 256),  # above the ceiling: scaled down (a 20,480-token image is 16M px)
    (60, 11000, "L", None),  # aspect ratio 183, grayscale JPEG
])
def test_resized_image_pixels_equal_package(tmp_path, height, width, mode, max_tokens):
    path = tmp_path / "photo.jpg"
    PIL.Image.fromarray(photo(height, width, seed=height)).convert(mode).save(path, quality=90)
    ele = {"image": str(path)}
    kwargs = {}
    if max_tokens is not None:
        ele["max_pixels"] = max_tokens * 784
        kwargs["max_tokens"] = max_tokens
    ref = np.asarray(vp.fetch_image(ele))
    ours = keye.resize_image(PIL.Image.open(path), **kwargs)
    assert ours.pixels.shape == ref.shape and ours.pixels.dtype == np.uint8
    assert ours.grid_hw == (ref.shape[0] // 14, ref.shape[1] // 14)
    assert np.array_equal(ours.pixels, ref)


# ------------------------------------------------------------------------------------ HSV


def test_hsv_equals_cv2():
    rng = np.random.default_rng(1)
    colors = rng.integers(0, 256, (1 << 20, 3), dtype=np.uint8)
    edges = np.array([[a, b, c] for a in (0, 1, 127, 128, 254, 255) for b in (0, 1, 128, 255)
                      for c in (0, 1, 128, 255)], np.uint8)
    grays = np.repeat(np.arange(256, dtype=np.uint8)[:, None], 3, axis=1)
    rgb = np.concatenate([colors, edges, grays])[None]
    assert np.array_equal(slowfast.rgb_to_hsv(rgb), cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV))


# ------------------------------------------------------------------------------------ clips


def _texture(h: int, w: int, seed: int) -> np.ndarray:
    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    v = 110 + 70 * np.sin(x / (5 + seed % 7)) * np.cos(y / (4 + seed % 5))
    return np.repeat(np.clip(v, 0, 255).astype(np.uint8)[..., None], 3, axis=2)


def _colorful(h: int, w: int, seed: int) -> np.ndarray:
    hsv = np.empty((h, w, 3), np.uint8)
    hsv[..., 0] = ((np.arange(w)[None, :] * 150 // max(w, 1) + 30 * seed) % 180).astype(np.uint8)
    hsv[..., 1] = 230
    hsv[..., 2] = 90
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)


def scene_clip_frame(i: int, num: int, h: int, w: int) -> np.ndarray:
    """Three scenes: gray texture with a small moving square (static: fast frames), saturated
    colours (a new slow frame, then fast), gray texture with a large block sweeping across."""
    third = num // 3
    if i < third:
        img = _texture(h, w, 1)
        s = max(2, h // 20)
        x = (2 * i) % (w - s)
        img[h // 2:h // 2 + s, x:x + s] = (240, 30, 30)
    elif i < 2 * third:
        img = _colorful(h, w, 2)
    else:
        img = _texture(h, w, 1)
        b = h // 3
        x = int((i - 2 * third) / max(num - 2 * third, 1) * (w - b))
        img[h // 3:h // 3 + b, x:x + b] = (20, 60, 250)
    return img


def toggle_clip_frames(num: int, h: int, w: int, seed: int) -> list[np.ndarray]:
    """Frames that switch between gray and colourful content (a slow frame each time) or repeat
    the previous one (fast): about 80% slow, enough for the 65,536-token budget to bind."""
    rng = np.random.default_rng(seed)
    frames, kind, k = [], 0, 0
    for _ in range(num):
        if not frames or rng.random() < 0.8:
            kind, k = 1 - kind, k + 1
        frames.append(_colorful(h, w, k) if kind else _texture(h, w, k))
    return frames


def write_clip(path: Path, frames: list[np.ndarray], rate: Fraction | int) -> Path:
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=rate)
        stream.height, stream.width = frames[0].shape[:2]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "18", "preset": "ultrafast", "tune": "zerolatency"}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


CLIPS = {  # name: (frames(h, w), rate); sampled frames in the comment
    "320x240_ntsc": (lambda: [scene_clip_frame(i, 150, 240, 320) for i in range(150)],
                     Fraction(30000, 1001)),  # 10 of 150 at 2 fps
    "64x48_25fps": (lambda: [scene_clip_frame(i, 75, 48, 64) for i in range(75)], 25),  # 6
    "120x200_1fps": (lambda: [scene_clip_frame(i, 7, 200, 120) for i in range(7)], 1),  # 7
    "64x48_budget": (lambda: toggle_clip_frames(120, 48, 64, seed=3), 2),  # 120, budget binds
}


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("keye_clips")
    return {name: write_clip(d / f"{name}.mp4", make(), rate)
            for name, (make, rate) in CLIPS.items()}


def _spy_smart_resize(monkeypatch) -> list[dict]:
    """Record the package's smart_resize calls: fetch_video's last two are the slow frame (its
    ``max_pixels`` is the searched slow tokens * 784) and the fast frame."""
    calls, real = [], vp.smart_resize

    def spy(height, width, factor=28, min_pixels=vp.MIN_PIXELS, max_pixels=vp.MAX_PIXELS):
        calls.append(dict(min_pixels=min_pixels, max_pixels=max_pixels))
        return real(height, width, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)

    monkeypatch.setattr(vp, "smart_resize", spy)
    return calls


@pytest.mark.parametrize("name", list(CLIPS))
def test_video_plan_equals_package(clips, monkeypatch, name):
    calls = _spy_smart_resize(monkeypatch)
    ref_frames, ref = vp.fetch_video({"video": str(clips[name])})
    ours = keye.read_video(clips[name])
    ref_types = ref["frame_types"].numpy()
    # Same sampled frames; float32 timestamps index/fps are strictly increasing in the index,
    # so equal timestamps mean equal frame indices.
    assert np.array_equal(ours.frames, ref_frames.permute(0, 2, 3, 1).numpy())
    assert ours.timestamps.dtype == np.float32
    assert np.array_equal(ours.timestamps, ref["timestamps"].numpy())
    assert ours.timestamp_texts == [format(t, ".1f") for t in ref["timestamps"]]
    assert ours.frame_types.tolist() == ref_types.tolist()
    assert ours.slow_size == (ref["height"], ref["width"])
    assert ours.fast_size == (ref["fast_height"], ref["fast_width"])
    assert ours.slow_tokens_searched * 784 == calls[-2]["max_pixels"]
    # The clip exercises what it is meant to: both types, and (budget clip) a binding budget.
    assert 0 in ref_types and 1 in ref_types, ref_types
    n = len(ours.frame_indices)
    assert n == int(ours.total_frames / ours.video_fps * min(2.0, ours.video_fps))
    if name == "64x48_budget":
        assert ours.slow_tokens_searched < 768


def test_slow_frame_follows_the_last_slow_frame():
    """Frame 2 differs little from frame 1 but much from frame 0, the last slow frame: it is
    slow under the package's rule (a 'previous frame' rule would make it fast)."""
    h, w = 224, 224  # 8x8 similarity patches of 28 px (224x224 is kept at <= 256 tokens)
    dark_blue = (0, 0, 120)  # HSV (120, 255, 120): cosine with a gray patch about 0.4
    frames = [_texture(h, w, 1) for _ in range(3)]
    frames[1][:28, :140] = dark_blue  # 5 of 64 patches: similarity 59/64 = 0.92 -> fast
    frames[2][:28, :140] = dark_blue
    frames[2][28:56, :56] = dark_blue  # 7 vs frame 0 (0.89 -> slow), 2 vs frame 1 (0.97)
    ref = vp.extract_slow_fast_frames(torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2))
    ours = slowfast.slow_fast_types(np.stack(frames))
    assert ours.tolist() == ref.tolist() == [0, 1, 0]


# -------------------------------------------------------------------------- token budget


def _package_budget(monkeypatch, num_slow: int, num_fast: int, height: int, width: int,
                    **ele) -> tuple[int, tuple[int, int], tuple[int, int]]:
    """The package's fetch_video arithmetic for chosen frame types: its decoder is replaced by
    one returning a zero-stride frame tensor of the given size and the types."""
    types = torch.tensor([0] * num_slow + [1] * num_fast, dtype=torch.int32)
    frames = torch.zeros(1, 3, 1, 1, dtype=torch.uint8).expand(len(types), 3, height, width)
    monkeypatch.setattr(vp, "_read_video_decord", lambda _ele: (frames, None, types))
    calls = _spy_smart_resize(monkeypatch)
    _, kw = vp.fetch_video({"video": "unused.mp4", **ele})
    return (round(calls[-2]["max_pixels"] / 784), (kw["height"], kw["width"]),
            (kw["fast_height"], kw["fast_width"]))


COUNTS = [(1, 0), (1, 1364), (2, 40), (50, 0), (85, 0), (86, 0), (100, 60), (97, 63),
          (300, 300), (40, 900), (1, 500), (1365, 0), (600, 765), (10, 1000)]


@pytest.mark.parametrize("height,width", [(2160, 3840), (48, 64), (1080, 1920)])
def test_slow_token_search_and_sizes_equal_package(monkeypatch, height, width):
    for num_slow, num_fast in COUNTS:
        ref_t, ref_slow, ref_fast = _package_budget(monkeypatch, num_slow, num_fast, height, width)
        sizes = slowfast.slow_fast_sizes(height, width, num_slow=num_slow, num_fast=num_fast)
        assert (sizes.slow_tokens_searched, sizes.slow_size, sizes.fast_size) == (
            ref_t, ref_slow, ref_fast), (num_slow, num_fast)


def test_slow_token_search_with_other_bounds_equals_package(monkeypatch):
    ele = dict(min_pixels=64 * 784, max_pixels=1024 * 784, video_total_pixels=32768 * 784)
    for num_slow, num_fast in COUNTS:
        ref_t, ref_slow, ref_fast = _package_budget(monkeypatch, num_slow, num_fast, 1080, 1920,
                                                    **ele)
        sizes = slowfast.slow_fast_sizes(1080, 1920, num_slow=num_slow, num_fast=num_fast,
                                         min_tokens=64, max_tokens=1024, total_tokens=32768)
        assert (sizes.slow_tokens_searched, sizes.slow_size, sizes.fast_size) == (
            ref_t, ref_slow, ref_fast), (num_slow, num_fast)


def test_slow_token_search_returns_first_count_over_budget():
    """The quirk, by hand: where the budget binds the result is the smallest t whose estimate
    is OVER 65,536 (t - 1 fits); where it does not, 768."""
    def estimate(s, f, t):
        return s * t + f * max(int(0.3 * t), 48)

    for num_slow, num_fast in COUNTS:
        t = slowfast.slow_token_budget(num_slow, num_fast)
        if estimate(num_slow, num_fast, 767) <= 65536:
            assert t == 768
        elif estimate(num_slow, num_fast, 48) > 65536:
            assert t == 48
        else:
            assert estimate(num_slow, num_fast, t) > 65536 >= estimate(num_slow, num_fast, t - 1)
    # 100 * 556 + 60 * int(166.8) = 65,560 > 65,536; 555 would fit (65,460).
    assert slowfast.slow_token_budget(100, 60) == 556


def test_frame_count_rule_equals_package():
    for total, fps in ((150, 30000 / 1001), (7, 1.0), (1, 25.0), (10_000, 2.0), (9, 3.0),
                       (100_000, 60.0), (123, 0.5)):
        for ele in ({}, {"max_frames": 17}, {"fps": 0.5}):
            ours = keye.num_sampled_frames(total, fps, fps=ele.get("fps", 2.0),
                                           max_frames=ele.get("max_frames"))
            assert ours == vp.smart_nframes(ele, total_frames=total, video_fps=fps)
            if ours:
                ref = torch.linspace(0, total - 1, ours).round().long().numpy()
                assert np.array_equal(keye.sample_frame_indices(total, ours), ref)
