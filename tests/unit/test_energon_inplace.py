"""Datasets that are not ours, trained on in place (issue 17 items 1 and 4): energon-prepared
``CaptioningSample`` / ``VQASample`` / crude interleaved datasets (made by the real ``energon
prepare`` CLI) and img2dataset tar folders indexed in place; the text that reaches the packed
batch, decoded back through the tokenizer; per-sample modality counts and their resume."""

from __future__ import annotations

import io
import json
import os
from collections import Counter
from pathlib import Path

import numpy as np
import PIL.Image
import pytest
from fixtures.loader_checks import decode_batch, energon_prepare, write_tar
from tiny_runs import load_tool

from megatron_vlm.config.data_mm import MultimodalDataConfig, StageMix
from megatron_vlm.data.corpus import bundled_corpus_dir
from megatron_vlm.data.kimi_tokenizer import SpecialTokensTokenizer
from megatron_vlm.data.mm_corpus import encode_h264
from megatron_vlm.data.mm_loader import MultimodalLoader, resolve_datasets
from megatron_vlm.data.shards import ShardVerificationError
from megatron_vlm.data.tokenizer import get_or_train_tokenizer

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")

CAPTIONS = ["a red circle in the top left cell", "two blue squares on a white background",
            "a green triangle", "three yellow circles and one purple square"]
VQA = [("what colour is the circle?", ["blue", "red"], [0.25, 0.75]),
       ("how many squares are there?", ["two"], None),
       ("where is the triangle?", ["in the middle cell", "bottom"], [0.9, 0.1])]


# ------------------------------------------------------------------------------ fixtures


def _image(fmt: str, seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, size=(28 + 4 * seed, 36, 3), dtype=np.uint8)
    buf = io.BytesIO()
    PIL.Image.fromarray(pixels).save(buf, format=fmt)
    return buf.getvalue()


def _video(seed: int) -> bytes:
    frames = np.zeros((4, 32, 32, 3), np.uint8)
    for t in range(4):
        frames[t, :, 8 * t: 8 * t + 8] = (40 * seed, 200, 60)
    return encode_h264(frames, fps=2)


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> SpecialTokensTokenizer:
    spm = get_or_train_tokenizer(bundled_corpus_dir(), tmp_path_factory.mktemp("spm"), 1024, 0)
    return SpecialTokensTokenizer(spm)


def _config(path: Path, **kw) -> MultimodalDataConfig:
    base = dict(root=str(path.parent), datasets={"ds": path.name}, num_workers=0,
                shuffle_buffer_size=1, packing_buffer_size=16, max_patches_per_micro_batch=2048,
                image_max_patches=1024, markers_loss=False,  # trained text: the text only
                mixes={"s": StageMix(weights={"ds": 1})}, stage="s")
    base.update(kw)
    return MultimodalDataConfig(**base)


def _loader(path: Path, tok, seq_length: int = 512, one_pass: bool = True,
            **kw) -> MultimodalLoader:
    return MultimodalLoader(_config(path, **kw), tok, seq_length=seq_length, global_batch_size=1,
                            dp_rank=0, dp_size=1, seed=3, one_pass=one_pass)


def _documents(path: Path, tok, **kw) -> tuple[dict[str, tuple[str, str]], dict[str, float]]:
    """sample id -> (decoded prompt text, decoded trained-on text) of every packed document,
    with the loader's metrics; media and special tokens are left out of both texts."""
    out = {}
    with _loader(path, tok, **kw) as mm:
        for pack in mm.packs():
            out.update(zip(pack.sample_ids, decode_batch(pack.batch, tok)))
        metrics = mm.metrics()
    return out, metrics


def _answer(tok, answer: str) -> str:
    """The trained-on text of a VQA answer: the answer and its turn's end (``<|im_end|>``)."""
    return tok.decode(tok.encode(answer) + tok.encode_with_special("<|im_end|>"))


# --------------------------------------------------------------------------------- tests


