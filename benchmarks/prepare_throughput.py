"""Preparation throughput per core: media checks on (structure, the default) vs off vs a full decode
vs ``tar`` of the same files, in interleaved rounds; then what a slice pays to skip the other
slices' records, the merge, and energon's index (the rates behind docs/data_at_scale.md's plan).

Inputs: ``num_images`` distinct photograph-like JPEGs (``width`` x ``height``, smooth colour
fields plus noise, quality 90: a few hundred KB each) and ``num_videos`` H.264 MP4 clips
(1280x720, 30 fps, ``video_seconds`` long at ~4.5 Mbps, ``faststart``), each file referenced once
by one caption record of a JSONL file, read from the page cache (CPU rates; disk and network are
sized in the plan). The same rounds run on the clips alone and on ``num_small_images`` 512x384
JPEGs (~90 KB, the size of the plan in docs/data_at_scale.md).

Each round runs, in a rotating order, one slice (``prepare_slice``, ``workers=1``: one process,
OMP/torch threads 1) with ``check_media`` ``structure``, ``none`` and ``full``, and ``tar -cf`` of
the same media files plus the JSONL (a subprocess; its start-up is in its time). The slice reads
every record and media file, checks, writes the shards and re-reads each shard to verify its
SHA-256; ``tar`` only copies the bytes. Ratios are taken per round, then the median; the load
average is recorded before and after. ``checks_2_workers`` (once) is the same slice with two
processes.
"""

from __future__ import annotations

import io
import json
import os
import resource
import shutil
import statistics
import subprocess
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np

from benchmarks.common import parse_args, write_result

MODES = ("structure", "none", "full")


