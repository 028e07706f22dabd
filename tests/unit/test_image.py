"""Image sizing/patchify vs transformers' Kimi K2.5 rules, decoding, and the skip policy.

HF's ``Kimi_K25ImageProcessor`` imports torchvision (no CPU build for the pinned torch), so its
outputs come from a fixture written by tests/fixtures/make_kimi_processor_fixture.py with the pinned
transformers; the other expectations are derived by hand from the written rules.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
import torch
from hf_processor_fixture import kimi_processor_arrays, kimi_processor_fixture

from megatron_vlm.data.image import (
    decode_image,
    grid_for_size,
    navit_resize,
    normalize,
    num_image_tokens,
    patchify,
    process_image,
    unpatchify,
)
from megatron_vlm.data.media_errors import (
    BadSampleError,
    MediaDecodeError,
    MediaMissingError,
    SkipCounter,
    SkipReason,
)


def _encode(img: np.ndarray | PIL.Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    pil = img if isinstance(img, PIL.Image.Image) else PIL.Image.fromarray(img)
    pil.save(buf, format=fmt)
    return buf.getvalue()


# ------------------------------------------------------------------------------------ sizing


def test_navit_resize_equals_hf_on_many_sizes():
    rows = kimi_processor_fixture()["navit_resize"]
    assert len(rows) == 2496
    for h, w, budget, per_side, *want in rows:
        (rh, rw), (ph, pw) = navit_resize(h, w, 14, 2, budget, per_side)
        assert [rh, rw, ph, pw] == want, (h, w, budget, per_side)


def test_processed_images_equal_the_hf_image_processor():
    """Grids and pixel values (pad to 28, normalise, (row, col) patch order) of images that need
    no resize equal ``Kimi_K25ImageProcessor``'s."""
    fixture, arrays = kimi_processor_fixture(), kimi_processor_arrays()
    assert fixture["image_processor"]["max_patches"] == 16384
    for k, case in enumerate(fixture["images"]):
        img = np.random.default_rng(case["seed"]).integers(
            0, 256, size=(case["height"], case["width"], 3), dtype=np.uint8)
        ours = process_image(img)
        assert [list(ours.grid_thw)] == case["image_grid_thw"]
        want = torch.from_numpy(arrays[f"image_{k}_pixels"])
        assert ours.pixel_values.shape == want.shape
        torch.testing.assert_close(ours.pixel_values, want, atol=1e-6, rtol=0)


def test_navit_rules_by_hand():
    # 640x480, 16384 budget: 45*34 = 1530 whole patches -> scale 1 (never upscale);
    # pad (not round) to multiples of 28: 480 -> 504, 640 -> 644, i.e. a 36 x 46 patch grid.
    assert navit_resize(480, 640) == ((480, 640), (504, 644))
    assert grid_for_size(480, 640) == (36, 46)
    assert num_image_tokens(480, 640) == 36 * 46 // 4
    # Small images are padded up, never upscaled: 20x30 -> 28x56 -> grid 2x4 -> 2 tokens.
    assert navit_resize(20, 30) == ((20, 30), (28, 56))
    assert num_image_tokens(20, 30) == 2
    # 1000x1000 at 4096: 71*71 = 5041 patches, scale sqrt(4096/5041) = 0.9014 -> 901 px,
    # padded to 924 = 33*28 -> 66x66 = 4356 patches: padding can exceed the budget (HF does too).
    assert navit_resize(1000, 1000, max_patches=4096) == ((901, 901), (924, 924))
    # Per-side limit: 512 patches = 7168 px; a 20 x 100000 strip is scaled by 7168/100000, and
    # int() truncates 100000 * 0.07168 = 7167.999... to 7167 (height: max(1, int(1.43)) = 1).
    assert navit_resize(20, 100000) == ((1, 7167), (28, 7168))


# --------------------------------------------------------------------------------- transforms


def test_normalize_matches_formula():
    x = torch.arange(256, dtype=torch.uint8)
    got = normalize(x)
    assert got.dtype == torch.float32
    want = (x.double() / 255 - 0.5) / 0.5
    assert torch.allclose(got.double(), want, atol=1e-6, rtol=0)
    assert got[0] == -1.0 and got[255] == 1.0
    # HF's fused form, bit for bit.
    assert torch.equal(got, (x.float() - 127.5) / 127.5)


