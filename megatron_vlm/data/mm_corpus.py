"""A deterministic synthetic multimodal corpus whose text depends on the pixels.

Four raw datasets (JSONL records referencing media files, the input format of
``tools/prepare_data.py``), each with a held-out ``val`` split drawn from another seed:

- ``image_caption``: images 56-224 px per side (any aspect ratio, JPEG or PNG) with 1-4 flat
  shapes (circle / square / triangle) in cells of a 3x3 grid on a plain background. The caption
  names the background, every shape's colour and cell, and the count of each kind.
- ``image_qa``: LLaVA-style conversations about such images (``{"from": "human"|"gpt"}`` turns,
  ``<image>`` in the first human turn); answers are read off the drawing (colours, cells, counts).
- ``video``: 112x112 H.264 clips (libx264, 4-6 s at 2 or 4 fps: 8-12 frames when sampled at the
  loader's 2 fps, i.e. 2-3 chunks of up to 4 frames) of a large shape moving at constant speed
  across a black frame (left/right/up/down) for the whole clip. Every position of the path is
  visited equally long, so the *set* of frames says nothing about the direction -- only their
  order does (so a model that ignores time cannot caption it; the frame-order probe relies on
  this). Nothing else happens in the clip: an event half way (a colour change, a shape appearing)
  would tie the direction to what is seen where, an order-free shortcut.
- ``interleaved``: documents of 2-3 (text, image) pairs, some with a video, where the text around
  each picture describes it.
- ``text``: plain documents from ``corpus.py`` (same vocabulary, so the tiny tokenizer fits).

Everything is drawn from seeded ``numpy`` generators and encoded single-threaded, so a seed gives
byte-identical files (PIL's JPEG/PNG and libx264 with ``threads=1`` are deterministic).
``bundled_mm_corpus`` generates and prepares the default corpus once into a cache directory
(~3 s, ~4 MB) instead of shipping it.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageDraw

from megatron_vlm.data.corpus import generate_corpus, number_to_words
from megatron_vlm.data.video import VIDEO_FPS

CORPUS_VERSION = 2
"""Bumped whenever generation changes, so cached copies are regenerated."""

COLOUR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 60),
    "blue": (40, 70, 220),
    "yellow": (240, 210, 30),
    "purple": (140, 50, 170),
    "orange": (250, 140, 20),
}
"""Shape colours (saturated, far apart in RGB so they survive JPEG/H.264)."""
BACKGROUND_RGB: dict[str, tuple[int, int, int]] = {
    "white": (245, 245, 245),
    "black": (15, 15, 15),
    "grey": (128, 128, 128),
}
SHAPE_KINDS = ("circle", "square", "triangle")
CELL_PHRASES = (
    ("at the top left", "at the top", "at the top right"),
    ("on the left", "in the middle", "on the right"),
    ("at the bottom left", "at the bottom", "at the bottom right"),
)
"""Where a shape is, by (row, column) of the 3x3 grid."""

VIDEO_SIZE = (112, 112)
"""(height, width) of the generated clips: multiples of 16 (libx264's macroblocks: other sizes
gave run-to-run different bytes that decode to the same frames) and of 28 (one merged token).
The tiny recipe samples them down to 56x56 (2x2 LLM tokens per chunk)."""
VIDEO_BACKGROUND = "black"
"""Every clip has this background: a video's pixels then vary only with the shape, its motion and
the event, so that is what a model must learn to use (a background that changes between clips
is learned first and alone by the tiny run)."""
VIDEO_SAMPLED_FRAMES = (8, 12)
"""Inclusive range of a clip's frame count at the loader's sampling rate (``VIDEO_FPS``)."""
VIDEO_SOURCE_FPS = (2, 4)
"""Frame rates the clips are written at (multiples of ``VIDEO_FPS``: sampling keeps every
``fps / VIDEO_FPS``-th frame, so the sampled clip is the same motion at any rate)."""
SHAPE_RADIUS = 28.0
"""Radius in pixels of the moving shape (a quarter of the frame): its colour and motion dominate
the tokens it passes through."""
DIRECTIONS = {
    "right": ("from the left to the right", (0.25, 0.5), (0.75, 0.5)),  # centre, frame fractions
    "left": ("from the right to the left", (0.75, 0.5), (0.25, 0.5)),
    "down": ("from the top to the bottom", (0.5, 0.25), (0.5, 0.75)),
    "up": ("from the bottom to the top", (0.5, 0.75), (0.5, 0.25)),
}
"""Motion direction -> (caption phrase, start (x, y), end (x, y)) as fractions of the frame."""

DEFAULT_SIZES: dict[str, tuple[int, int]] = {
    "image_caption": (600, 40),
    "image_qa": (300, 20),
    "video": (600, 64),
    "interleaved": (200, 16),
    "text": (1500, 60),
}
"""Records per dataset: (train, val)."""
DATASET_MODALITY = {
    "image_caption": "image",
    "image_qa": "image",
    "video": "video",
    "interleaved": "interleaved",
    "text": "text",
}
"""Modality label of each bundled dataset (used by mixes and metrics)."""


# ------------------------------------------------------------------------------------------ images


@dataclass
class Shape:
    kind: str
    colour: str
    cell: tuple[int, int]

    @property
    def phrase(self) -> str:
        return CELL_PHRASES[self.cell[0]][self.cell[1]]


def _plural(word: str, n: int) -> str:
    return word if n == 1 else word + "s"


def _a(word: str) -> str:
    """``word`` with its indefinite article."""
    return ("an " if word[0] in "aeiou" else "a ") + word


def _draw_shape(
    draw: PIL.ImageDraw.ImageDraw, kind: str, centre: tuple[float, float], radius: float, rgb
) -> None:
    cx, cy = centre
    box = (cx - radius, cy - radius, cx + radius, cy + radius)
    if kind == "circle":
        draw.ellipse(box, fill=rgb)
    elif kind == "square":
        draw.rectangle(box, fill=rgb)
    else:
        draw.polygon([(cx, cy - radius), (cx + radius, cy + radius), (cx - radius, cy + radius)],
                     fill=rgb)


def draw_scene(
    height: int, width: int, background: str, shapes: list[Shape]
) -> PIL.Image.Image:
    """Render shapes into the cells of a 3x3 grid on a plain background."""
    img = PIL.Image.new("RGB", (width, height), BACKGROUND_RGB[background])
    draw = PIL.ImageDraw.Draw(img)
    cell_h, cell_w = height / 3, width / 3
    radius = 0.35 * min(cell_h, cell_w)
    for s in shapes:
        centre = ((s.cell[1] + 0.5) * cell_w, (s.cell[0] + 0.5) * cell_h)
        _draw_shape(draw, s.kind, centre, radius, COLOUR_RGB[s.colour])
    return img


def random_scene(rng: np.random.Generator) -> tuple[int, int, str, list[Shape]]:
    """(height, width, background, shapes) of a random image scene."""
    height, width = (int(v) for v in rng.integers(56, 225, size=2))
    background = str(rng.choice(list(BACKGROUND_RGB)))
    num = int(rng.integers(1, 5))
    cells = rng.choice(9, size=num, replace=False)
    shapes = [
        Shape(
            kind=str(rng.choice(SHAPE_KINDS)),
            colour=str(rng.choice(list(COLOUR_RGB))),
            cell=(int(c) // 3, int(c) % 3),
        )
        for c in cells
    ]
    return height, width, background, shapes


def describe_scene(background: str, shapes: list[Shape]) -> str:
    """Caption of a scene: background, every shape with its cell, counts per kind."""
    n = len(shapes)
    parts = [
        f"a picture with a {background} background and {number_to_words(n)} "
        f"{_plural('shape', n)}."
    ]
    parts += [f"there is {_a(s.colour)} {s.kind} {s.phrase}." for s in shapes]
    counts = Counter(s.kind for s in shapes)
    listed = [f"{number_to_words(c)} {_plural(k, c)}" for k, c in sorted(counts.items())]
    parts.append(f"in all there {'is' if n == 1 else 'are'} {' and '.join(listed)}.")
    return " ".join(parts)


def scene_questions(
    rng: np.random.Generator, background: str, shapes: list[Shape]
) -> list[tuple[str, str]]:
    """1-3 (question, answer) pairs answerable from the picture alone."""
    counts = Counter(s.kind for s in shapes)
    pool = [
        ("how many shapes are there?", f"there {'is' if len(shapes) == 1 else 'are'} "
         f"{number_to_words(len(shapes))} {_plural('shape', len(shapes))}."),
        ("what colour is the background?", f"the background is {background}."),
    ]
    for s in shapes:
        pool.append((f"where is the {s.colour} {s.kind}?", f"it is {s.phrase}."))
        if counts[s.kind] == 1:
            pool.append((f"what colour is the {s.kind}?", f"the {s.kind} is {s.colour}."))
    for kind in SHAPE_KINDS:
        pool.append((f"how many {kind}s are there?", f"{number_to_words(counts[kind])}."))
    picks = rng.choice(len(pool), size=min(len(pool), int(rng.integers(1, 4))), replace=False)
    return [pool[int(i)] for i in picks]


def encode_image(img: PIL.Image.Image, fmt: str) -> bytes:
    buf = io.BytesIO()
    if fmt == "jpg":
        img.save(buf, format="JPEG", quality=90)
    else:
        img.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


# ------------------------------------------------------------------------------------------ videos


@dataclass
class VideoScript:
    """What happens in a clip; ``caption`` describes it in order."""

    num_sampled: int
    """Frames at the loader's sampling rate ``VIDEO_FPS`` (the clip lasts ``num_sampled /
    VIDEO_FPS`` seconds)."""
    fps: int
    """Frame rate the clip is written at."""
    background: str
    kind: str
    colour: str
    direction: str

    @property
    def caption(self) -> str:
        return (f"a video of {_a(self.colour)} {self.kind} on a {self.background} background. "
                f"the {self.kind} moves {DIRECTIONS[self.direction][0]}.")

    @property
    def num_frames(self) -> int:
        """Frames in the written clip."""
        return int(round(self.num_sampled * self.fps / VIDEO_FPS))


def random_video_script(rng: np.random.Generator) -> VideoScript:
    return VideoScript(
        num_sampled=int(rng.integers(VIDEO_SAMPLED_FRAMES[0], VIDEO_SAMPLED_FRAMES[1] + 1)),
        fps=int(rng.choice(VIDEO_SOURCE_FPS)),
        background=VIDEO_BACKGROUND,
        kind=str(rng.choice(SHAPE_KINDS)),
        colour=str(rng.choice(list(COLOUR_RGB))),
        direction=str(rng.choice(list(DIRECTIONS))),
    )


def render_video_frames(script: VideoScript) -> np.ndarray:
    """[T, 112, 112, 3] uint8 frames. Time is measured in sampled frames ``u = i * VIDEO_FPS /
    fps``: the shape moves at constant speed from the start (``u = 0``) to the end of its path
    (the last sampled frame)."""
    height, width = VIDEO_SIZE
    _, start, end = DIRECTIONS[script.direction]
    frames = []
    for i in range(script.num_frames):
        a = min(i * VIDEO_FPS / script.fps / (script.num_sampled - 1), 1.0)
        pos = (start[0] + a * (end[0] - start[0]), start[1] + a * (end[1] - start[1]))
        img = PIL.Image.new("RGB", (width, height), BACKGROUND_RGB[script.background])
        _draw_shape(PIL.ImageDraw.Draw(img), script.kind, (pos[0] * width, pos[1] * height),
                    SHAPE_RADIUS, COLOUR_RGB[script.colour])
        frames.append(np.asarray(img, dtype=np.uint8))
    return np.stack(frames)


def encode_h264(frames: np.ndarray, fps: int) -> bytes:
    """MP4/H.264 bytes of RGB frames (libx264, one thread: deterministic)."""
    import av

    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.height, stream.width = frames.shape[1:3]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "18", "preset": "veryfast", "threads": "1"}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return buf.getvalue()


# ---------------------------------------------------------------------------------- raw datasets


class _MediaWriter:
    """Writes media files under ``root/media`` and returns paths relative to ``root``."""

    def __init__(self, root: Path, prefix: str) -> None:
        self.root = root
        self.prefix = prefix
        self.num = 0
        (root / "media").mkdir(parents=True, exist_ok=True)

    def write(self, data: bytes, ext: str) -> str:
        rel = f"media/{self.prefix}_{self.num:06d}.{ext}"
        self.num += 1
        (self.root / rel).write_bytes(data)
        return rel


def _image(rng: np.random.Generator, media: _MediaWriter) -> tuple[str, str, list[Shape], str]:
    """A random image file: (path, background, shapes, caption)."""
    height, width, background, shapes = random_scene(rng)
    fmt = "png" if rng.random() < 0.2 else "jpg"
    path = media.write(encode_image(draw_scene(height, width, background, shapes), fmt), fmt)
    return path, background, shapes, describe_scene(background, shapes)


def _video(rng: np.random.Generator, media: _MediaWriter) -> tuple[str, str]:
    script = random_video_script(rng)
    path = media.write(encode_h264(render_video_frames(script), script.fps), "mp4")
    return path, script.caption


def _records(name: str, num: int, rng: np.random.Generator, media: _MediaWriter) -> list[dict]:
    records: list[dict] = []
    if name == "text":
        docs = generate_corpus(num, int(rng.integers(1 << 31)))
        return [{"id": f"{media.prefix}_{i:06d}", "text": d} for i, d in enumerate(docs)]
    for i in range(num):
        rid = f"{media.prefix}_{i:06d}"
        if name == "image_caption":
            path, _, _, caption = _image(rng, media)
            records.append({"id": rid, "image": path, "caption": caption})
        elif name == "image_qa":
            path, background, shapes, _ = _image(rng, media)
            turns = []
            for k, (q, a) in enumerate(scene_questions(rng, background, shapes)):
                turns.append({"from": "human", "value": ("<image>\n" if k == 0 else "") + q})
                turns.append({"from": "gpt", "value": a})
            records.append({"id": rid, "image": path, "conversations": turns})
        elif name == "video":
            path, caption = _video(rng, media)
            records.append({"id": rid, "video": path, "caption": caption})
        elif name == "interleaved":
            segments: list[dict] = [{"text": "a page about pictures."}]
            for k in range(int(rng.integers(2, 4))):
                path, _, _, caption = _image(rng, media)
                segments += [{"text": f" picture {number_to_words(k + 1)}:"}, {"image": path},
                             {"text": " " + caption}]
            if rng.random() < 0.25:
                path, caption = _video(rng, media)
                segments += [{"text": " and a short video:"}, {"video": path},
                             {"text": " " + caption}]
            records.append({"id": rid, "segments": segments})
        else:
            raise ValueError(f"unknown bundled dataset {name!r}; choose from {list(DEFAULT_SIZES)}")
    return records


def write_raw_corpus(
    out_dir: str | os.PathLike,
    sizes: dict[str, tuple[int, int]] | None = None,
    seed: int = 0,
) -> dict[str, dict[str, Path]]:
    """Write media files and JSONL records of every dataset and split into ``out_dir``.

    Args:
        out_dir: Directory to create; media go to ``out_dir/media``, records to
            ``out_dir/<name>.<split>.jsonl`` with media paths relative to ``out_dir``.
        sizes: ``name -> (num_train, num_val)``; defaults to ``DEFAULT_SIZES``.
        seed: Base seed; each (dataset, split) gets its own generator, so sizes of one dataset do
            not change another's content.

    Returns:
        ``name -> split -> JSONL path``.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    sizes = dict(DEFAULT_SIZES if sizes is None else sizes)
    paths: dict[str, dict[str, Path]] = {}
    for d_idx, name in enumerate(sorted(sizes)):
        paths[name] = {}
        for s_idx, (split, num) in enumerate(zip(("train", "val"), sizes[name])):
            rng = np.random.default_rng([seed, d_idx, s_idx, CORPUS_VERSION])
            media = _MediaWriter(out, f"{name}_{split}")
            records = _records(name, num, rng, media)
            path = out / f"{name}.{split}.jsonl"
            path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
            paths[name][split] = path
    return paths