def photo_jpeg(rng: np.random.Generator, width: int, height: int) -> bytes:
    """A photograph-like JPEG: smooth colour fields (bicubic upsampled) with mild noise."""
    import PIL.Image

    noise = rng.normal(0, 5, (height, width, 3))
    arr = np.clip(np.asarray(_scene(rng, width, height), dtype=np.float32) + noise, 0, 255)
    buf = io.BytesIO()
    PIL.Image.fromarray(arr.astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def h264_clip(path: Path, rng: np.random.Generator, width: int, height: int, seconds: float,
              fps: int = 30, bit_rate: int = 4_500_000) -> None:
    """An MP4/H.264 clip: a photograph-like scene panning 4 px per frame, with grain."""
    import av

    frames = max(1, int(seconds * fps))
    big = np.asarray(_scene(rng, width + 4 * frames, height))
    with av.open(str(path), "w", options={"movflags": "+faststart"}) as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.bit_rate = bit_rate
        stream.options = {"preset": "veryfast", "threads": "1"}
        for i in range(frames):
            grain = rng.integers(0, 6, (height, width, 3), dtype=np.uint8)
            frame = np.ascontiguousarray(big[:, 4 * i:4 * i + width]) + grain
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


def _scene(rng: np.random.Generator, width: int, height: int):
    import PIL.Image

    low = rng.integers(0, 256, (height // 16 + 1, width // 16 + 1, 3)).astype(np.uint8)
    return PIL.Image.fromarray(low).resize((width, height), PIL.Image.BICUBIC)


def make_inputs(root: Path, cfg: dict) -> dict:
    """JPEGs and clips, and caption JSONLs referencing each file once: ``mixed`` (every large
    image, the clips spread among them), ``videos`` (the clips alone) and ``small_images``
    (``small_width`` x ``small_height`` JPEGs, the size docs/data_at_scale.md's plan assumes)."""
    rng = np.random.default_rng(0)
    (root / "media").mkdir(parents=True)
    records, videos, sizes = [], [], {}
    for i in range(cfg["num_images"]):
        name = f"media/{i:06d}.jpg"
        (root / name).write_bytes(photo_jpeg(rng, cfg["width"], cfg["height"]))
        records.append({"id": f"i{i:06d}", "image": name,
                        "caption": f"a photograph, number {i}, of something."})
    for i in range(cfg["num_videos"]):
        name = f"media/v{i:03d}.mp4"
        h264_clip(root / name, rng, cfg["video_width"], cfg["video_height"],
                  cfg["video_seconds"])
        videos.append({"id": f"v{i:03d}", "video": name, "caption": "a clip."})
        records.insert(len(records) * (i + 1) // (cfg["num_videos"] + 1), videos[-1])
    small = []
    for i in range(cfg["num_small_images"]):
        name = f"media/s{i:06d}.jpg"
        (root / name).write_bytes(photo_jpeg(rng, cfg["small_width"], cfg["small_height"]))
        small.append({"id": f"s{i:06d}", "image": name, "caption": f"a small photograph {i}."})
    out = {}
    for label, rows in (("mixed", records), ("videos", videos), ("small_images", small)):
        jsonl = root / f"{label}.jsonl"
        jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
        files = [r.get("image") or r["video"] for r in rows]
        sizes = [(root / f).stat().st_size for f in files]
        out[label] = {"jsonl": jsonl, "files": [jsonl.name, *files], "records": len(rows),
                      "media_bytes": sum(sizes)}
    image_sizes = [(root / r["image"]).stat().st_size for r in records if "image" in r]
    video_sizes = [(root / r["video"]).stat().st_size for r in videos]
    out["mean_image_bytes"] = int(np.mean(image_sizes)) if image_sizes else 0
    out["mean_video_bytes"] = int(np.mean(video_sizes)) if video_sizes else 0
    return out


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def time_slice(jsonl: Path, out: Path, mode: str, workers: int, sps: int) -> dict:
    """One ``prepare_slice`` (no merge): wall and CPU seconds, samples, bytes, rejects."""
    from megatron_vlm.data import records
    from megatron_vlm.data.prepare import prepare_slice

    shutil.rmtree(out, ignore_errors=True)
    records._CHECKED_FILES.clear()  # each run checks every file (the cache is per path)
    w0, c0, k0 = _wchar(), time.process_time(), _children_cpu()
    t0 = time.perf_counter()
    part = prepare_slice({"train": [jsonl]}, out, name="bench", samples_per_shard=sps,
                         check_media=mode, workers=workers)
    seconds = time.perf_counter() - t0
    cpu = time.process_time() - c0 + _children_cpu() - k0
    w1 = _wchar()
    samples = sum(s["samples"] for s in part["shards"])
    written = sum(s["bytes"] for s in part["shards"])
    row = {"samples": samples, "seconds": seconds, "cpu_seconds": cpu,
           "pairs_per_s": samples / seconds, "shard_bytes": written}
    if workers == 1 and w0 is not None:  # item 6: each sample byte written once
        row["write_bytes_per_shard_byte"] = (w1 - w0) / written
    return row


def time_tar(root: Path, files: list[str], out: Path) -> dict:
    """``tar -cf`` of ``files`` (the JSONL and its media, relative to ``root``; a subprocess),
    wall and CPU seconds."""
    out.unlink(missing_ok=True)
    k0, t0 = _children_cpu(), time.perf_counter()
    subprocess.run(["tar", "-cf", str(out), "-C", str(root), *files], check=True)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "cpu_seconds": _children_cpu() - k0,
            "bytes": out.stat().st_size}


def interleaved(inputs: dict, work: Path, rounds: int, sps: int,
                modes: tuple[str, ...] = MODES) -> dict:
    """A warm-up, then ``rounds`` rounds of every mode and ``tar``, the order rotating each
    round; per-round ratios and their medians."""
    jobs = [*modes, "tar"]
    runs: dict[str, list[dict]] = {j: [] for j in jobs}
    jsonl = inputs["jsonl"]
    for mode in modes:  # warm-up, not counted: imports, decoder start-up, page cache
        time_slice(jsonl, work / f"out_{mode}", mode, 1, sps)
    for r in range(rounds):
        for job in jobs[r % len(jobs):] + jobs[:r % len(jobs)]:
            if job == "tar":
                runs[job].append(time_tar(jsonl.parent, inputs["files"], work / "base.tar"))
            else:
                runs[job].append(time_slice(jsonl, work / f"out_{job}", job, 1, sps))

    def med(job: str, key: str = "seconds") -> float:
        return statistics.median(x[key] for x in runs[job])

    def ratio(num: str, den: str, key: str = "seconds") -> float:
        return statistics.median(a[key] / b[key] for a, b in zip(runs[num], runs[den]))

    n, media = inputs["records"], inputs["media_bytes"]
    out = {
        "records": n, "media_bytes": media, "runs": runs,
        "median_seconds": {j: med(j) for j in jobs},
        "median_cpu_seconds": {j: med(j, "cpu_seconds") for j in jobs},
        "pairs_per_s": {j: n / med(j) for j in jobs},
        "media_mb_per_s": {j: media / 1e6 / med(j) for j in jobs},
        # rates over rates = inverse time ratios, per round
        "checks_over_no_checks": ratio("none", "structure"),
        "cpu_checks_over_no_checks": ratio("none", "structure", "cpu_seconds"),
        "checks_over_tar": ratio("tar", "structure"),
        "no_checks_over_tar": ratio("tar", "none"),
    }
    if "full" in modes:
        out["full_decode_over_no_checks"] = ratio("none", "full")
        out["checks_over_full_decode"] = ratio("full", "structure")
    return out


def time_checks_per_file(root: Path, repeats: int) -> dict:
    """Median milliseconds of ``check_media`` per file kind and mode (where the time goes)."""
    from megatron_vlm.data.media_checks import check_media

    out: dict = {}
    for kind, pattern in (("image", "[0-9]*.jpg"), ("video", "*.mp4")):  # the large JPEGs
        files = sorted((root / "media").glob(pattern))
        if not files:
            continue
        for mode in ("structure", "full"):
            times = []
            for path in files:
                data = path.read_bytes()
                for _ in range(repeats):
                    t0 = time.perf_counter()
                    check_media(kind, data, mode)
                    times.append(time.perf_counter() - t0)
            out[f"{kind}_{mode}_ms"] = 1e3 * statistics.median(times)
        out[f"{kind}_full_over_structure"] = (out[f"{kind}_full_ms"]
                                              / out[f"{kind}_structure_ms"])
    return out


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


def time_merge_scale(root: Path, num_records: int, index_workers: tuple[int, ...] = (1, 2)) -> dict:
    """Merge samples/s and memory per sample on a text-only dataset of ``num_records``; energon's
    index alone with each of ``index_workers`` processes."""
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
    for workers in index_workers:
        shutil.rmtree(out / ".nv-meta")
        t0 = time.perf_counter()
        write_energon_index(out, shards, verbose=False, workers=workers)
        index_s[workers] = time.perf_counter() - t0
    return {"samples": num_records, "shards": len(shards), "merge_seconds": seconds,
            "merge_samples_per_s": num_records / seconds,
            **{f"energon_index_seconds_{w}_worker{'s' * (w > 1)}": index_s[w]
               for w in index_workers},
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
        cfg = {"num_images": 6, "width": 160, "height": 120, "num_videos": 1,
               "video_width": 128, "video_height": 72, "video_seconds": 0.5,
               "num_small_images": 3, "small_width": 96, "small_height": 64, "rounds": 1,
               "samples_per_shard": 4, "enumeration_records": 2000}
    else:
        cfg = {"num_images": 200, "width": 1280, "height": 960, "num_videos": 4,
               "video_width": 1280, "video_height": 720, "video_seconds": 4.0,
               "num_small_images": 400, "small_width": 512, "small_height": 384, "rounds": 7,
               "samples_per_shard": 1000, "enumeration_records": 200_000}
    results: dict = {"loadavg_before": os.getloadavg()}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        inputs = make_inputs(root / "raw", cfg)
        results["mean_image_bytes"] = inputs["mean_image_bytes"]
        results["mean_video_bytes"] = inputs["mean_video_bytes"]
        results["interleaved"] = interleaved(inputs["mixed"], root, cfg["rounds"],
                                             cfg["samples_per_shard"])
        (root / "v").mkdir()
        (root / "s").mkdir()
        results["interleaved_videos_only"] = interleaved(
            inputs["videos"], root / "v", cfg["rounds"], cfg["samples_per_shard"],
            ("structure", "none"))
        results["interleaved_small_images"] = interleaved(
            inputs["small_images"], root / "s", cfg["rounds"], cfg["samples_per_shard"])
        results["mean_small_image_bytes"] = (inputs["small_images"]["media_bytes"]
                                             // max(1, inputs["small_images"]["records"]))
        results["checks_2_workers"] = time_slice(inputs["mixed"]["jsonl"], root / "out_2",
                                                 "structure", 2, cfg["samples_per_shard"])
        results["check_ms_per_file"] = time_checks_per_file(root / "raw",
                                                            1 if args.smoke else 3)
        row = results["interleaved"]["runs"]["none"][-1]
        results["write_bytes_per_shard_byte"] = row.get("write_bytes_per_shard_byte")
        results["shard_overhead_bytes_per_sample"] = (
            row["shard_bytes"] - inputs["mixed"]["media_bytes"]) / row["samples"]
        shutil.rmtree(root / "out_full", ignore_errors=True)
        tracemalloc.start()
        results["merge_seconds"] = _merge(root / "out_none")
        results["merge_peak_python_bytes"] = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        results["index"] = time_merge_parts(root / "out_none")
        big = root / "big.jsonl"
        lines = inputs["mixed"]["jsonl"].read_text().splitlines(keepends=True)
        with open(big, "w") as f:
            for k in range(cfg["enumeration_records"]):
                f.write(lines[k % len(lines)])
        results["enumeration"] = time_enumeration(big, 1 if args.smoke else 3)
        results["merge_scale"] = time_merge_scale(root, cfg["enumeration_records"] // 2,
                                                  (1,) if args.smoke else (1, 2))
        results["tar_enumeration"] = time_tar_enumeration(
            root, cfg["enumeration_records"] // 20, 1 if args.smoke else 3)
    results["loadavg_after"] = os.getloadavg()
    notes = ("One process per slice (workers=1), page-cached inputs: CPU rates per core. "
             "interleaved.*_over_*: rate of the first over the second, per round, median "
             "(checks = check_media 'structure', the default). tar: tar -cf of the same "
             "files, a subprocess.")
    return write_result("prepare_throughput", cfg, results, args.out_dir, args.smoke, notes)


def _merge(out: Path) -> float:
    from megatron_vlm.data.prepare import merge_slices

    t0 = time.perf_counter()
    merge_slices(out, verbose=False, workers=1)
    return time.perf_counter() - t0


if __name__ == "__main__":
    main()
