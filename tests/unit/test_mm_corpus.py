"""Bundled multimodal corpus: deterministic bytes, and captions that the pixels confirm.

The checks read the written files back with PIL / PyAV and compare against the captions parsed as
text, independently of the generator's internal state."""

from __future__ import annotations

import hashlib
import io
import json
import re
from pathlib import Path

import av
import numpy as np
import PIL.Image
import pytest

from megatron_vlm.data.mm_corpus import BACKGROUND_RGB, COLOUR_RGB, write_raw_corpus

SIZES = {"image_caption": (24, 4), "image_qa": (8, 2), "video": (24, 4), "interleaved": (4, 2),
         "text": (10, 3)}
CELLS = {
    "at the top left": (0, 0), "at the top": (0, 1), "at the top right": (0, 2),
    "on the left": (1, 0), "in the middle": (1, 1), "on the right": (1, 2),
    "at the bottom left": (2, 0), "at the bottom": (2, 1), "at the bottom right": (2, 2),
}
SHAPE_RE = re.compile(r"there is an? (\w+) (circle|square|triangle) ((?:at|on|in) the [a-z ]+?)\.")


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("raw")
    write_raw_corpus(out, SIZES, seed=3)
    return out


def _records(raw: Path, name: str, split: str = "train") -> list[dict]:
    return [json.loads(line) for line in (raw / f"{name}.{split}.jsonl").read_text().splitlines()]


def _digest(root: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(root)).encode())
        h.update(path.read_bytes())
    return h.hexdigest()


def test_same_seed_same_bytes_other_seed_differs(raw, tmp_path):
    write_raw_corpus(tmp_path / "a", SIZES, seed=3)
    write_raw_corpus(tmp_path / "b", SIZES, seed=4)
    assert _digest(tmp_path / "a") == _digest(raw)
    assert _digest(tmp_path / "b") != _digest(raw)


def test_splits_sizes_and_unique_ids(raw):
    ids = set()
    for name, (num_train, num_val) in SIZES.items():
        for split, num in (("train", num_train), ("val", num_val)):
            recs = _records(raw, name, split)
            assert len(recs) == num
            ids.update(r["id"] for r in recs)
    assert len(ids) == sum(a + b for a, b in SIZES.values())


def _near(pixel: np.ndarray, rgb: tuple[int, int, int], tol: int = 45) -> bool:
    return bool(np.abs(pixel.astype(int) - np.array(rgb)).max() <= tol)


def test_image_captions_match_pixels(raw):
    recs = _records(raw, "image_caption") + _records(raw, "image_caption", "val")
    sizes = set()
    for rec in recs:
        img = np.asarray(PIL.Image.open(raw / rec["image"]).convert("RGB"))
        height, width = img.shape[:2]
        sizes.add((height, width))
        assert 56 <= height <= 224 and 56 <= width <= 224
        background = re.search(r"with a (\w+) background", rec["caption"]).group(1)
        shapes = SHAPE_RE.findall(rec["caption"])
        count = re.search(r"background and (\w+) shape", rec["caption"]).group(1)
        assert count == ["one", "two", "three", "four"][len(shapes) - 1]
        described = {}
        for colour, _kind, phrase in shapes:
            described[CELLS[phrase]] = colour
        for row in range(3):
            for col in range(3):
                y, x = int((row + 0.5) * height / 3), int((col + 0.5) * width / 3)
                want = COLOUR_RGB[described[(row, col)]] if (row, col) in described else (
                    BACKGROUND_RGB[background])
                assert _near(img[y, x], want), (rec["id"], row, col, img[y, x], want)
    assert any(h / w > 1.3 for h, w in sizes) and any(h / w < 0.77 for h, w in sizes)  # tall+wide