def test_energon_captioning_sample_trains_in_place(tmp_path, tok):
    ds = tmp_path / "cap"
    fmts = ["JPEG", "PNG", "JPEG", "WEBP"]
    write_tar(ds / "train" / "shard_000000.tar",
               [{"__key__": f"c{i}", "jpg": _image(f, i), "txt": c.encode()}
                for i, (f, c) in enumerate(zip(fmts, CAPTIONS))])
    write_tar(ds / "val" / "shard_000000.tar",
               [{"__key__": "v0", "jpg": _image("JPEG", 9), "txt": b"a blue circle"}])
    energon_prepare(ds, "CaptioningSample", {"image": "jpg", "caption": "txt"}, ("train", "val"))
    assert {"dataset.yaml", "split.yaml", ".info.json"} <= set(os.listdir(ds / ".nv-meta"))
    info = resolve_datasets(_config(ds), ["ds"])["ds"]
    assert info.modality == "image"
    assert info.manifest["splits"]["train"]["samples"] == 4
    assert info.manifest["splits"]["val"]["samples"] == 1
    docs, metrics = _documents(ds, tok)
    assert {sid: trained for sid, (_, trained) in docs.items()} == {
        f"c{i}": c for i, c in enumerate(CAPTIONS)}
    assert metrics["data/samples/image"] == 4 and metrics["data/samples/video"] == 0
    with _loader(ds, tok) as mm:  # energon's val split part: the held-out caption
        (val,) = mm.validation_batches(1)["ds"]
    assert [trained for _, trained in decode_batch(val, tok)] == ["a blue circle"]


def test_energon_vqa_sample_trains_on_the_best_answer_only(tmp_path, tok):
    ds = tmp_path / "vqa"
    write_tar(ds / "train" / "shard_000000.tar", [
        {"__key__": f"q{i}", "jpg": _image("JPEG", i),
         "json": json.dumps({"question": q, "answers": a,
                             **({"weights": w} if w else {})}).encode()}
        for i, (q, a, w) in enumerate(VQA)])
    energon_prepare(ds, "VQASample",
                    {"image": "jpg", "context": "json[question]", "answers": "json[answers]"})
    docs, _ = _documents(ds, tok)
    assert sorted(docs) == ["q0", "q1", "q2"]
    for i, (question, answers, _w) in enumerate(VQA):
        prompt, trained = docs[f"q{i}"]
        # No weights mapped: the first answer, then the end of the assistant turn (Kimi's chat
        # layout, the tiny tokenizer having no template of its own: <|im_end|> spelled out).
        assert trained == _answer(tok, answers[0])
        assert question in prompt and prompt.startswith(tok.decode(tok.encode("<|im_user|>user")))


def test_energon_vqa_answer_weights_pick_the_answer(tmp_path, tok):
    ds = tmp_path / "vqaw"
    rows = [(q, a, w) for q, a, w in VQA if w]
    write_tar(ds / "train" / "shard_000000.tar", [
        {"__key__": f"w{i}", "jpg": _image("PNG", i),
         "json": json.dumps({"question": q, "answers": a, "weights": w}).encode()}
        for i, (q, a, w) in enumerate(rows)])
    energon_prepare(ds, "VQASample", {"image": "jpg", "context": "json[question]",
                                      "answers": "json[answers]",
                                      "answer_weights": "json[weights]"})
    docs, _ = _documents(ds, tok)
    assert {k: v[1] for k, v in docs.items()} == {"w0": _answer(tok, "red"),
                                                  "w1": _answer(tok, "in the middle cell")}


def _interleaved_dataset(ds: Path) -> tuple[dict[str, str], dict[str, list]]:
    """Crude interleaved documents in the layout foreign.py documents: 3 image-only, 2
    video-only, 1 mixed, 1 text-only; returns id -> the document's text, and the sequences."""
    docs = {
        "i0": ["a red circle", {"image": "0.jpg"}, "then a blue square"],
        "i1": [{"image": "0.png"}, "two green triangles"],
        "i2": ["first", {"image": "0.jpg"}, "second", {"image": "1.webp"}],
        "v0": ["a circle moving left", {"video": "0.mp4"}],
        "v1": [{"video": "0.mp4"}, "a square moving up"],
        "m0": [{"image": "0.jpg"}, "and then", {"video": "1.mp4"}],
        "t0": ["only some text about a yellow circle"],
    }
    samples = []
    for n, (key, seq) in enumerate(docs.items()):
        members: dict = {"__key__": key, "json": json.dumps({"sequence": seq}).encode()}
        for item in seq:
            if isinstance(item, dict):
                part = next(iter(item.values()))
                fmt = {"jpg": "JPEG", "png": "PNG", "webp": "WEBP"}.get(part.split(".")[1])
                members[part] = _video(n) if fmt is None else _image(fmt, n)
        samples.append(members)
    write_tar(ds / "train" / "shard_000000.tar", samples[:4])
    write_tar(ds / "train" / "shard_000001.tar", samples[4:])
    energon_prepare(ds, "CrudeWebdataset")
    return {k: " ".join(x for x in seq if isinstance(x, str)) for k, seq in docs.items()}, docs


