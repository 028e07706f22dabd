"""A deterministic synthetic multimodal corpus whose text depends on the pixels.

Four raw datasets (JSONL records referencing media files, the input format of
``tools/prepare_data.py``), each with a held-out ``val`` split drawn from another seed:

- ``image_caption``: images 56-224 px per side (any aspect ratio, JPEG or PNG) with 1-4 flat
  shapes (circle / square / triangle) in cells of a 3x3 grid on a plain background. The caption
  names the background, every shape's colour and cell, and the count of each kind.
- ``image_qa``: LLaVA-style conversations about such images (``{"from": "human"|"gpt"}`` turns,
  ``<image>`` in the first human turn); answers are read off the drawing (colours, cells, counts).
- ``video``: 112x84 H.264 clips (libx264, 6-12 frames at 2-4 fps) of a shape that first moves
  across the frame (left/right/up/down), then does a second thing (moves back, another shape
  appears, it changes colour, or it disappears). The caption says what happens in that order.
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

CORPUS_VERSION = 1
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

VIDEO_SIZE = (84, 112)
"""(height, width) of the generated clips."""
DIRECTIONS = {
    "right": ("from the left to the right", (0.15, 0.5), (0.85, 0.5)),
    "left": ("from the right to the left", (0.85, 0.5), (0.15, 0.5)),
    "down": ("from the top to the bottom", (0.5, 0.2), (0.5, 0.8)),
    "up": ("from the bottom to the top", (0.5, 0.8), (0.5, 0.2)),
}
"""Motion direction -> (caption phrase, start (x, y), end (x, y)) as fractions of the frame."""
REVERSE = {"right": "left", "left": "right", "down": "up", "up": "down"}

DEFAULT_SIZES: dict[str, tuple[int, int]] = {
    "image_caption": (600, 40),
    "image_qa": (300, 20),
    "video": (300, 20),
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

    num_frames: int
    fps: int
    background: str
    kind: str
    colour: str
    direction: str
    second: str
    """``back`` | ``appear`` | ``recolour`` | ``vanish``."""
    other: Shape
    """The shape that appears (``appear``) or the new colour (``recolour``: ``other.colour``)."""

    @property
    def caption(self) -> str:
        first = (
            f"a video of {_a(self.colour)} {self.kind} on a {self.background} background. "
            f"first the {self.kind} moves {DIRECTIONS[self.direction][0]}."
        )
        if self.second == "back":
            then = f"then it moves back {DIRECTIONS[REVERSE[self.direction]][0]}."
        elif self.second == "appear":
            then = (f"then {_a(self.other.colour)} {self.other.kind} appears "
                    f"{self.other.phrase}.")
        elif self.second == "recolour":
            then = f"then the {self.kind} turns {self.other.colour}."
        else:
            then = f"then the {self.kind} disappears."
        return f"{first} {then}"


def random_video_script(rng: np.random.Generator) -> VideoScript:
    colour = str(rng.choice(list(COLOUR_RGB)))
    other_colour = str(rng.choice([c for c in COLOUR_RGB if c != colour]))
    cell = int(rng.choice([0, 2, 6, 8]))  # a corner: never on the moving shape's path
    return VideoScript(
        num_frames=int(rng.integers(6, 13)),
        fps=int(rng.choice([2, 3, 4])),
        background=str(rng.choice(list(BACKGROUND_RGB))),
        kind=str(rng.choice(SHAPE_KINDS)),
        colour=colour,
        direction=str(rng.choice(list(DIRECTIONS))),
        second=str(rng.choice(["back", "appear", "recolour", "vanish"])),
        other=Shape(str(rng.choice(SHAPE_KINDS)), other_colour, (cell // 3, cell % 3)),
    )


def render_video_frames(script: VideoScript) -> np.ndarray:
    """[T, 84, 112, 3] uint8 frames: frames [0, T/2) do the move, the rest the second event."""
    height, width = VIDEO_SIZE
    n = script.num_frames
    first = n // 2
    _, start, end = DIRECTIONS[script.direction]
    frames = []
    radius = 9.0
    for f in range(n):
        img = PIL.Image.new("RGB", (width, height), BACKGROUND_RGB[script.background])
        draw = PIL.ImageDraw.Draw(img)
        colour, visible = script.colour, True
        if f < first:
            a = f / max(first - 1, 1)
            pos = (start[0] + a * (end[0] - start[0]), start[1] + a * (end[1] - start[1]))
        else:
            pos = end
            if script.second == "back":
                a = (f - first + 1) / max(n - first, 1)
                pos = (end[0] + a * (start[0] - end[0]), end[1] + a * (start[1] - end[1]))
            elif script.second == "recolour":
                colour = script.other.colour
            elif script.second == "vanish":
                visible = False
            else:  # appear: the second shape is drawn from this frame on
                o = script.other
                centre = ((o.cell[1] + 0.5) * width / 3, (o.cell[0] + 0.5) * height / 3)
                _draw_shape(draw, o.kind, centre, 8.0, COLOUR_RGB[o.colour])
        if visible:
            _draw_shape(draw, script.kind, (pos[0] * width, pos[1] * height), radius,
                        COLOUR_RGB[colour])
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
