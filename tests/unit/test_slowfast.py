"""Keye-VL 1.5 style SlowFast: labels on clips with a known static part and a known cut, the
reference-frame rule, the token budget search, and the template markers."""

from __future__ import annotations

import numpy as np
import pytest

from megatron_vlm.data.image import navit_resize
from megatron_vlm.data.kimi_tokenizer import SpecialTokensTokenizer
from megatron_vlm.data.media_errors import BadSampleError, SkipReason
from megatron_vlm.data.slowfast import (
    allocate_budget,
    classify_frames,
    patch_similarity,
    plan_slowfast,
    process_slowfast,
    slowfast_segments,
)
from megatron_vlm.data.templates import SpecialToken, tokenize_interleaved
from megatron_vlm.data.video import VideoChunk


def scene(seed: int, h: int = 112, w: int = 140) -> np.ndarray:
    """Blocky random texture (8 px blocks survive H.264)."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(h // 8 + 1, w // 8 + 1, 3), dtype=np.uint8)
    return np.repeat(np.repeat(blocks, 8, 0), 8, 1)[:h, :w]


def static_then_cut(noise: int = 2) -> np.ndarray:
    """Frames 0-3: scene A (+-noise), frame 4: a cut to scene B, frames 5-6: scene B."""
    rng = np.random.default_rng(7)
    a, b = scene(1), scene(2)
    frames = [a, a, a, a, b, b, b]
    noisy = [
        np.clip(f.astype(np.int16) + rng.integers(-noise, noise + 1, f.shape), 0, 255)
        for f in frames
    ]
    return np.stack(noisy).astype(np.uint8)


def test_patch_similarity_counts_changed_patches():
    a = np.zeros((28, 42, 3), dtype=np.uint8)  # 2 x 3 = 6 patches
    b = a.copy()
    assert patch_similarity(a, b) == 1.0
    b[0:14, 0:14] = 255  # one patch changed
    assert patch_similarity(a, b) == pytest.approx(5 / 6)
    b[20, 30] = 255  # one pixel of another patch: mean diff 255/196 = 1.3 <= 8: unchanged
    assert patch_similarity(a, b) == pytest.approx(5 / 6)


def test_static_part_and_cut():
    frames = static_then_cut()
    is_slow, sim, ref = classify_frames(frames)
    assert is_slow.tolist() == [True, False, False, False, True, False, False]
    assert ref.tolist() == [-1, 0, 0, 0, 0, 4, 4]
    assert np.isnan(sim[0]) and np.all(sim[[1, 2, 3, 5, 6]] == 1.0) and sim[4] < 0.1


def test_static_part_and_cut_through_h264(tmp_path):
    av = pytest.importorskip("av")
    from megatron_vlm.data.video import decode_video

    frames = static_then_cut(noise=0)
    path = tmp_path / "cut.mp4"
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=2)
        stream.width, stream.height, stream.pix_fmt = 140, 112, "yuv420p"
        stream.options = {"crf": "20", "preset": "ultrafast"}
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    decoded = decode_video(path)
    assert decoded.frames.shape[0] == 7
    is_slow, _, _ = classify_frames(decoded.frames)
    assert is_slow.tolist() == [True, False, False, False, True, False, False]


def test_reference_is_latest_slow_frame_not_previous():
    # 10 x 10 = 100 patches; every frame permanently changes 2 more patches. Against the previous
    # frame the similarity is always 0.98 (fast); against the latest slow frame s it is
    # 1 - 0.02 * (i - s), > 0.95 only for i - s <= 2: slow frames at 0, 3, 6, 9.
    frames = np.zeros((10, 140, 140, 3), dtype=np.uint8)
    for i in range(1, 10):
        frames[i] = frames[i - 1]
        for k in (2 * i - 2, 2 * i - 1):
            r, c = divmod(k, 10)
            frames[i, r * 14 : (r + 1) * 14, c * 14 : (c + 1) * 14] = 200
    is_slow, sim, ref = classify_frames(frames, reference="last_slow")
    assert np.flatnonzero(is_slow).tolist() == [0, 3, 6, 9]
    assert ref.tolist() == [-1, 0, 0, 0, 3, 3, 3, 6, 6, 6]
    np.testing.assert_allclose(sim[1:], [0.98, 0.96, 0.94, 0.98, 0.96, 0.94, 0.98, 0.96, 0.94])
    is_slow_prev, sim_prev, _ = classify_frames(frames, reference="previous")
    assert np.flatnonzero(is_slow_prev).tolist() == [0]
    np.testing.assert_allclose(sim_prev[1:], 0.98)


def _tokens(h: int, w: int, p: int) -> int:
    _, (ph, pw) = navit_resize(h, w, max_patches=p)
    return (ph // 14) * (pw // 14) // 4


@pytest.mark.parametrize("total", [40, 100, 333, 1000, 5000])
def test_budget_is_the_largest_that_fits(total):
    h, w = 448, 672  # 32 x 48 = 1536 whole patches
    is_slow = np.array([True, False, False, True, False, False, False])
    slow_p, fast_p = allocate_budget((h, w), is_slow, total, fast_ratio=0.3, max_slow_patches=4096)
    assert fast_p == max(1, int(0.3 * slow_p))

    def cost(p: int) -> int:
        return 2 * _tokens(h, w, p) + 5 * _tokens(h, w, max(1, int(0.3 * p)))

    # Brute force over every budget: the search returns the largest fitting one.
    fitting = [p for p in range(1, 4097) if cost(p) <= total]
    assert slow_p == max(fitting)


def test_budget_too_small_is_a_skip():
    with pytest.raises(BadSampleError) as err:
        allocate_budget((448, 448), np.ones(8, dtype=bool), total_tokens=7)
    assert err.value.reason == SkipReason.TOO_LONG


def test_plan_items_and_template_markers():
    frames = static_then_cut()
    plan = plan_slowfast(frames, total_tokens=60)
    assert plan.labels == ["slow", "fast", "fast", "fast", "slow", "fast", "fast"]
    assert plan.max_patches == [plan.slow_max_patches if s else plan.fast_max_patches
                                for s in plan.is_slow]
    assert sum(plan.num_tokens) <= 60
    slow_tokens = plan.num_tokens[0]
    assert all(n < slow_tokens for n, s in zip(plan.num_tokens, plan.is_slow) if not s)
    stamps = [0.5 * i for i in range(7)]
    items = process_slowfast(frames, stamps, plan)
    assert all(isinstance(it, VideoChunk) and it.grid_thw[0] == 1 for it in items)
    assert [it.grid_thw[1:] for it in items] == plan.grids
    assert [it.timestamp for it in items] == stamps
    segs = slowfast_segments(items, plan.is_slow)
    names = [s.name if isinstance(s, SpecialToken) else ("S" if s is items[0] or s is items[4]
                                                         else "F") for s in segs]
    assert names == ["S", "fast_start", "F", "F", "F", "fast_end", "S", "fast_start", "F", "F",
                     "fast_end"]

    class Chars:
        vocab_size, eos_id, pad_id = 256, 0, 0

        def encode(self, text: str) -> list[int]:
            return list(text.encode())

    tok = SpecialTokensTokenizer(Chars())
    ids = tok.media_token_ids()
    out = tokenize_interleaved(segs, tok, ids)
    assert [s.length for s in out.placeholder_spans] == plan.num_tokens
    assert (out.tokens == ids.fast_start).sum() == 2 and (out.tokens == ids.fast_end).sum() == 2