def test_energon_crude_interleaved_and_per_sample_modality(tmp_path, tok):
    ds = tmp_path / "inter"
    texts, sequences = _interleaved_dataset(ds)
    info = resolve_datasets(_config(ds), ["ds"])["ds"]
    assert info.modality == "interleaved" and info.manifest["splits"]["train"]["samples"] == 7
    docs, metrics = _documents(ds, tok)
    assert sorted(docs) == sorted(texts)
    for key, text in texts.items():
        prompt, trained = docs[key]
        segments = [x for x in sequences[key] if isinstance(x, str)]
        assert all(seg in prompt for seg in segments), key
        # every text segment is trained on (a document's first token has no target)
        assert text.endswith(trained) and len(trained) >= len(text) - len(text.split()[0]) - 1, key
    # per sample, from the media types (the dataset's own label stays: 100% interleaved)
    assert {m: metrics[f"data/samples/{m}"] for m in ("text", "image", "video", "mixed")} == {
        "text": 1, "image": 3, "video": 2, "mixed": 1}
    assert metrics["data/sample_fraction/video"] == pytest.approx(2 / 7)
    assert metrics["data/modality/interleaved"] == 1.0


def test_per_sample_modality_survives_resume_and_old_states_load(tmp_path, tok):
    ds = tmp_path / "inter"
    _interleaved_dataset(ds)
    modality = {"i": "image", "v": "video", "m": "mixed", "t": "text"}  # by sample id
    steps, cut = 9, 4  # small packs (S=64): the 7 documents take 3 packs an epoch

    def counts(metrics):
        return {m: metrics[f"data/samples/{m}"] for m in modality.values()}

    with _loader(ds, tok, seq_length=64, one_pass=False) as a:
        ids = []
        for step in range(steps):
            if step == cut:
                state = json.loads(json.dumps(a.state_dict()))
                before = list(ids)
            a.next_global_batch()
            ids += [i for pack in a.last_step_sample_ids for i in pack]
        full = counts(a.metrics())
    expected = {m: float(sum(modality[i[0]] == m for i in ids)) for m in modality.values()}
    assert full == expected and full["video"] > 0 and full["image"] > 0
    assert state["samples_by_modality"] == dict(Counter(modality[i[0]] for i in before))
    with _loader(ds, tok, seq_length=64, one_pass=False) as b:
        b.load_state_dict(state)
        for _ in range(steps - cut):
            b.next_global_batch()
        assert counts(b.metrics()) == full
    old = {k: v for k, v in state.items() if k != "samples_by_modality"}
    with _loader(ds, tok, seq_length=64, one_pass=False) as c:
        c.load_state_dict(old)  # saved before the field existed: counts start at zero
        assert counts(c.metrics()) == dict.fromkeys(modality.values(), 0.0)


def test_one_pass_resume_ends_with_the_dataset(tmp_path, tok):
    # The packing buffer (16) takes all 7 documents before the first pack: energon, restored
    # from a state saved then, replays the rest and would start the dataset again.
    ds = tmp_path / "inter"
    _interleaved_dataset(ds)
    with _loader(ds, tok, seq_length=64) as a:
        packs = a.packs()
        first = next(packs).sample_ids
        state = json.loads(json.dumps(a.state_dict()))
        rest = [i for p in packs for i in p.sample_ids]
    assert sorted(first + rest) == ["i0", "i1", "i2", "m0", "t0", "v0", "v1"]
    with _loader(ds, tok, seq_length=64) as b:
        b.load_state_dict(state)
        assert [i for p in b.packs() for i in p.sample_ids] == rest


def _img2dataset_folder(out: Path) -> dict[str, str]:
    """What img2dataset writes (webdataset output): NNNNN.tar with KEY.jpg|png|webp + KEY.txt +
    KEY.json, and NNNNN.parquet / NNNNN_stats.json beside."""
    captions = {}
    for shard in range(2):
        samples = []
        for j, (fmt, ext) in enumerate([("JPEG", "jpg"), ("PNG", "png"), ("WEBP", "webp")]):
            key = f"{shard:05d}{j:04d}"
            caption = CAPTIONS[(shard + j) % len(CAPTIONS)]
            meta = {"url": f"http://example.com/{key}.{ext}", "key": key, "status": "success",
                    "error_message": None, "width": 36, "height": 28, "caption": caption}
            samples.append({"__key__": key, ext: _image(fmt, j), "txt": caption.encode(),
                            "json": json.dumps(meta).encode()})
            captions[key] = caption
        if shard == 1:  # a caption that is not UTF-8: skipped (bad_record), never trained on
            samples.append({"__key__": "000019999", "jpg": _image("JPEG", 5),
                            "txt": b"\xff\xfe caption", "json": b"{}"})
        write_tar(out / f"{shard:05d}.tar", samples)
        (out / f"{shard:05d}.parquet").write_bytes(b"PAR1 not read by the loader PAR1")
        (out / f"{shard:05d}_stats.json").write_text(json.dumps({"count": 3, "successes": 3}))
    return captions