def default_cache_dir() -> Path:
    """``$MEGATRON_VLM_CACHE`` or ``~/.cache/megatron_vlm``."""
    env = os.environ.get("MEGATRON_VLM_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "megatron_vlm"


def bundled_mm_corpus(
    cache_dir: str | os.PathLike | None = None,
    sizes: dict[str, tuple[int, int]] | None = None,
    seed: int = 0,
    samples_per_shard: int = 100,
) -> Path:
    """Root of the prepared bundled corpus (one energon dataset per name), built on first use.

    Generation and preparation run into a temporary directory that is renamed into place, so
    concurrent callers never see a half-written corpus (the loser of a race discards its copy).

    Args:
        cache_dir: Parent directory (default ``default_cache_dir()``).
        sizes: ``name -> (num_train, num_val)`` (default ``DEFAULT_SIZES``).
        seed: Generation seed.
        samples_per_shard: Samples per tar shard.

    Returns:
        ``<cache_dir>/mm_corpus_v<version>_<hash>/``, holding ``<name>/`` prepared datasets.
    """
    from megatron_vlm.data.shards import prepare_dataset  # shards imports nothing from here

    sizes = dict(DEFAULT_SIZES if sizes is None else sizes)
    tag = json.dumps([CORPUS_VERSION, seed, samples_per_shard, sorted(sizes.items())])
    digest = f"{hash_text(tag):016x}"[:12]
    root = Path(cache_dir or default_cache_dir()) / f"mm_corpus_v{CORPUS_VERSION}_{digest}"
    if (root / "COMPLETE").is_file():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=root.parent, prefix=".mm_corpus_tmp_"))
    try:
        raw = write_raw_corpus(tmp / "raw", sizes, seed)
        for name, splits in raw.items():
            prepare_dataset(
                {split: [path] for split, path in splits.items()},
                tmp / name,
                name=name,
                modality=DATASET_MODALITY.get(name),
                media_root=tmp / "raw",
                samples_per_shard=samples_per_shard,
                progress=False,
                verbose=False,
            )
        shutil.rmtree(tmp / "raw")
        (tmp / "COMPLETE").write_text(tag + "\n")
        try:
            os.replace(tmp, root)
        except OSError:  # another process finished first (non-empty target): use theirs
            if not (root / "COMPLETE").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def hash_text(text: str) -> int:
    """Stable 64-bit hash (Python's ``hash`` is salted per process)."""
    import hashlib

    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little")
