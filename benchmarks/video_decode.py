"""Video decode frames/s per core: decord vs PyAV on the same generated H.264 clips (SPEC §8:
decode frames/s per core >= best of decord / PyAV / torchcodec on the same clips).

Clips are encoded offline with PyAV's libx264 (moving square on a gradient, yuv420p, as in
tests/unit/test_video.py but at benchmark resolutions). Each backend decodes every frame of each
clip fully to RGB uint8 through ``megatron_vlm.data.video.decode_video(..., backend=...,
num_threads=1, max_frames=None)`` with fps set to the clip's own rate, so no frame is skipped.
One thread (torch/OMP threads 1, decord num_threads=1, PyAV's default single-thread decode),
so frames/s is per core. One untimed warm-up decode, then best of ``repeats`` passes per
(backend, clip).
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import parse_args, write_result


def make_clip(path: Path, width: int, height: int, num_frames: int, fps: int) -> Path:
    import av

    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([(xx * 255 // max(width - 1, 1)), (yy * 255 // max(height - 1, 1)),
                     np.full_like(xx, 90)], axis=-1).astype(np.uint8)
    side = max(8, height // 4)
    with av.open(str(path), "w") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"crf": "23", "preset": "veryfast"}
        for i in range(num_frames):
            img = base.copy()
            x = (4 + 3 * i) % max(width - side, 1)
            img[height // 4 : height // 4 + side, x : x + side] = (250, 200, 30)
            for packet in stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def bench(path: Path, backend: str, fps: int, repeats: int) -> tuple[float, int]:
    from megatron_vlm.data.video import decode_video

    decode_video(path, fps=float(fps), max_frames=None, backend=backend, num_threads=1)  # warm-up
    best, frames = float("inf"), 0
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = decode_video(path, fps=float(fps), max_frames=None, backend=backend,
                           num_threads=1)
        best = min(best, time.perf_counter() - t0)
        frames = len(out.frames)
    return best, frames


def main(argv: list[str] | None = None):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    torch.set_num_threads(1)
    args = parse_args(__doc__.splitlines()[0], argv)
    if args.smoke:
        clips = [("160x120", 160, 120, 24, 24)]
        repeats = 1
    else:
        clips = [("320x240", 320, 240, 240, 24), ("640x360", 640, 360, 180, 24),
                 ("1280x720", 1280, 720, 120, 24)]
        repeats = 3
    backends = []
    for name in ("decord", "pyav"):
        try:
            __import__("decord" if name == "decord" else "av")
            backends.append(name)
        except ImportError:
            pass
    results: dict = {"per_clip": {}, "best_backend": {}}
    with tempfile.TemporaryDirectory() as tmp:
        for label, w, h, n, fps in clips:
            path = make_clip(Path(tmp) / f"{label}.mp4", w, h, n, fps)
            row = {"frames": n, "fps": fps, "bytes": path.stat().st_size}
            for backend in backends:
                seconds, frames = bench(path, backend, fps, repeats)
                row[backend] = {"frames_decoded": frames, "seconds": seconds,
                                "frames_per_s_per_core": frames / seconds}
            results["per_clip"][label] = row
            results["best_backend"][label] = max(
                backends, key=lambda b: row[b]["frames_per_s_per_core"])
    if {"decord", "pyav"} <= set(backends):
        results["decord_over_pyav"] = {
            k: v["decord"]["frames_per_s_per_core"] / v["pyav"]["frames_per_s_per_core"]
            for k, v in results["per_clip"].items()}
    config = {"clips": [dict(zip(("label", "width", "height", "frames", "fps"), c))
                        for c in clips], "repeats": repeats, "threads": 1,
              "backends": backends, "torchcodec": "not installed; not measured"}
    notes = ("Full decode of every frame to RGB uint8 via decode_video, one thread; best of "
             "repeats. CPU numbers when device_kind is cpu.")
    return write_result("video_decode", config, results, args.out_dir, args.smoke, notes)


if __name__ == "__main__":
    main()
