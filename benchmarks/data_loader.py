"""Multimodal loader throughput: samples/s (and packs/s, LLM tokens/s) of ``MultimodalLoader``
vs energon worker processes (0, 1, 2) on the bundled synthetic corpus (SPEC §8 data targets).

Each setting builds a fresh loader (stage ``joint``: images, QA, video, interleaved, text; the
tiny VLM's budgets S = 512, P = 2048), reads ``warmup`` packs untimed (worker start-up, first
shuffle buffer), then times ``packs`` packed micro-batches (decode, tokenise, pack included) and
closes the loader (``close()``, so no ~10 s teardown). samples/s = documents in those packs /
time.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

from benchmarks.common import parse_args, write_result

SMOKE_SIZES = {"image_caption": (40, 4), "image_qa": (20, 4), "video": (20, 4),
               "interleaved": (12, 4), "text": (60, 4)}


def run(cfg, tok, num_workers: int, packs: int, warmup: int, seq_length: int) -> dict:
    import dataclasses

    from megatron_vlm.data.mm_loader import MultimodalLoader

    cfg = dataclasses.replace(cfg, num_workers=num_workers)
    t_build = time.perf_counter()
    loader = MultimodalLoader(cfg, tok, seq_length=seq_length, global_batch_size=1, dp_rank=0,
                              dp_size=1, seed=3)
    try:
        it = loader.packs()
        for _ in range(warmup):
            next(it)
        first = time.perf_counter() - t_build
        samples = tokens = 0
        t0 = time.perf_counter()
        for _ in range(packs):
            pack = next(it)
            samples += len(pack.sample_ids)
            tokens += sum(pack.tokens_per_dataset.values())
        elapsed = time.perf_counter() - t0
        padding = loader.metrics()["data/padding_fraction"]
    finally:
        t_close = time.perf_counter()
        loader.close()
        close_s = time.perf_counter() - t_close
    return {"num_workers": num_workers, "packs": packs, "samples": samples,
            "seconds": elapsed, "samples_per_s": samples / elapsed,
            "packs_per_s": packs / elapsed, "llm_tokens_per_s": tokens / elapsed,
            "startup_to_first_timed_pack_s": first, "close_s": close_s,
            "padding_fraction": padding}


def main(argv: list[str] | None = None):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    args = parse_args(__doc__.splitlines()[0], argv)
    from megatron_vlm.config.data_mm import MultimodalDataConfig
    from megatron_vlm.data.corpus import bundled_corpus_dir
    from megatron_vlm.data.kimi_tokenizer import SpecialTokensTokenizer
    from megatron_vlm.data.mm_corpus import bundled_mm_corpus, default_cache_dir
    from megatron_vlm.data.tokenizer import get_or_train_tokenizer

    tmp = tempfile.TemporaryDirectory() if args.smoke else None
    try:
        if args.smoke:
            cache = Path(tmp.name)
            root = bundled_mm_corpus(cache, SMOKE_SIZES, seed=0, samples_per_shard=25)
            packs, warmup, workers = 4, 1, (0, 1)
        else:
            cache = default_cache_dir()
            root = bundled_mm_corpus(cache)
            packs, warmup, workers = 60, 4, (0, 1, 2)
        spm = get_or_train_tokenizer(bundled_corpus_dir(), cache / "spm", 1024, 0)
        tok = SpecialTokensTokenizer(spm)
        seq_length = 512
        cfg = MultimodalDataConfig(root=str(root), stage="joint", shuffle_buffer_size=64,
                                   max_patches_per_micro_batch=2048, image_max_patches=256,
                                   video_chunk_max_patches=64,
                                   calibration_samples=32 if args.smoke else 128)
        rows = [run(cfg, tok, w, packs, warmup, seq_length) for w in workers]
    finally:
        if tmp is not None:
            tmp.cleanup()
    results = {"by_workers": {str(r["num_workers"]): r for r in rows}}
    base = rows[0]["samples_per_s"]
    results["speedup_vs_0_workers"] = {str(r["num_workers"]): r["samples_per_s"] / base
                                       for r in rows}
    config = {"stage": "joint", "seq_length": seq_length, "max_patches_per_micro_batch": 2048,
              "image_max_patches": 256, "video_chunk_max_patches": 64,
              "shuffle_buffer_size": 64, "packs_timed": packs, "warmup_packs": warmup,
              "workers": list(workers), "corpus": "bundled_mm_corpus"
              + (" (smoke sizes)" if args.smoke else " (default sizes)"),
              "video_backend": cfg.video_backend, "cpu_cores": os.cpu_count()}
    notes = ("Loader alone (no model). With 2 cores, 2 workers compete with the main process. "
             "CPU numbers when device_kind is cpu.")
    return write_result("data_loader", config, results, args.out_dir, args.smoke, notes)


if __name__ == "__main__":
    main()
