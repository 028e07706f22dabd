"""CPU cores per GPU the data pipeline needs at the ``kimi_k25`` plan's throughput: every rank
of a replica decoding (before) vs one rank per replica (after, ``parallel/batch_handoff.py``).

Arithmetic from rates measured here, one core (OMP/torch threads 1, no loader workers), each the
median of ``repeats`` timed runs after one untimed warm-up:

- media, per ViT patch: ``data.image.process_image`` on a generated 1920x1080 JPEG (gradient,
  shapes and sensor-like noise, quality 90) at K2.5's image budget (``image_max_patches``), and
  ``data.video.process_video`` on a generated 10 s 1280x720 H.264 clip (``make_video``: a pan
  over a photo-like texture with noise, 30 fps, ~4.5 Mbps) sampled at 2 fps into K2.5's video
  chunks; decode to normalised patches.
- tokenising + packing, per LLM token: ``MultimodalLoader`` over the bundled corpus (``joint``
  mix, no workers), whole-pipeline seconds per LLM token (it includes the bundled corpus's small
  media, so this over-counts tokenising + packing: an upper bound).
- the hand-off's own CPU cost: ``batch_handoff.encode`` / ``decode`` of one K2.5-sized
  micro-batch (S tokens, P float32 patches) on the source and on a receiver.

Demand: the planner's tokens/s per GPU for the recipe's layout (``tools/plan_parallel.py
--check``) x GPUs per replica (tp x pp x cp) = tokens/s of one replica; / S = micro-batches/s.
Each micro-batch holds S tokens, of which the stage mix's ``vision_token_fraction`` (10% for
K2.5's early fusion) are media tokens, split between images and video by the stage's dataset
weights (interleaved documents counted as video, the dearer: an upper bound): one replica's
decode + pack cores = micro-batches/s x (vision tokens x s/vision token + S x s/token). Before,
every GPU of the replica does all of it; after, the source does it once (+ encoding) and every
rank decodes the hand-off, spread over the replica's GPUs. The headline is that stage mix; all
images, all video, and the full patch budget (P patches in every micro-batch, the planner's
compute assumption) are reported beside it. Rates are CPU seconds (``time.process_time``).
"""

from __future__ import annotations

import io
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import parse_args, write_result

REPO = Path(__file__).resolve().parents[1]
TARGET_CORES_PER_GPU = 0.2


def _median_seconds(fn, repeats: int) -> float:
    """Median CPU seconds of ``fn`` (process time, all threads: what a core is busy for, and
    robust to other processes on a shared machine, unlike wall time)."""
    fn()  # warm-up (first decode, caches)
    times = []
    for _ in range(repeats):
        t0 = time.process_time()
        fn()
        times.append(time.process_time() - t0)
    return statistics.median(times)


