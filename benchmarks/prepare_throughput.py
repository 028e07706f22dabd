"""Preparation throughput per core: image-text pairs/s through ``prepare_data`` with and without
media checks, the cost a slice pays to skip the other slices' records, the merge, and energon's
index (the rates behind the 1B-pair plan in docs/data_at_scale.md).

Inputs: ``num_images`` distinct JPEGs (``width`` x ``height``, smooth noise so they compress like
photographs, quality 90) referenced by ``num_records`` caption records in one JSONL file, read
from the page cache (so these are CPU rates; disk and network are sized in the plan). Each
measurement is one process with one worker (``workers=1``; OMP/torch threads 1), so its rate is
per core; ``workers=2`` is recorded too, but on a shared 2-core machine it says little.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

from benchmarks.common import parse_args, write_result


def make_inputs(root: Path, num_images: int, num_records: int, width: int,
                height: int) -> tuple[Path, int]:
    """JPEGs + a caption JSONL; returns (jsonl, mean image bytes)."""
    import PIL.Image

    rng = np.random.default_rng(0)
    (root / "img").mkdir(parents=True)
    sizes = []
    for i in range(num_images):
        low = rng.integers(0, 256, (height // 16 + 1, width // 16 + 1, 3)).astype(np.uint8)
        img = PIL.Image.fromarray(low).resize((width, height), PIL.Image.BICUBIC)
        noise = rng.normal(0, 12, (height, width, 3))
        arr = np.clip(np.asarray(img, dtype=np.float32) + noise, 0, 255).astype(np.uint8)
        path = root / "img" / f"{i:06d}.jpg"
        PIL.Image.fromarray(arr).save(path, quality=90)
        sizes.append(path.stat().st_size)
    jsonl = root / "pairs.jsonl"
    with open(jsonl, "w") as f:
        for r in range(num_records):
            f.write(json.dumps({"id": f"p{r:09d}", "image": f"img/{r % num_images:06d}.jpg",
                                "caption": f"a photograph, number {r}, of something."}) + "\n")
    return jsonl, int(np.mean(sizes))


def time_prepare(jsonl: Path, out: Path, check: bool, workers: int, sps: int) -> dict:
    from megatron_vlm.data.prepare import merge_slices, prepare_slice

    shutil.rmtree(out, ignore_errors=True)
    w0 = _wchar()
    t0 = time.perf_counter()
    part = prepare_slice({"train": [jsonl]}, out, name="bench", samples_per_shard=sps,
                         check_media=check, workers=workers)
    t1 = time.perf_counter()
    w1 = _wchar()
    wrote = None if w0 is None else w1 - w0  # this process only: the workers' writes are not in it
    tracemalloc.start()
    summary = merge_slices(out, verbose=False, workers=1)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    t2 = time.perf_counter()
    samples = sum(s["samples"] for s in part["shards"])
    written = sum(s["bytes"] for s in part["shards"])
    out_row = {"samples": samples, "slice_seconds": t1 - t0, "merge_seconds": t2 - t1,
            "pairs_per_s": samples / (t1 - t0), "shard_bytes": written,
            "merge_peak_python_bytes": peak, "rejected": sum(summary.rejected.values())}
    if workers == 1 and wrote is not None:  # item 6: each sample byte written once
        out_row["write_bytes_per_shard_byte"] = wrote / written
    return out_row


def _wchar() -> int | None:
    """Bytes this process has passed to write() (Linux ``/proc/self/io``), or None."""
    try:
        for line in Path("/proc/self/io").read_text().splitlines():
            if line.startswith("wchar:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def time_merge_parts(out: Path) -> dict:
    """Merge without energon's index vs energon's index alone (on the same shards)."""
    from megatron_vlm.data import prepare
    from megatron_vlm.data.shards import write_energon_index

    shards = [e for p in prepare._read_parts(out) for e in p["shards"]]
    t0 = time.perf_counter()
    shutil.rmtree(out / ".nv-meta", ignore_errors=True)
    write_energon_index(out, shards, verbose=False, workers=1)
    index_s = time.perf_counter() - t0
    n = sum(s["samples"] for s in shards)
    return {"energon_index_seconds": index_s, "energon_index_samples_per_s": n / index_s,
            "shards": len(shards)}


def time_merge_scale(root: Path, num_records: int) -> dict:
    """Merge samples/s and memory per sample on a text-only dataset of ``num_records``."""
    from megatron_vlm.data.prepare import merge_slices, prepare_slice

    jsonl = root / "text.jsonl"
    with open(jsonl, "w") as f:
        for r in range(num_records):
            f.write(json.dumps({"id": f"laion-{r:012d}", "text": f"caption {r}."}) + "\n")
    out = root / "text_out"
    prepare_slice({"train": [jsonl]}, out, name="text", samples_per_shard=1000, workers=1)
    t0 = time.perf_counter()
    merge_slices(out, verbose=False, workers=1)
    seconds = time.perf_counter() - t0
    tracemalloc.start()
    merge_slices(out, verbose=False, workers=1)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    from megatron_vlm.data import prepare
    from megatron_vlm.data.prepare import _read_parts
    from megatron_vlm.data.shards import write_energon_index

    shards = [e for p in _read_parts(out) for e in p["shards"]]
    saved, prepare.write_energon_index = prepare.write_energon_index, lambda *a, **k: None
    try:  # the merge's own work: sample lists, duplicates, manifest, reject log
        t0 = time.perf_counter()
        merge_slices(out, verbose=False, workers=1)
        own_s = time.perf_counter() - t0
    finally:
        prepare.write_energon_index = saved
    index_s = {}
    for workers in (1, 2):
        shutil.rmtree(out / ".nv-meta")
        t0 = time.perf_counter()
        write_energon_index(out, shards, verbose=False, workers=workers)
        index_s[workers] = time.perf_counter() - t0
    return {"samples": num_records, "shards": len(shards), "merge_seconds": seconds,
            "merge_samples_per_s": num_records / seconds,
            "energon_index_seconds_1_worker": index_s[1],
            "energon_index_seconds_2_workers": index_s[2],
            "merge_without_index_samples_per_s": num_records / own_s,
            "merge_peak_python_bytes_per_sample": peak / num_records}


def time_enumeration(jsonl: Path, repeats: int) -> dict:
    """Records/s of ``iter_input`` without ``load()``: what a slice pays per record it skips."""
    from megatron_vlm.data.sources import iter_input

    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        n = sum(1 for _ in iter_input(jsonl))
        best = min(best, time.perf_counter() - t0)
    return {"records": n, "records_per_s": n / best,
            "bytes_per_record": jsonl.stat().st_size / n}


def time_tar_enumeration(root: Path, num_samples: int, repeats: int) -> dict:
    """Records/s of ``iter_input`` over an img2dataset-style tar (``KEY.jpg|txt|json``, 20 KB
    images) without ``load()``: the header walk a block slice pays per record it skips."""
    import io
    import tarfile

    from megatron_vlm.data.sources import iter_input

    tar, image = root / "00000.tar", os.urandom(20_000)
    with tarfile.open(tar, "w") as t:
        for k in range(num_samples):
            for ext, data in (("jpg", image), ("txt", b"a caption"), ("json", b"{}")):
                info = tarfile.TarInfo(f"{k:09d}.{ext}")
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        n = sum(1 for _ in iter_input(tar))
        best = min(best, time.perf_counter() - t0)
    return {"records": n, "records_per_s": n / best}


def main(argv: list[str] | None = None):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    args = parse_args(__doc__.splitlines()[0], argv)
    import megatron.energon.flavors.webdataset  # noqa: F401  (imported before any timing)

    import megatron_vlm.data.prepare  # noqa: F401

    if args.smoke:
        cfg = {"num_images": 8, "num_records": 40, "width": 96, "height": 64,
               "samples_per_shard": 10, "enumeration_records": 2000}
    else:
        cfg = {"num_images": 200, "num_records": 2000, "width": 512, "height": 384,
               "samples_per_shard": 1000, "enumeration_records": 200_000}
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        jsonl, mean_bytes = make_inputs(root / "raw", cfg["num_images"], cfg["num_records"],
                                        cfg["width"], cfg["height"])
        results["mean_image_bytes"] = mean_bytes
        for label, check, workers in (("checks_1_worker", True, 1),
                                      ("no_checks_1_worker", False, 1),
                                      ("checks_2_workers", True, 2)):
            results[label] = time_prepare(jsonl, root / "out", check, workers,
                                          cfg["samples_per_shard"])
        res = results["no_checks_1_worker"]
        results["shard_overhead_bytes_per_sample"] = (
            res["shard_bytes"] / res["samples"] - mean_bytes)
        results["index"] = time_merge_parts(root / "out")
        big = root / "big.jsonl"
        with open(jsonl) as src:
            lines = src.readlines()
        with open(big, "w") as f:
            for k in range(cfg["enumeration_records"]):
                f.write(lines[k % len(lines)])
        results["enumeration"] = time_enumeration(big, 1 if args.smoke else 3)
        results["merge_scale"] = time_merge_scale(root, cfg["enumeration_records"] // 2)
        results["tar_enumeration"] = time_tar_enumeration(
            root, cfg["enumeration_records"] // 20, 1 if args.smoke else 3)
    notes = ("One process per measurement, page-cached inputs (CPU rates). pairs_per_s of "
             "checks_1_worker / no_checks_1_worker are per core. merge_peak_python_bytes / "
             "samples sizes the merge's memory (duplicate-id detection holds every id).")
    return write_result("prepare_throughput", cfg, results, args.out_dir, args.smoke, notes)


if __name__ == "__main__":
    main()
