"""``data.multimodal.image_min_patches``: small images upscaled (aspect kept) to at least N
patches, within ``image_max_patches``; off by default.

Expectations are computed independently of ``navit_resize``'s float arithmetic: sizes by hand or
with exact integer arithmetic (the smallest side ``n`` with ``n^2 * w >= N * 14^2 * h``), pixels
by PIL's bicubic resize (another implementation of the same kernel), the placeholder count from
the grid by the 2x2 merge.
"""

from __future__ import annotations

import io
import json
import math

import numpy as np
import PIL.Image
import pytest

from megatron_vlm.config.data_mm import MultimodalDataConfig
from megatron_vlm.data.image import grid_for_size, navit_resize, process_image, unpatchify
from megatron_vlm.data.kimi_tokenizer import SpecialTokensTokenizer
from megatron_vlm.data.mm_encode import EncodeSettings, decode_document, plan_document
from megatron_vlm.data.shards import FORMAT


def _padded(side: int) -> int:
    return -(-side // 28) * 28


def _upscaled_side(side: int, other: int, min_patches: int) -> int:
    """Smallest integer ``n`` with ``n / side >= sqrt(N * 196 / (side * other))``, i.e.
    ``n^2 * other >= N * 196 * side``: exact integers, no float rounding."""
    need = -(-(min_patches * 196 * side) // other)  # ceil(N*196*side / other)
    return math.isqrt(need - 1) + 1


def test_sizes_by_hand() -> None:
    # 56 x 224 px = 4 x 16 = 64 patches; at 256 the area scale is 4, i.e. x2 per side, exactly.
    assert navit_resize(56, 224, max_patches=256, min_patches=256) == ((112, 448), (112, 448))
    assert grid_for_size(56, 224, max_patches=256, min_patches=256) == (8, 32)
    # 100 x 150: x sqrt(256*196/15000) = 1.82897 -> 182.9 -> 183, 274.3 -> 275; padded to
    # 196 x 280 = 14 x 20 = 280 patches >= 256 (padding overshoots, as in the downscale rule).
    assert navit_resize(100, 150, max_patches=400, min_patches=256) == ((183, 275), (196, 280))
    # 224 x 224 already holds 16 x 16 = 256 patches: unchanged.
    assert navit_resize(224, 224, max_patches=256, min_patches=256) == ((224, 224), (224, 224))
    # 20 x 30 px pads to 28 x 56 = 2 x 4 = 8 patches; at min 8 it stays, at 9 it is upscaled
    # by sqrt(9*196/600) = 1.7146 -> 35 x 52 (34.3, 51.4 rounded up) -> padded 56 x 56.
    assert navit_resize(20, 30, min_patches=8) == ((20, 30), (28, 56))
    assert navit_resize(20, 30, min_patches=9) == ((35, 52), (56, 56))


def test_default_is_the_hf_rule() -> None:
    """min_patches=None leaves navit_resize as it was (test_image.py checks that against HF)."""
    rng = np.random.default_rng(0)
    for h, w in [tuple(int(v) for v in rng.integers(1, 3000, size=2)) for _ in range(300)]:
        for budget in (16384, 256, 16):
            assert navit_resize(h, w, max_patches=budget, min_patches=None) == navit_resize(
                h, w, max_patches=budget)


@pytest.mark.parametrize("min_patches", [16, 100, 256, 400, 1000])
def test_upscale_is_the_exact_area_rule(min_patches: int) -> None:
    rng = np.random.default_rng(min_patches)
    top = int(14 * math.sqrt(min_patches) * 1.5)  # sides around the target's
    sizes = [tuple(int(v) for v in rng.integers(1, top, size=2)) for _ in range(400)]
    sizes += [(1, 1), (14, 14), (27, 28), (1, 400), (400, 1), (56, 224)]
    upscaled = 0
    for h, w in sizes:
        (nh, nw), (ph, pw) = navit_resize(h, w, max_patches=4 * min_patches,
                                          min_patches=min_patches)
        plain_h, plain_w = navit_resize(h, w, max_patches=4 * min_patches)[1]
        if plain_h * plain_w >= min_patches * 196:  # big enough (or shrunk by the budget)
            assert (nh, nw) == navit_resize(h, w, max_patches=4 * min_patches)[0]
            continue
        upscaled += 1
        want = [min(7168, _upscaled_side(h, w, min_patches)),  # per-side limit: 512 patches
                min(7168, _upscaled_side(w, h, min_patches))]
        assert (nh, nw) == tuple(want), (h, w)
        assert (ph, pw) == (_padded(nh), _padded(nw))
        if 7168 not in want:
            assert ph * pw >= min_patches * 196  # the grid holds at least min_patches
    assert upscaled > 50


def test_the_budget_wins_when_rounding_up_would_cross_it() -> None:
    # 27 x 97 px (padded 28 x 112: 16 patches) at min = max = 20: x sqrt(20*196/2619) = 1.2234
    # -> 33.0, 118.7 -> 34 x 119 px = 2 x 8 = 16 whole patches: within 20, kept; padded 56 x 140.
    assert navit_resize(27, 97, max_patches=20, min_patches=20) == ((34, 119), (56, 140))
    # 20 x 20 px at min = max = 63: x sqrt(63*196/400) = 5.556 -> 111.1 -> 112 x 112 px = 8 x 8
    # = 64 whole patches > 63: the height (scaled as much as the width: first) drops to 111
    # (7 whole rows, 56 patches); padded 112 x 112 = 64 patches, still >= 63.
    assert navit_resize(20, 20, max_patches=63, min_patches=63) == ((111, 112), (112, 112))
    # Over many sizes with min = max, an upscaled image never holds more whole patches than the
    # budget, and is never smaller than the original on either side.
    rng = np.random.default_rng(7)
    upscaled = 0
    for _ in range(2000):
        h, w = (int(v) for v in rng.integers(1, 300, size=2))
        budget = int(rng.integers(1, 500))
        (nh, nw), (ph, pw) = navit_resize(h, w, max_patches=budget, min_patches=budget)
        plain = navit_resize(h, w, max_patches=budget)
        if (nh, nw) == plain[0]:
            assert (ph, pw) == plain[1]
            continue
        upscaled += 1
        assert plain[0] == (h, w)  # only images the budget did not shrink are upscaled
        assert (nh // 14) * (nw // 14) <= budget, (h, w, budget, nh, nw)
        assert nh >= h and nw >= w
    assert upscaled > 500


def test_pixels_are_the_bicubic_upscale() -> None:
    # Smooth content (PIL and torch's antialiased bicubic agree to a level or two there).
    h, w = 60, 90
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([xx * 255 // (w - 1), yy * 255 // (h - 1),
                    (xx + yy) * 255 // (h + w - 2)], axis=-1).astype(np.uint8)
    out = process_image(img, max_patches=256, min_patches=200)
    nh, nw = _upscaled_side(h, w, 200), _upscaled_side(w, h, 200)
    assert out.resized_hw == (nh, nw)
    assert out.grid_thw == (1, _padded(nh) // 14, _padded(nw) // 14)
    full = unpatchify(out.pixel_values, out.grid_thw)[0]
    ours = np.rint(full.numpy() * 127.5 + 127.5).astype(np.int32).transpose(1, 2, 0)
    pil = np.asarray(PIL.Image.fromarray(img).resize((nw, nh), PIL.Image.BICUBIC)).astype(int)
    assert np.abs(ours[:nh, :nw] - pil).max() <= 2
    assert np.all(ours[nh:] == 0) and np.all(ours[:, nw:] == 0)  # padding: -1.0 -> level 0


def test_config_refuses_bad_values() -> None:
    assert MultimodalDataConfig().image_min_patches is None
    MultimodalDataConfig(image_max_patches=256, image_min_patches=256)
    for bad in (0, -4, 257):
        with pytest.raises(ValueError, match="data.multimodal.image_min_patches"):
            MultimodalDataConfig(image_max_patches=256, image_min_patches=bad)
    with pytest.raises(ValueError, match="min_patches=300"):
        navit_resize(10, 10, max_patches=256, min_patches=300)


class _Bytes:
    """A byte-level text tokenizer (ids 0-255; EOS 256, pad 257)."""

    vocab_size, eos_id, pad_id = 258, 256, 257

    def encode(self, text: str) -> list[int]:
        return list(text.encode())


def test_planned_and_decoded_documents_agree_on_the_upscaled_grid() -> None:
    """The header plan (no decoding) and the decode after packing give the same grid, and the
    document holds h*w/4 placeholders of it."""
    buf = io.BytesIO()
    PIL.Image.fromarray(np.full((40, 70, 3), 90, np.uint8)).save(buf, format="PNG")
    record = {"format": FORMAT, "media": [{"type": "image", "ext": "png"}],
              "segments": [{"media": 0}, {"text": "a grey picture"}]}
    members = {"json": json.dumps(record).encode(), "m0.png": buf.getvalue()}
    tok = SpecialTokensTokenizer(_Bytes())
    cfg = MultimodalDataConfig(image_max_patches=256, image_min_patches=144)
    settings = EncodeSettings.from_config(cfg, seq_length=1024, pad_to_multiple=1)
    doc, media = plan_document(record, members, settings, tok, tok.media_token_ids())
    decoded = decode_document(doc, media, settings)  # raises if the grids disagree
    nh, nw = _upscaled_side(40, 70, 144), _upscaled_side(70, 40, 144)
    grid = (1, _padded(nh) // 14, _padded(nw) // 14)
    assert decoded.items[0].grid_thw == grid and decoded.items[0].resized_hw == (nh, nw)
    (span,) = doc.placeholder_spans
    assert span.length == grid[1] * grid[2] // 4
    plain = EncodeSettings.from_config(MultimodalDataConfig(image_max_patches=256), 1024, 1)
    small, _ = plan_document(record, members, plain, tok, tok.media_token_ids())
    assert small.placeholder_spans[0].length == 4 * 6 // 4  # 40 x 70 px pads to 56 x 84
    assert span.length > 4 * 144 // 4 // 4  # upscaled: at least 144 patches / 4