def make_jpeg(width: int, height: int, seed: int = 0) -> bytes:
    """A photo-like JPEG: gradients, a few shapes and Gaussian noise (what makes JPEG decode
    cost more than a flat synthetic image), quality 90."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    img = np.stack([xx / width * 200, yy / height * 200, (xx + yy) / (width + height) * 255], -1)
    img += rng.normal(0, 12, img.shape)
    pil = Image.fromarray(img.clip(0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(pil)
    for _ in range(12):
        x, y = rng.integers(0, width), rng.integers(0, height)
        r = int(rng.integers(width // 40, width // 8))
        colour = tuple(int(c) for c in rng.integers(0, 255, 3))
        draw.ellipse([x - r, y - r, x + r, y + r], fill=colour)
    buf = io.BytesIO()
    pil.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def make_video(path: Path, width: int, height: int, seconds: int, fps: int = 30,
               bit_rate: int = 4_500_000) -> Path:
    """A camera pan over a photo-like texture (``make_jpeg``'s) with fresh noise each frame,
    H.264 (libx264, yuv420p) at ``bit_rate``: the bits of real footage, not a flat clip's."""
    import av
    from PIL import Image

    rng = np.random.default_rng(1)
    scene = np.asarray(Image.open(io.BytesIO(make_jpeg(width * 2, height, seed=1))))
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.bit_rate = bit_rate
        stream.options = {"preset": "veryfast"}
        for i in range(seconds * fps):
            x = (i * 3) % width
            frame = scene[:, x:x + width].astype(np.int16) + rng.integers(-6, 7, (height, width, 3))
            img = frame.clip(0, 255).astype(np.uint8)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def media_rates(smoke: bool, repeats: int, image_max_patches: int,
                video_chunk_max_patches: int) -> dict:
    """Seconds per ViT patch of one image and of one video (decode -> normalised patches)."""
    from megatron_vlm.data.image import process_image
    from megatron_vlm.data.video import process_video

    width, height = (480, 270) if smoke else (1920, 1080)
    jpeg = make_jpeg(width, height)
    grid = process_image(jpeg, max_patches=image_max_patches).grid_thw
    patches, tokens = grid[0] * grid[1] * grid[2], grid[1] * grid[2] // 4  # 2x2 merge
    image_s = _median_seconds(lambda: process_image(jpeg, max_patches=image_max_patches),
                              repeats)
    vw, vh, seconds = (160, 96, 1) if smoke else (1280, 720, 10)
    with tempfile.TemporaryDirectory() as tmp:
        clip = make_video(Path(tmp) / "clip.mp4", vw, vh, seconds)
        clip_bytes = clip.stat().st_size

        def video():
            return process_video(str(clip), fps=2.0, max_patches=video_chunk_max_patches)

        out = video()
        vpatches = sum(c.pixel_values.shape[0] for c in out.chunks)
        vtokens = sum(c.grid_thw[1] * c.grid_thw[2] // 4 for c in out.chunks)  # t pooled
        video_s = _median_seconds(video, repeats)
    return {
        "image": {"size": f"{width}x{height}", "jpeg_bytes": len(jpeg), "patches": patches,
                  "llm_tokens": tokens, "seconds": image_s, "s_per_patch": image_s / patches,
                  "s_per_llm_token": image_s / tokens},
        "video": {"size": f"{vw}x{vh}", "seconds_of_video": seconds, "source_fps": 30,
                  "sample_fps": 2.0, "mbps": clip_bytes * 8 / seconds / 1e6,
                  "patches": vpatches, "llm_tokens": vtokens, "seconds": video_s,
                  "s_per_patch": video_s / vpatches, "s_per_llm_token": video_s / vtokens},
    }


def pack_rate(smoke: bool, repeats: int) -> dict:
    """Seconds per LLM token of the whole loader (tokenise, pack, the bundled corpus's media)."""
    from benchmarks.data_loader import SMOKE_SIZES
    from megatron_vlm.config.data_mm import MultimodalDataConfig
    from megatron_vlm.data.corpus import bundled_corpus_dir
    from megatron_vlm.data.kimi_tokenizer import SpecialTokensTokenizer
    from megatron_vlm.data.mm_corpus import bundled_mm_corpus, default_cache_dir
    from megatron_vlm.data.tokenizer import get_or_train_tokenizer

    with tempfile.TemporaryDirectory() as tmp:
        cache = Path(tmp) if smoke else default_cache_dir()
        sizes = {name: (max(train // 4, 4), val) for name, (train, val) in SMOKE_SIZES.items()}
        root = (bundled_mm_corpus(cache, sizes, seed=0, samples_per_shard=25) if smoke
                else bundled_mm_corpus(cache))
        tok = SpecialTokensTokenizer(get_or_train_tokenizer(bundled_corpus_dir(), cache / "spm",
                                                            1024, 0))
        cfg = MultimodalDataConfig(root=str(root), stage="joint", shuffle_buffer_size=64,
                                   max_patches_per_micro_batch=2048, image_max_patches=256,
                                   video_chunk_max_patches=64,
                                   calibration_samples=8 if smoke else 128)
        rates = [_loader_tokens_per_cpu_s(cfg, tok, packs=2 if smoke else 30)
                 for _ in range(1 if smoke else repeats)]
    rate = statistics.median(rates)
    return {"llm_tokens_per_cpu_s": rate, "s_per_token": 1.0 / rate, "runs": rates}


def _loader_tokens_per_cpu_s(cfg, tok, packs: int) -> float:
    """LLM tokens per CPU second of a fresh in-process loader, after one untimed pack."""
    from megatron_vlm.data.mm_loader import MultimodalLoader

    loader = MultimodalLoader(cfg, tok, seq_length=512, global_batch_size=1, dp_rank=0,
                              dp_size=1, seed=3)
    try:
        it = loader.packs()
        next(it)  # start-up, first shuffle buffer
        tokens, t0 = 0, time.process_time()
        for _ in range(packs):
            tokens += sum(next(it).tokens_per_dataset.values())
        return tokens / (time.process_time() - t0)
    finally:
        loader.close()


def handoff_cost(seq_length: int, patches: int, repeats: int) -> dict:
    """Seconds to encode (source) and decode (receiver) one micro-batch of the hand-off."""
    import torch

    from megatron_vlm.data.contract import PackedBatch, VisionInputs
    from megatron_vlm.parallel.batch_handoff import decode, encode

    items = max(patches // 1024, 1)
    vision = VisionInputs(pixel_values=torch.randn(patches, 3, 14, 14),
                          grid_thw=torch.tensor([[1, 32, patches // items // 32]] * items),
                          placeholder_starts=torch.arange(items) * 300,
                          is_video=torch.zeros(items, dtype=torch.bool))
    cu = torch.tensor([0, seq_length // 2, seq_length], dtype=torch.int32)
    ids = torch.randint(0, 160000, (1, seq_length))
    batch = PackedBatch(tokens=ids, labels=ids, loss_mask=torch.ones(1, seq_length),
                        position_ids=torch.arange(seq_length)[None], cu_seqlens=cu,
                        cu_seqlens_padded=cu, max_seqlen=seq_length // 2, vision=vision)
    buf, payload = encode([batch])
    return {"bytes": int(buf.numel()),
            "encode_s": _median_seconds(lambda: encode([batch]), repeats),
            "decode_s": _median_seconds(lambda: decode(buf, payload), repeats)}


def plan(num_gpus: int) -> dict:
    """The ``kimi_k25`` recipe layout's planned tokens/s per GPU and its sizes."""
    sys.path.insert(0, str(REPO / "tools"))
    import plan_parallel

    args = plan_parallel.parse_args(["--recipe", "kimi_k25", "--gpus", str(num_gpus), "--check"])
    job, inputs = plan_parallel.build_inputs(args)
    est = plan_parallel.evaluate(inputs, plan_parallel.recipe_layout(job, num_gpus))
    par, mm = job.parallel, job.data.multimodal
    mix = mm.mixes[mm.stage]
    # The stage's weights split the vision share among the multimodal datasets; interleaved
    # documents (images and video) count as video, the dearer one: an upper bound.
    media_w = {k: w for k, w in mix.weights.items() if k != "text"}
    video_share = sum(w for k, w in media_w.items() if k in ("video", "interleaved")) \
        / sum(media_w.values())
    return {"recipe": "kimi_k25", "num_gpus": num_gpus, "tp": par.tp, "pp": par.pp, "cp": par.cp,
            "dp": num_gpus // (par.tp * par.pp * par.cp),
            "tokens_per_s_per_gpu": est.tokens_per_s_per_gpu,
            "seq_length": job.data.seq_length,
            "patches_per_micro_batch": job.data.multimodal.max_patches_per_micro_batch,
            "image_max_patches": job.data.multimodal.image_max_patches,
            "video_chunk_max_patches": job.data.multimodal.video_chunk_max_patches,
            "stage": mm.stage, "vision_token_fraction": mix.vision_token_fraction,
            "video_share_of_vision_tokens": video_share}


def demand(p: dict, media: dict, pack: dict, handoff: dict) -> dict:
    """Cores per GPU before and after: media at the stage's vision-token share (all images, all
    video) and, as an upper bound, at the full patch budget (the planner's compute assumption)."""
    per_replica = p["tp"] * p["pp"] * p["cp"]
    micro_batches_per_s = p["tokens_per_s_per_gpu"] * per_replica / p["seq_length"]
    pack_s = p["seq_length"] * pack["s_per_token"]
    vision_tokens = p["seq_length"] * (p["vision_token_fraction"] or 1.0)
    out = {"gpus_per_replica": per_replica, "micro_batches_per_s_per_replica": micro_batches_per_s,
           "vision_llm_tokens_per_micro_batch": vision_tokens, "cases": {}}
    share = p["video_share_of_vision_tokens"]
    media = {**media, "stage_mix": {
        key: (1 - share) * media["image"][key] + share * media["video"][key]
        for key in ("s_per_llm_token", "s_per_patch")}}
    for kind in ("stage_mix", "image", "video"):
        for budget, media_s in (
                ("vision_share", vision_tokens * media[kind]["s_per_llm_token"]),
                ("full_patch_budget", p["patches_per_micro_batch"] * media[kind]["s_per_patch"])):
            before = micro_batches_per_s * (media_s + pack_s)  # on every GPU of the replica
            source = micro_batches_per_s * (media_s + pack_s + handoff["encode_s"])
            receivers = micro_batches_per_s * handoff["decode_s"] * (per_replica - 1)
            after = (source + receivers) / per_replica
            out["cases"][f"{kind}@{budget}"] = {
                "media_cores_per_gpu_before": micro_batches_per_s * media_s,
                "pack_cores_per_gpu_before": micro_batches_per_s * pack_s,
                "cores_per_gpu_before": before, "cores_per_gpu_after": after,
                "source_rank_cores_after": source, "reduction": before / after}
    headline = out["cases"]["stage_mix@vision_share"]
    out["cores_per_gpu_before"] = headline["cores_per_gpu_before"]
    out["cores_per_gpu_after"] = headline["cores_per_gpu_after"]
    out["cores_per_gpu_after_all_video"] = out["cases"]["video@vision_share"][
        "cores_per_gpu_after"]
    out["cores_per_gpu_after_full_patch_budget"] = out["cases"][
        "stage_mix@full_patch_budget"]["cores_per_gpu_after"]
    out["target_cores_per_gpu"] = TARGET_CORES_PER_GPU
    out["meets_target"] = out["cores_per_gpu_after"] <= TARGET_CORES_PER_GPU
    return out


def main(argv: list[str] | None = None):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    args = parse_args(__doc__.splitlines()[0], argv)
    repeats = 1 if args.smoke else 5
    p = plan(1024)
    load_before = os.getloadavg()
    media = media_rates(args.smoke, repeats, p["image_max_patches"], p["video_chunk_max_patches"])
    pack = pack_rate(args.smoke, repeats)
    handoff = handoff_cost(p["seq_length"], p["patches_per_micro_batch"], repeats)
    results = {"plan": p, "media": media, "tokenise_pack": pack, "handoff": handoff,
               "demand": demand(p, media, pack, handoff),
               "load_average_1m": {"start": load_before[0], "end": os.getloadavg()[0]}}
    config = {"repeats": repeats, "threads": 1, "loader_workers": 0,
              "smoke_sizes": args.smoke}
    notes = ("Arithmetic from one-core rates measured here (medians); the machine is shared, "
             "see load_average_1m. Tokenise+pack is the whole bundled-corpus loader per LLM "
             "token (includes its small media): an upper bound.")
    return write_result("data_demand", config, results, args.out_dir, args.smoke, notes)


if __name__ == "__main__":
    main()
