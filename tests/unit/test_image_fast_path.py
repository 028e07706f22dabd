"""The one-pass patch path (``image.frames_to_patches``) and the copy-free decode: the same bits as
the step-by-step ``patchify(normalize(resize_and_pad(...)))`` that the HF-equality tests pin, the
uint8 hand-over form, and EXIF orientation still applied."""

from __future__ import annotations

import io

import numpy as np
import PIL.Image
import pytest
import torch

from megatron_vlm.data.image import (
    decode_image,
    frames_to_patches,
    navit_resize,
    normalize,
    patchify,
    process_image,
    resize_and_pad,
)


@pytest.mark.parametrize("seed", range(6))
def test_frames_to_patches_equals_the_steps(seed):
    rng = np.random.default_rng(seed)
    t = int(rng.integers(1, 4))
    height, width = (int(v) for v in rng.integers(9, 400, 2))
    frames = rng.integers(0, 256, (t, height, width, 3), dtype=np.uint8)
    budget = int(rng.choice([16, 64, 256, 4096]))
    resized, padded = navit_resize(height, width, max_patches=budget)
    want = patchify(normalize(resize_and_pad(frames, resized, padded)))
    got = frames_to_patches(frames, resized, padded)
    assert got.dtype == torch.float32 and torch.equal(got, want)
    raw = frames_to_patches(frames, resized, padded, normalized=False)
    assert raw.dtype == torch.uint8 and torch.equal(normalize(raw), want)


def test_no_resize_no_pad_does_not_alias_the_input():
    frames = np.random.default_rng(0).integers(0, 256, (1, 28, 56, 3), dtype=np.uint8)
    raw = frames_to_patches(frames, (28, 56), (28, 56), normalized=False)
    raw.fill_(7)
    assert frames.max() > 7  # the caller's frames are untouched


def test_uint8_process_image_normalises_to_the_float_path():
    rng = np.random.default_rng(1)
    img = rng.integers(0, 256, (300, 500, 3), dtype=np.uint8)
    buf = io.BytesIO()
    PIL.Image.fromarray(img).save(buf, format="JPEG", quality=90)
    a = process_image(buf.getvalue(), max_patches=256)
    b = process_image(buf.getvalue(), max_patches=256, normalized=False)
    assert b.pixel_values.dtype == torch.uint8 and b.grid_thw == a.grid_thw
    assert torch.equal(normalize(b.pixel_values), a.pixel_values)


def test_exif_orientation_applied_and_array_writable():
    """Orientation 6 (camera turned clockwise) -> the pixels rotated 90 degrees clockwise."""
    img = np.random.default_rng(2).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    exif = PIL.Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    PIL.Image.fromarray(img).save(buf, format="PNG", exif=exif)
    out = decode_image(buf.getvalue())
    assert out.shape == (30, 20, 3) and np.array_equal(out, np.rot90(img, k=-1))
    assert out.flags.writeable
    upright = io.BytesIO()
    PIL.Image.fromarray(img).save(upright, format="PNG")
    plain = decode_image(upright.getvalue())
    assert np.array_equal(plain, img) and plain.flags.writeable


def test_encoded_image_through_pil_buffer_equals_the_steps():
    """Bytes in: PIL's own RGBX buffer goes to the resize without a copy (4 channels here) and
    gives the bits of the packed RGB array through the step-by-step path."""
    from megatron_vlm.data.image import _decode_pixels

    rng = np.random.default_rng(3)
    img = rng.integers(0, 256, (333, 517, 3), dtype=np.uint8)
    buf = io.BytesIO()
    PIL.Image.fromarray(img).save(buf, format="JPEG", quality=90)
    data = buf.getvalue()
    rgbx = _decode_pixels(data, rgbx=True)
    assert rgbx.shape == (333, 517, 4)
    rgb = decode_image(data)
    assert np.array_equal(rgbx[..., :3], rgb)
    for budget in (64, 256, 16384):  # downscaled twice, and no resize at all
        resized, padded = navit_resize(333, 517, max_patches=budget)
        want = patchify(normalize(resize_and_pad(rgb, resized, padded)))
        assert torch.equal(process_image(data, max_patches=budget).pixel_values, want)


@pytest.mark.parametrize("height, width, channels", [(9, 13, 3), (14, 28, 4), (27, 400, 4),
                                                     (56, 56, 3), (700, 29, 3)])
def test_edge_sizes_equal_the_steps(height, width, channels):
    """Frames under one patch, exact multiples, one partial patch row/column; RGBX input (the
    fourth byte ignored) gives the bits of its RGB channels."""
    frames = np.random.default_rng(height).integers(0, 256, (2, height, width, channels),
                                                   dtype=np.uint8)
    for budget in (4, 64, 16384):
        resized, padded = navit_resize(height, width, max_patches=budget)
        want = patchify(normalize(resize_and_pad(frames[..., :3], resized, padded)))
        assert torch.equal(frames_to_patches(frames, resized, padded), want)