def test_img2dataset_folder_is_indexed_and_trained_in_place(tmp_path, tok):
    ds = tmp_path / "laion"
    captions = _img2dataset_folder(ds)
    before = {p: p.read_bytes() for p in ds.rglob("*") if p.is_file()}
    with pytest.raises(ValueError, match="index img2dataset tars in place"):
        resolve_datasets(_config(ds), ["ds"])  # not indexed yet: says how
    tool = load_tool("prepare_data")  # tools/prepare_data.py --index-in-place DIR
    assert tool.main(["--index-in-place", str(ds)]) == 0
    manifest = resolve_datasets(_config(ds), ["ds"])["ds"].manifest
    assert manifest["splits"]["train"]["samples"] == 7 and manifest["modality"] == "image"
    after = {p for p in ds.rglob("*") if p.is_file()}
    added = sorted(str(p.relative_to(ds)) for p in after - set(before))
    assert all(a.startswith(".nv-meta/") or a.endswith(".tar.idx") for a in added), added
    assert all(p.read_bytes() == data for p, data in before.items()), "a file was changed"
    docs, metrics = _documents(ds, tok)
    assert {k: trained for k, (_, trained) in docs.items()} == captions
    assert metrics["data/samples/image"] == 6 and metrics["data/skipped/bad_record"] == 1


def test_a_directory_that_is_no_dataset_gives_a_clear_error(tmp_path, tok):
    plain = tmp_path / "photos"
    plain.mkdir()
    (plain / "cat.jpg").write_bytes(_image("JPEG", 1))
    with pytest.raises(ValueError, match="neither a dataset prepared by tools/prepare_data.py "
                       ".* nor an energon dataset"):
        resolve_datasets(_config(plain), ["ds"])
    odd = tmp_path / "odd"  # an energon crude dataset of a layout no cooker reads
    write_tar(odd / "train" / "shard_000000.tar", [{"__key__": "a", "cls": b"3"}])
    energon_prepare(odd, "CrudeWebdataset")
    with pytest.raises(ValueError, match=r"members \['cls'\]\) are neither"):
        resolve_datasets(_config(odd), ["ds"])
    custom = tmp_path / "custom"  # a typed dataset with energon's sample_loader.py, no field map
    write_tar(custom / "train" / "shard_000000.tar",
               [{"__key__": "a", "jpg": _image("JPEG", 1), "txt": b"a red circle"}])
    energon_prepare(custom, "CaptioningSample")
    assert (custom / ".nv-meta" / "sample_loader.py").is_file()
    with pytest.raises(ValueError, match="CaptioningSample with a sample_loader is not read in "
                       "place; prepare it as CaptioningSample or VQASample with --field-map"):
        resolve_datasets(_config(custom), ["ds"])


def test_verify_modes_use_energons_index(tmp_path, tok):
    ds = tmp_path / "cap"
    samples = [{"__key__": f"c{i}", "jpg": _image("JPEG", i), "txt": c.encode()}
               for i, c in enumerate(CAPTIONS)]
    tar = ds / "train" / "shard_000000.tar"
    write_tar(tar, samples)
    energon_prepare(ds, "CaptioningSample", {"image": "jpg", "caption": "txt"})
    good = tar.read_bytes()
    # one sample more, same prefix: the size check passes, the deep re-read counts 5 vs 4
    write_tar(tar, samples + [{"__key__": "c9", "jpg": _image("JPEG", 9), "txt": b"x"}])
    resolve_datasets(_config(ds), ["ds"], "size")
    with pytest.raises(ShardVerificationError, match="5 samples readable, energon indexed 4"):
        resolve_datasets(_config(ds), ["ds"], "deep")
    tar.write_bytes(good[: len(good) // 2])  # cut short: the size check catches it
    with pytest.raises(ShardVerificationError, match="truncated"):
        resolve_datasets(_config(ds), ["ds"], "size")
    resolve_datasets(_config(ds), ["ds"], "none")
