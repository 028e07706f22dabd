"""The SlowFast video sampler through the real energon loader and into the tiny VLM.

1. Clips with a known static part and a known cut, prepared into shards and read back by
   ``MultimodalLoader(video_sampler="slowfast")``: the slow/fast pattern, chunk grids, token and
   patch counts, placeholder and marker positions, loss mask and pixels of the packed batch equal
   what the test derives from the rule by itself (labels from how the clips were made, budgets by
   brute force over every ``navit_resize`` budget, the Kimi template written out by hand).
2. A SlowFast batch of the bundled corpus (mixed slow/fast grids) goes through the tiny VLM's
   forward and backward: one projected feature per placeholder, gradients reach the vision tower.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_vlm.config.data_mm import MultimodalDataConfig, SlowFastConfig, StageMix
from megatron_vlm.data.corpus import bundled_corpus_dir
from megatron_vlm.data.image import navit_resize
from megatron_vlm.data.kimi_tokenizer import SpecialTokensTokenizer
from megatron_vlm.data.mm_loader import MultimodalLoader
from megatron_vlm.data.shards import prepare_dataset
from megatron_vlm.data.tokenizer import get_or_train_tokenizer
from megatron_vlm.data.video import chunk_frames, decode_video

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

H, W = 168, 224  # 12 x 16 whole patches: no resize at Kimi's 4096 budget
# How the clips are made (2 fps, sampled at 2 fps: every frame, 0.5 s apart).
# "cut": scene A for 6 frames (static), a cut to scene B for 3 frames, then 3 different scenes.
# "still": one scene for 5 frames (the video ends on a fast run).
CLIPS = {"cut": [1] * 6 + [2] * 3 + [10, 11, 12], "still": [3] * 5}
CAPTIONS = {"cut": "the red square moves left.", "still": "the blue circle stays."}
SLOW = {"cut": [1, 0, 0, 0, 0, 0, 1, 0, 0, 1, 1, 1], "still": [1, 0, 0, 0, 0]}
"""Expected labels, from the construction: a frame equal to the latest slow frame is fast."""
CHUNKS = {"cut": [(0, 1), (1, 5), (5, 6), (6, 7), (7, 9), (9, 12)], "still": [(0, 1), (1, 5)]}
"""Runs of one kind cut into chunks of <= 4 frames."""


def scene(seed: int) -> np.ndarray:
    """Blocky random texture (8 px blocks survive H.264)."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(H // 8 + 1, W // 8 + 1, 3), dtype=np.uint8)
    return np.repeat(np.repeat(blocks, 8, 0), 8, 1)[:H, :W]