def test_patchify_raster_order_and_inverse():
    t, c, h, w = 2, 3, 3, 5
    x = torch.arange(t * c * h * 14 * w * 14, dtype=torch.float32).reshape(t, c, h * 14, w * 14)
    p = patchify(x)
    assert p.shape == (t * h * w, 3, 14, 14)
    for f in range(t):
        for r in range(h):
            for col in range(w):
                k = f * h * w + r * w + col
                assert torch.equal(p[k], x[f, :, r * 14 : (r + 1) * 14, col * 14 : (col + 1) * 14])
    assert torch.equal(unpatchify(p, (t, h, w)), x)


def test_process_image_no_resize_exact_pixels():
    # 56 x 84 px: 4*6 whole patches, no resize, no padding -> patches are the normalised pixels.
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, size=(56, 84, 3), dtype=np.uint8)
    out = process_image(img)
    assert out.grid_thw == (1, 4, 6)
    assert out.num_patches == 24 and out.num_tokens == 6
    assert out.pixel_values.shape == (24, 3, 14, 14)
    norm = (img.astype(np.float64) / 255 - 0.5) / 0.5
    for r in range(4):
        for c in range(6):
            want = norm[r * 14 : (r + 1) * 14, c * 14 : (c + 1) * 14].transpose(2, 0, 1)
            got = out.pixel_values[r * 6 + c].double().numpy()
            np.testing.assert_allclose(got, want, atol=1e-6)


def test_process_image_pads_bottom_right_with_minus_one():
    img = np.full((30, 50, 3), 255, dtype=np.uint8)
    out = process_image(img)
    assert out.resized_hw == (30, 50)
    assert out.grid_thw == (1, 4, 4)  # 30 -> 56, 50 -> 56
    full = unpatchify(out.pixel_values, out.grid_thw)[0]  # [3, 56, 56]
    assert torch.all(full[:, :30, :50] == 1.0)
    assert torch.all(full[:, 30:, :] == -1.0) and torch.all(full[:, :, 50:] == -1.0)


def test_downscale_keeps_content_orientation():
    # A horizontal gradient, downscaled: still constant along columns' rows and increasing in x,
    # and close to PIL's bicubic (a different implementation; +-3 levels).
    w, h = 300, 200
    ramp = np.tile(np.linspace(0, 255, w).astype(np.uint8), (h, 1))
    img = np.stack([ramp, ramp[::-1, ::-1], np.full_like(ramp, 77)], axis=-1)
    out = process_image(img, max_patches=64)
    (rh, rw), (ph, pw) = navit_resize(h, w, max_patches=64)
    assert out.resized_hw == (rh, rw)
    full = unpatchify(out.pixel_values, out.grid_thw)[0][:, :rh, :rw]
    ours = np.rint(full.numpy() * 127.5 + 127.5).astype(np.int32).transpose(1, 2, 0)
    pil = np.asarray(PIL.Image.fromarray(img).resize((rw, rh), PIL.Image.BICUBIC)).astype(np.int32)
    assert np.abs(ours - pil)[2:-2, 2:-2].max() <= 3
    assert np.all(ours[:, :, 2] == 77)


# ------------------------------------------------------------------------------------ decoding


def test_decode_formats_and_alpha():
    rng = np.random.default_rng(2)
    img = rng.integers(0, 256, size=(20, 30, 3), dtype=np.uint8)
    assert np.array_equal(decode_image(_encode(img, "PNG")), img)
    jpg = decode_image(_encode(img, "JPEG"))
    assert jpg.shape == (20, 30, 3) and jpg.dtype == np.uint8
    gray = decode_image(_encode(PIL.Image.fromarray(img[:, :, 0], mode="L"), "PNG"))
    assert np.array_equal(gray, np.repeat(img[:, :, :1], 3, axis=2))
    # Transparent pixels are composited on white (HF convert_to_rgb).
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[0, 0] = (10, 20, 30, 255)
    out = decode_image(_encode(PIL.Image.fromarray(rgba, mode="RGBA"), "PNG"))
    assert tuple(out[0, 0]) == (10, 20, 30) and tuple(out[1, 1]) == (255, 255, 255)


