"""Keye-VL 1.5 style SlowFast: labels on clips with a known static part and a known cut, the
reference-frame rule, chunks that never mix slow and fast frames, the fast grid (at most 30% of
the slow one) and the token budget search (both against brute force), the uniform path as the
all-slow limit, and the template markers (never loss targets)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from megatron_vlm.data.image import grid_for_size, navit_resize
from megatron_vlm.data.kimi_tokenizer import SpecialTokensTokenizer
from megatron_vlm.data.media_errors import BadSampleError, SkipReason
from megatron_vlm.data.slowfast import (
    allocate_budget,
    classify_frames,
    fast_budget,
    frame_chunks,
    patch_similarity,
    plan_slowfast,
    process_slowfast,
    slowfast_segments,
)
from megatron_vlm.data.templates import SpecialToken, Text, tokenize_interleaved
from megatron_vlm.data.video import chunk_frames


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


def _areas(h: int, w: int, max_p: int) -> np.ndarray:
    """[max_p + 1] padded grid area (patches) of navit_resize at every budget (index 0 unused)."""
    out = np.zeros(max_p + 1, dtype=np.int64)
    for p in range(1, max_p + 1):
        _, (ph, pw) = navit_resize(h, w, max_patches=p)
        out[p] = (ph // 14) * (pw // 14)
    return out


def _brute_fast(areas: np.ndarray, slow_area: int) -> int:
    """Largest budget whose grid has <= int(0.3 * slow area) patches, else 1 (from the table)."""
    fits = np.flatnonzero(areas[1 : slow_area + 1] <= int(0.3 * slow_area)) + 1
    return int(fits.max()) if fits.size else 1


def test_chunks_never_mix_slow_and_fast():
    labels = [True, False, False, False, False, False, True, False, False, True, True, True]
    assert frame_chunks(labels) == [(0, 1), (1, 5), (5, 6), (6, 7), (7, 9), (9, 12)]
    assert frame_chunks(labels, temporal_patch_size=1) == [(i, i + 1) for i in range(12)]
    assert frame_chunks([True] * 9) == [(0, 4), (4, 8), (8, 9)]  # = uniform chunking
    assert frame_chunks([]) == []


def test_fast_grid_is_the_largest_within_thirty_percent():
    # By hand: 224x168 px -> slow grid 12 x 16 = 192 patches (48 tokens); 30% = 57 patches.
    # Budget 45: scale sqrt(45/192) -> 81x108 px -> padded 84x112 -> 6 x 8 = 48 patches; budget
    # 50: 85x114 -> 112x140 -> 80 patches > 57. So fast frames get 6 x 8 (12 tokens = 25%).
    p = fast_budget((168, 224), (12, 16))
    assert grid_for_size(168, 224, p) == (6, 8)
    assert grid_for_size(168, 224, p + 1)[0] * grid_for_size(168, 224, p + 1)[1] > 57
    # 112x84 px (the bundled clips): slow 6 x 8 = 48 patches, 30% = 14: budgets 4-5 give 2 x 4.
    assert fast_budget((84, 112), (6, 8)) == 5 and grid_for_size(84, 112, 5) == (2, 4)
    # Tiny slow grid: nothing fits 30% of 4 patches -> the smallest grid (budget 1, 1 token).
    assert fast_budget((20, 20), (2, 2)) == 1
    # Against brute force over every budget, on several frame sizes and slow budgets.
    for h, w in [(168, 224), (480, 640), (84, 112), (1000, 300), (57, 913)]:
        areas = _areas(h, w, 1200)
        for slow_p in (1, 7, 64, 300, 1200):
            slow = grid_for_size(h, w, slow_p)
            got = fast_budget((h, w), slow)
            assert got == _brute_fast(areas, slow[0] * slow[1]), (h, w, slow_p)


@pytest.mark.parametrize("total", [3, 6, 40, 100, 333, 1000, 5000])
def test_budget_is_the_largest_that_fits(total):
    h, w = 280, 420  # 20 x 30 = 600 whole patches
    is_slow = np.array([True, False, False, True, False, False, False])
    # chunks: S | F F | S | F F F -> 2 slow and 2 fast chunks (a chunk costs h*w/4 at any t)
    areas = _areas(h, w, 400)

    def cost(p: int) -> int:
        return (2 * areas[p] + 2 * areas[_brute_fast(areas, int(areas[p]))]) // 4

    fitting = [p for p in range(1, 401) if cost(p) <= total]
    if not fitting:
        with pytest.raises(BadSampleError) as err:
            allocate_budget((h, w), is_slow, total, max_slow_patches=400)
        assert err.value.reason == SkipReason.TOO_LONG
        return
    slow_p, fast_p = allocate_budget((h, w), is_slow, total, max_slow_patches=400)
    assert slow_p == max(fitting)  # the largest fitting budget, by brute force
    assert fast_p == _brute_fast(areas, int(areas[slow_p]))


def test_budget_too_small_is_a_skip():
    with pytest.raises(BadSampleError) as err:
        allocate_budget((448, 448), np.ones(8, dtype=bool), total_tokens=1)
    assert err.value.reason == SkipReason.TOO_LONG  # 2 chunks need >= 2 tokens


def test_all_slow_frames_equal_the_uniform_path():
    rng = np.random.default_rng(3)
    frames = rng.integers(0, 256, size=(9, 70, 98, 3), dtype=np.uint8)  # every frame a cut
    stamps = [0.5 * i for i in range(9)]
    plan = plan_slowfast(frames, total_tokens=None)
    assert plan.is_slow.all() and plan.chunks == [(0, 4), (4, 8), (8, 9)]
    got = process_slowfast(frames, stamps, plan)
    want = chunk_frames(frames, stamps, max_patches=4096)
    assert [c.grid_thw for c in got] == [c.grid_thw for c in want] == [(4, 6, 8), (4, 6, 8),
                                                                       (1, 6, 8)]
    assert [c.timestamp for c in got] == [0.0, 2.0, 4.0] and not any(c.is_fast for c in got)
    for a, b in zip(got, want):
        assert torch.equal(a.pixel_values, b.pixel_values)


def test_plan_chunks_and_template_markers():
    frames = static_then_cut()  # 112 x 140 px: S F F F | S F F
    plan = plan_slowfast(frames, total_tokens=None)
    assert plan.labels == ["slow", "fast", "fast", "fast", "slow", "fast", "fast"]
    assert plan.chunks == [(0, 1), (1, 4), (4, 5), (5, 7)]
    slow, fast = (8, 10), grid_for_size(112, 140, _brute_fast(_areas(112, 140, 80), 80))
    assert plan.grids == [(1, *slow), (3, *fast), (1, *slow), (2, *fast)]
    assert fast[0] * fast[1] <= 0.3 * 80  # <= 30% of the slow patches (and tokens)
    stamps = [0.5 * i for i in range(7)]
    items = process_slowfast(frames, stamps, plan)
    assert [it.grid_thw for it in items] == plan.grids
    assert [it.timestamp for it in items] == [0.0, 0.5, 2.0, 2.5]
    assert [it.is_fast for it in items] == [False, True, False, True]
    # Pixels: a fast chunk is its frames resized at the fast budget, frame by frame.
    (want,) = chunk_frames(frames[1:4], stamps[1:4], max_patches=plan.fast_max_patches)
    assert torch.equal(items[1].pixel_values, want.pixel_values)
    segs = slowfast_segments(items)
    names = [s.name if isinstance(s, SpecialToken) else ("F" if s.is_fast else "S")
             for s in segs]
    assert names == ["S", "fast_start", "F", "fast_end", "S", "fast_start", "F", "fast_end"]

    class Chars:
        vocab_size, eos_id, pad_id = 256, 0, 0

        def encode(self, text: str) -> list[int]:
            return list(text.encode())

    tok = SpecialTokensTokenizer(Chars())
    ids = tok.media_token_ids()
    out = tokenize_interleaved([Text("clip: ", loss=False), *segs, Text(" done")], tok, ids,
                               markers_loss=True)
    assert [s.length for s in out.placeholder_spans] == plan.num_tokens
    marker = np.isin(out.tokens, [ids.fast_start, ids.fast_end])
    assert marker.sum() == 4
    # Wrapper tokens are targets (markers_loss=True), the SlowFast markers never are.
    assert not out.target_mask[marker].any()
    assert out.target_mask[out.tokens == ids.media_end].all()
    assert not out.loss_mask()[np.flatnonzero(marker) - 1].any()