def encode_clip(frames: np.ndarray) -> bytes:
    import io

    import av

    buf = io.BytesIO()
    with av.open(buf, "w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=2)
        stream.width, stream.height, stream.pix_fmt = W, H, "yuv420p"
        stream.options = {"crf": "18", "preset": "veryfast", "threads": "1"}
        for f in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(f, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> SpecialTokensTokenizer:
    spm = get_or_train_tokenizer(bundled_corpus_dir(), tmp_path_factory.mktemp("spm"), 1024, 0)
    return SpecialTokensTokenizer(spm)


@pytest.fixture(scope="module")
def clips(tmp_path_factory) -> Path:
    raw = tmp_path_factory.mktemp("raw")
    records = []
    for name, seeds in CLIPS.items():
        (raw / f"{name}.mp4").write_bytes(encode_clip(np.stack([scene(s) for s in seeds])))
        records.append({"id": name, "video": f"{name}.mp4", "caption": CAPTIONS[name]})
    (raw / "clips.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    root = tmp_path_factory.mktemp("prepared")
    prepare_dataset({"train": [raw / "clips.jsonl"]}, root / "clips", name="clips",
                    progress=False, verbose=False)
    return root


# ---------------------------------------------------------------- the rule, written out again


def grid_area(p: int) -> tuple[int, int]:
    _, (ph, pw) = navit_resize(H, W, max_patches=p)
    return ph // 14, pw // 14


def expected_budgets(chunks: list[tuple[int, int]], slow: list[int],
                     total: int | None) -> tuple[int, int]:
    """(slow budget, fast budget) by brute force: fast = the largest budget whose grid has at most
    30% of the slow grid's patches; slow = the largest budget <= 4096 whose chunks fit ``total``
    tokens (a chunk costs h*w/4 whatever its length)."""
    area = {p: grid_area(p)[0] * grid_area(p)[1] for p in range(1, 4097)}

    def fast(slow_p: int) -> int:
        fits = [q for q in range(1, area[slow_p] + 1) if area[q] <= int(0.3 * area[slow_p])]
        return max(fits) if fits else 1

    kinds = [bool(slow[a]) for a, _ in chunks]
    best = 0
    for p in range(1, 4097) if total is not None else [4096]:
        f = fast(p)
        cost = sum(area[p] if s else area[f] for s in kinds) // 4
        if total is None or cost <= total:
            best = p
    return best, fast(best)


def hhmmss(seconds: float) -> str:
    ms = round(seconds * 1000)
    return f"{ms // 3_600_000:02d}:{ms // 60_000 % 60:02d}:{ms // 1000 % 60:02d}.{ms % 1000:03d}"


def expected_document(name: str, tok: SpecialTokensTokenizer, total: int | None):
    """Token ids, per-token 'may be a target' flags, per-chunk (t, h, w) and fast flags."""
    ids = tok.media_token_ids()
    slow_p, fast_p = expected_budgets(CHUNKS[name], SLOW[name], total)
    tokens: list[int] = []
    target: list[bool] = []
    grids, fast_flags = [], []

    def add(new: list[int], may_target: bool) -> None:
        tokens.extend(new)
        target.extend([may_target] * len(new))

    previous_fast = False
    for a, b in CHUNKS[name]:
        fast = not SLOW[name][a]
        if fast and not previous_fast:
            add([ids.fast_start], False)
        if not fast and previous_fast:
            add([ids.fast_end], False)
        h, w = grid_area(fast_p if fast else slow_p)
        add(tok.encode(hhmmss(0.5 * a)), True)
        add([ids.media_begin], True)
        add(tok.encode("video"), True)
        add([ids.media_content], True)
        add([ids.video_placeholder] * (h * w // 4), False)
        add([ids.media_end], True)
        grids.append((b - a, h, w))
        fast_flags.append(fast)
        previous_fast = fast
    if previous_fast:
        add([ids.fast_end], False)
    add(tok.encode(CAPTIONS[name]), True)
    add([tok.eos_id], True)
    return tokens, target, grids, fast_flags, (slow_p, fast_p)


# ------------------------------------------------------------------------------------- tests


@pytest.mark.parametrize("max_video_tokens", [None, 100])
def test_loader_slowfast_pattern_grids_tokens_and_markers(clips, tok, max_video_tokens):
    cfg = MultimodalDataConfig(
        root=str(clips), num_workers=0, shuffle_buffer_size=1, packing_buffer_size=8,
        max_patches_per_micro_batch=4096, mixes={"c": StageMix(weights={"clips": 1})},
        stage="c", video_sampler="slowfast",
        slowfast=SlowFastConfig(max_video_tokens=max_video_tokens))
    with MultimodalLoader(cfg, tok, seq_length=512, global_batch_size=1, dp_rank=0, dp_size=1,
                          seed=0, one_pass=True) as mm:
        packs = list(mm.packs())
    assert sorted(i for p in packs for i in p.sample_ids) == ["cut", "still"]
    ids = tok.media_token_ids()
    for pack in packs:
        batch, vision = pack.batch, pack.batch.vision
        tokens = batch.tokens[0].numpy()
        loss = batch.loss_mask[0].numpy()
        labels = batch.labels[0].numpy()
        starts = batch.cu_seqlens_padded.tolist()
        item = 0
        for d, name in enumerate(pack.sample_ids):
            want, target, grids, fast, budgets = expected_document(name, tok, max_video_tokens)
            if max_video_tokens is None:  # the budget does not bind: slow frames at full size
                assert budgets[0] == 4096 and grid_area(budgets[0]) == (12, 16)
            doc = slice(starts[d], starts[d] + len(want))
            assert tokens[doc].tolist() == want, name
            # Loss: position i predicts token i+1 -- never a marker or a placeholder, and a
            # placeholder predicts nothing; every other target of the document is trained on.
            want_loss = np.zeros(len(want), dtype=np.float32)
            want_loss[:-1] = np.asarray(target[1:]) & (np.asarray(want[:-1]) !=
                                                       ids.video_placeholder)
            np.testing.assert_array_equal(loss[doc], want_loss)
            marker_targets = np.flatnonzero(np.isin(want, [ids.fast_start, ids.fast_end])) - 1
            assert len(marker_targets) == 2 * (1 + (name == "cut"))
            assert not loss[doc][marker_targets].any()
            assert (labels[doc][marker_targets] == tok.pad_id).all()
            # Vision items of this document: grids, kinds, placeholder starts.
            n = len(grids)
            assert vision.grid_thw[item: item + n].tolist() == [list(g) for g in grids], name
            assert vision.is_fast[item: item + n].tolist() == fast
            assert vision.is_video[item: item + n].all()
            spans = [i for i in range(len(want)) if want[i] == ids.video_placeholder and (
                i == 0 or want[i - 1] != ids.video_placeholder)]
            assert (vision.placeholder_starts[item: item + n] - starts[d]).tolist() == spans
            # Pixels: each chunk is its decoded frames resized at its (slow or fast) budget.
            frames = decode_video(_member(clips, name)).frames
            bounds = vision.cu_seqlens.tolist()
            for k, (a, b) in enumerate(CHUNKS[name]):
                budget = budgets[0] if SLOW[name][a] else budgets[1]
                (chunk,) = chunk_frames(frames[a:b], [0.5 * i for i in range(a, b)],
                                        max_patches=budget, temporal_patch_size=b - a)
                got = vision.pixel_values[bounds[item + k]: bounds[item + k + 1]]
                assert torch.equal(got, chunk.pixel_values), (name, k)
            item += n
        assert item == vision.grid_thw.shape[0]
        # Exact ViT patch and LLM token arithmetic of the pack.
        assert vision.pixel_values.shape[0] == int(vision.cu_seqlens[-1]) == int(
            vision.grid_thw.prod(1).sum())
        assert int((tokens == ids.video_placeholder).sum()) == int(vision.num_llm_tokens.sum())


def _member(root: Path, sample_id: str) -> bytes:
    """The video bytes of one prepared sample, read back from its shard."""
    from megatron_vlm.data.shards import iter_shard

    for shard in sorted((root / "clips" / "train").glob("*.tar")):
        for _, members in iter_shard(shard):
            if json.loads(members["json"])["id"] == sample_id:
                return members["m0.mp4"]
    raise KeyError(sample_id)


def test_slowfast_batch_from_the_bundled_corpus_through_the_tiny_vlm(tok):
    from megatron.core import parallel_state

    from megatron_vlm.parallel.init import init_distributed
    from megatron_vlm.recipes import get_recipe
    from megatron_vlm.training.model_setup import build_model_chunks, unwrap
    from megatron_vlm.training.step import model_inputs

    job = get_recipe("tiny_vlm_cpu")
    if not parallel_state.model_parallel_is_initialized():
        init_distributed(job.parallel, seed=7)
    # The main job's data (the bundled corpus, its budgets), videos only, SlowFast on. The bundled
    # clips move for their whole length (consecutive sampled frames share 75-89% of their
    # patches), so at Keye's 95% every frame is slow; at 85% a frame close to the latest slow
    # one is fast, and packs mix both kinds.
    cfg = dataclasses.replace(job.data.multimodal, num_workers=0, video_sampler="slowfast",
                              slowfast=SlowFastConfig(similarity_threshold=0.85),
                              mixes={"v": StageMix(weights={"video": 1})}, stage="v",
                              calibration_samples=16, packing_buffer_size=16)
    with MultimodalLoader(cfg, tok, seq_length=job.data.seq_length, global_batch_size=1,
                          dp_rank=0, dp_size=1, seed=3) as mm:
        for _ in range(20):
            (batch,) = mm.next_global_batch()
            fast = batch.vision.is_fast
            if fast.any() and not fast.all():
                break
    vision = batch.vision
    assert fast.any() and not fast.all(), "no pack with both slow and fast chunks"
    grids = {tuple(g) for g in vision.grid_thw[:, 1:].tolist()}
    assert len(grids) > 1  # slow and fast chunks of different sizes in one pack
    placeholders = torch.isin(batch.tokens, torch.tensor(sorted(
        tok.media_token_ids().placeholder_ids)))
    model = unwrap(build_model_chunks(job, wrap_ddp=False)[0])
    inputs = model_inputs(batch, torch.device("cpu"), model)
    with torch.no_grad():
        feats = model.projector(model.vision_tower(vision.pixel_values, vision.grid_thw))
        emb = model.embed(inputs["input_ids"], inputs["position_ids"], inputs["pixel_values"],
                          inputs["grid_thw"], inputs["media_positions"])
    positions = torch.nonzero(placeholders[0]).flatten()
    assert feats.shape[0] == positions.numel() == int(vision.num_llm_tokens.sum())
    assert torch.equal(inputs["media_positions"], positions)
    assert torch.equal(emb[positions, 0], feats)
    model.train()
    out = model(**inputs)  # per-token loss [1, S]
    loss = (out * batch.loss_mask).sum() / batch.loss_mask.sum()
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for n, p in model.named_parameters() if n.startswith("vision_tower.")]
    assert all(g is not None for g in grads) and sum(float(g.abs().sum()) for g in grads) > 0