def test_conversations_answer_from_the_picture(raw):
    for rec in _records(raw, "image_qa"):
        turns = rec["conversations"]
        assert turns[0]["from"] == "human" and turns[0]["value"].startswith("<image>\n")
        assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
        img = np.asarray(PIL.Image.open(raw / rec["image"]).convert("RGB"))
        for q, a in zip(turns[::2], turns[1::2]):
            m = re.search(r"where is the (\w+) (\w+)\?", q["value"])
            if m:
                row, col = CELLS[re.match(r"it is (.+)\.", a["value"]).group(1)]
                y, x = int((row + 0.5) * img.shape[0] / 3), int((col + 0.5) * img.shape[1] / 3)
                assert _near(img[y, x], COLOUR_RGB[m.group(1)])


def _frames(path: Path) -> tuple[np.ndarray, float]:
    with av.open(str(path)) as c:
        stream = c.streams.video[0]
        frames = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(stream)])
        return frames, float(stream.average_rate)


def _centroid(frame: np.ndarray, rgb) -> tuple[float, float, int]:
    mask = np.abs(frame.astype(int) - np.array(rgb)).max(axis=-1) < 50
    ys, xs = np.nonzero(mask)
    return (float(xs.mean()) if len(xs) else -1.0, float(ys.mean()) if len(ys) else -1.0,
            int(mask.sum()))


AXIS = {"left": (0, 1), "right": (0, -1), "top": (1, 1), "bottom": (1, -1)}
"""Start side -> (axis of the motion, sign that makes progress positive)."""


def test_video_captions_match_the_motion_and_only_order_tells_it(raw):
    sampled = set()
    for rec in _records(raw, "video") + _records(raw, "video", "val"):
        frames, fps = _frames(raw / rec["video"])
        assert fps in (2, 4) and frames.shape[1:] == (112, 112, 3)
        step = int(fps) // 2  # the loader samples 2 fps: every step-th frame
        n = len(frames) // step
        assert len(frames) % step == 0 and 8 <= n <= 12  # 2-3 chunks, the last one short or not
        sampled.add(n)
        cap = rec["caption"]
        colour = re.match(r"a video of an? (\w+) \w+ on a black background\.", cap).group(1)
        src, dst = re.search(r"the \w+ moves from the (\w+) to the (\w+)\.$", cap).groups()
        axis, sign = AXIS[src]
        assert AXIS[dst] == (axis, -sign)
        pos = [sign * _centroid(frames[k * step], COLOUR_RGB[colour])[axis] for k in range(n)]
        # Steady progress from the start side across most of the frame ...
        assert all(b > a + 2 for a, b in zip(pos, pos[1:])), (rec["id"], pos)
        assert abs(pos[-1] - pos[0]) > 40
        # ... at constant speed: frame k and frame n-1-k lie symmetric about the middle of the
        # path, so the set of frames is the same for either direction (only the order tells).
        mid = [pos[k] + pos[n - 1 - k] for k in range(n)]
        assert max(mid) - min(mid) < 4, (rec["id"], pos)
    assert len(sampled) >= 3  # full and short last chunks both occur


def test_interleaved_and_text_records(raw):
    for rec in _records(raw, "interleaved"):
        media = [s for s in rec["segments"] if "image" in s or "video" in s]
        assert 2 <= len(media) and all((raw / (s.get("image") or s["video"])).is_file()
                                       for s in media)
        for k, seg in enumerate(rec["segments"][:-1]):
            if "image" in seg:  # the text right after a picture describes it
                img = np.asarray(PIL.Image.open(io.BytesIO((raw / seg["image"]).read_bytes())))
                colour, _, phrase = SHAPE_RE.findall(rec["segments"][k + 1]["text"])[0]
                row, col = CELLS[phrase]
                y, x = int((row + 0.5) * img.shape[0] / 3), int((col + 0.5) * img.shape[1] / 3)
                assert _near(img[y, x], COLOUR_RGB[colour])
    texts = _records(raw, "text")
    assert all(isinstance(r["text"], str) and r["text"] for r in texts)