def test_decode_file_and_missing(tmp_path):
    img = np.zeros((14, 14, 3), dtype=np.uint8)
    path = tmp_path / "a.png"
    path.write_bytes(_encode(img, "PNG"))
    assert decode_image(path).shape == (14, 14, 3)
    with pytest.raises(MediaMissingError) as err:
        decode_image(tmp_path / "nope.jpg")
    assert err.value.reason == SkipReason.MISSING_FILE


def test_seeded_corruption_gives_exact_skip_counts(tmp_path):
    rng = np.random.default_rng(3)
    good = rng.integers(0, 256, size=(40, 60, 3), dtype=np.uint8)
    jpeg, png = _encode(good, "JPEG"), _encode(good, "PNG")
    samples: list[bytes | Path] = []
    expected = {"ok": 0, SkipReason.IMAGE_DECODE: 0, SkipReason.MISSING_FILE: 0}
    for i in range(40):
        kind = int(rng.integers(0, 6))
        if kind == 0:
            samples.append(jpeg)
            expected["ok"] += 1
        elif kind == 1:
            samples.append(png)
            expected["ok"] += 1
        elif kind == 2:
            samples.append(jpeg[: len(jpeg) // 2])  # truncated JPEG
            expected[SkipReason.IMAGE_DECODE] += 1
        elif kind == 3:
            samples.append(png[: len(png) // 2])  # truncated PNG
            expected[SkipReason.IMAGE_DECODE] += 1
        elif kind == 4:
            samples.append(rng.bytes(int(rng.integers(0, 2000))))  # random bytes
            expected[SkipReason.IMAGE_DECODE] += 1
        else:
            samples.append(tmp_path / f"missing_{i}.jpg")
            expected[SkipReason.MISSING_FILE] += 1
    counter = SkipCounter(warn_every=0)
    results = [counter.guard(process_image, s) for s in samples]
    assert sum(r is not None for r in results) == expected["ok"]
    assert dict(counter.counts) == {k: v for k, v in expected.items() if k != "ok" and v}
    assert counter.total == 40 - expected["ok"]
    metrics = counter.as_metrics()
    assert metrics["data/skipped/total"] == counter.total


def test_decompression_bomb_is_a_skip(monkeypatch):
    monkeypatch.setattr(PIL.Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(MediaDecodeError) as err:
        decode_image(_encode(np.zeros((20, 20, 3), dtype=np.uint8), "PNG"))
    assert err.value.reason == SkipReason.IMAGE_TOO_LARGE


def test_skip_counter_warns_one_line_every_n(caplog):
    counter = SkipCounter(warn_every=4, name="mix")
    with caplog.at_level(logging.WARNING, logger="megatron_vlm.data"):
        for i in range(10):
            counter.record(MediaDecodeError(f"bad {i}\nsecond line"))
        counter.record(ValueError("a bug"))  # not a BadSampleError: counted by type name
    assert len(caplog.records) == 2
    for rec in caplog.records:
        assert rec.exc_info is None and "\n" not in rec.getMessage()
    assert "mix: skipped 8 samples (image_decode=8); last: image_decode: bad 7" == (
        caplog.records[1].getMessage()
    )
    assert counter.counts == {"image_decode": 10, "error:ValueError": 1}
    # guard: BadSampleError -> None and counted; other errors propagate.
    assert counter.guard(lambda: (_ for _ in ()).throw(BadSampleError("x", reason="r"))) is None
    assert counter.counts["r"] == 1
    with pytest.raises(ZeroDivisionError):
        counter.guard(lambda: 1 / 0)
    # energon-style handler signature, state round trip, merge.
    counter.energon_handler(MediaMissingError("gone"), {"__key__": "k"}, None)
    restored = SkipCounter()
    restored.load_state_dict(counter.state_dict())
    assert restored.counts == counter.counts
    restored.merge({"image_decode": 1})
    assert restored.counts["image_decode"] == 11
