"""Sliced preparation (issue 17 items 2, 4, 6): N slices + merge == one process (ids, bytes per
sample, splits, shard bytes, manifest, reject log, energon index), workers=2 == workers=1, the
reject log names every injected fault, parallel verification catches a truncated shard, the CLI's
--shard/--merge, and TarShard's bytes equal tarfile's."""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import pytest
from tiny_runs import load_tool

from megatron_vlm.data.mm_corpus import Shape, draw_scene, encode_image
from megatron_vlm.data.prepare import merge_slices, prepare_dataset, prepare_slice
from megatron_vlm.data.shards import (
    ShardVerificationError,
    TarShard,
    infer_modality,
    iter_shard,
    load_manifest,
    sample_modality,
    verify_shards,
)

REPO = Path(__file__).resolve().parents[2]
SPS = 2  # samples per shard: 13 train records -> 7 blocks over 3 slices

# (record or raw line, expected outcome): "ok" or the reject reason.
RECORDS = [
    ({"id": "a", "image": "media/a.jpg", "caption": "a red circle."}, "ok"),
    ({"id": "b", "text": "plain text."}, "ok"),
    ({"id": "c", "image": "media/b.png", "caption": "a png."}, "ok"),
    ({"id": "missing", "image": "media/nope.jpg", "caption": "x"}, "missing_file"),
    ({"id": "d", "segments": [{"text": "look:"}, {"image": "media/a.jpg"}]}, "ok"),
    ("{not json", "bad_record"),
    ({"id": "e", "text": "more text."}, "ok"),
    ({"id": "corrupt", "image": "media/bad.jpg", "caption": "x"}, "image_decode"),
    ({"id": "a", "text": "same id as record 0, in another slice"}, "duplicate_id"),
    ({"id": "empty", "text": "   "}, "empty_text"),
    ({"id": "f", "images": ["media/a.jpg", "media/b.png"], "caption": "two."}, "ok"),
    ({"id": "g", "text": "last but one."}, "ok"),
    ({"id": "h", "text": "last."}, "ok"),
]


def _tool():
    return load_tool("prepare_data")


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("raw")
    (root / "media").mkdir()
    img = draw_scene(16, 16, "white", [Shape("circle", "red", (0, 0))])
    (root / "media/a.jpg").write_bytes(encode_image(img, "jpg"))
    (root / "media/b.png").write_bytes(encode_image(img, "png"))
    (root / "media/bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg" * 4)
    (root / "train.jsonl").write_text("".join(
        (r if isinstance(r, str) else json.dumps(r)) + "\n" for r, _ in RECORDS))
    (root / "val.txt").write_text("held out one.\n\nheld out two.\n")
    return root


def _inputs(raw: Path) -> dict[str, list[Path]]:
    return {"train": [raw / "train.jsonl"], "val": [raw / "val.txt"]}


@pytest.fixture(scope="module")
def one(raw, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("one") / "ds"
    prepare_dataset(_inputs(raw), out, name="mix", samples_per_shard=SPS, progress=False,
                    verbose=False, workers=1)
    return out


def _tree(out: Path) -> dict[str, bytes]:
    """Every file a consumer reads, by relative path (not energon's sqlite/uuid)."""
    names = [*sorted(out.glob("*/shard_*.tar")), out / "mm_dataset.json", out / "rejects.jsonl",
             out / ".nv-meta/split.yaml", out / ".nv-meta/.info.json"]
    return {str(p.relative_to(out)): p.read_bytes() for p in names}


def _samples(out: Path) -> dict[str, dict[str, bytes]]:
    return {f"{p.parent.name}/{key}": members
            for p in sorted(out.glob("*/shard_*.tar")) for key, members in iter_shard(p)}


def test_one_process_keys_ids_and_energon_excludes(one, raw):
    samples = _samples(one)
    ok = [i for i, (_, outcome) in enumerate(RECORDS) if outcome in ("ok", "duplicate_id")]
    assert sorted(samples) == [f"train/train_{i:09d}" for i in ok] + [
        "val/val_000000000", "val/val_000000001"]
    ids = [json.loads(m["json"])["id"] for m in samples.values()]
    assert ids == ["a", "b", "c", "d", "e", "a", "f", "g", "h", "val_1", "val_3"]
    assert samples["train/train_000000000"]["m0.jpg"] == (raw / "media/a.jpg").read_bytes()
    manifest = json.loads((one / "mm_dataset.json").read_text())
    assert manifest["splits"]["train"]["samples"] == 8 and manifest["excluded"] == 1
    assert manifest["sample_modalities"] == {"text": 6, "image": 4, "video": 0, "mixed": 0}
    assert manifest["modality"] == "image"
    from megatron.energon.epathlib import EPath
    from megatron.energon.flavors.webdataset.metadata import WebdatasetMeta

    meta = WebdatasetMeta.from_config(EPath(one), split_part="train")
    assert meta.sample_excludes == {"train/shard_000004.tar/train_000000008"}


def test_three_slices_merged_equal_one_process(one, raw, tmp_path):
    out = tmp_path / "ds"
    for i in (2, 0, 1):  # any order, any machine
        part = prepare_slice(_inputs(raw), out, shard=(i, 3), name="mix", samples_per_shard=SPS,
                             workers=1)
        assert {int(e["path"][-10:-4]) % 3 for e in part["shards"]} <= {i}
    with pytest.raises(ValueError, match="other arguments"):
        prepare_slice(_inputs(raw), out, shard=(1, 3), name="mix", samples_per_shard=3)
    summary = merge_slices(out, verbose=False, workers=1)
    assert summary.written == {"train": 8, "val": 2}
    assert _samples(out) == _samples(one)  # same keys, ids, bytes per sample, splits
    assert _tree(out) == _tree(one)  # same shard bytes, manifest, reject log, energon split
    # A slice re-run (a requeued array task) does nothing and the merge stays the same.
    prepare_slice(_inputs(raw), out, shard=(0, 3), name="mix", samples_per_shard=SPS, workers=1)


def test_merge_names_missing_slices(raw, tmp_path):
    out = tmp_path / "ds"
    prepare_slice(_inputs(raw), out, shard=(1, 3), name="mix", samples_per_shard=SPS, workers=1)
    with pytest.raises(ValueError, match=r"slices \[0, 2\] of 3 are not done"):
        merge_slices(out, verbose=False)


def test_two_workers_equal_one(one, raw, tmp_path):
    out = tmp_path / "ds"
    prepare_dataset(_inputs(raw), out, name="mix", samples_per_shard=SPS, progress=False,
                    verbose=False, workers=2)
    assert _tree(out) == _tree(one)


def test_reject_log_lines_are_the_injected_faults(one, raw):
    lines = [json.loads(x) for x in (one / "rejects.jsonl").read_text().splitlines()]
    src = str(raw / "train.jsonl")
    media = {"missing_file": str(raw / "media/nope.jpg"),
             "image_decode": str(raw / "media/bad.jpg")}
    expected = [(src, f"{src}:{i + 1}", outcome, media.get(outcome))
                for i, (_, outcome) in enumerate(RECORDS) if outcome != "ok"]
    assert [(r["input"], r["where"], r["reason"], r["media"]) for r in lines] == expected
    messages = {r["reason"]: r["message"] for r in lines}
    assert "nope.jpg" in messages["missing_file"]
    assert "bad.jpg" in messages["image_decode"]
    assert "cannot decode image" in messages["image_decode"]
    assert "malformed JSON" in messages["bad_record"]
    assert "duplicate id 'a' (first: sample train_000000000)" in messages["duplicate_id"]
    assert not any("BytesIO" in m or " bytes>" in m for m in messages.values())
    manifest = json.loads((one / "mm_dataset.json").read_text())
    assert manifest["rejected"] == {o: 1 for _, o in RECORDS if o != "ok"}


def test_parallel_verify_catches_a_truncated_shard(one, tmp_path):
    out = tmp_path / "ds"
    shutil.copytree(one, out)
    assert verify_shards(out, deep=True, workers=2)["splits"]["val"]["samples"] == 2
    shard = out / "train/shard_000002.tar"
    data = bytearray(shard.read_bytes())
    data[700] ^= 0xFF  # same size, one byte altered
    shard.write_bytes(bytes(data))
    alt = out / "train/shard_000004.tar"
    alt.write_bytes(alt.read_bytes()[:1024])
    with pytest.raises(ShardVerificationError) as err:
        verify_shards(out, deep=True, workers=2)
    assert "shard_000004.tar: 1024 bytes on disk" in str(err.value)
    assert "shard_000002.tar: SHA-256 differs" in str(err.value)
    assert "2 bad shard(s)" in str(err.value)


def test_cli_shard_and_merge(one, raw, tmp_path, capsys):
    tool = _tool()
    out = tmp_path / "ds"
    base = ["--name", "mix", "--train", str(raw / "train.jsonl"), "--val", str(raw / "val.txt"),
            "--out", str(out), "--samples-per-shard", str(SPS), "--no-progress",
            "--workers", "1"]
    assert tool.main([*base, "--shard", "2/2"]) == 1
    assert "need 0 <= I < N" in capsys.readouterr().err
    assert tool.main(["--merge", str(out)]) == 1
    assert "no prepared slices" in capsys.readouterr().err
    for i in range(2):
        assert tool.main([*base, "--shard", f"{i}/2"]) == 0
    assert "--merge" in capsys.readouterr().out
    assert tool.main(["--merge", str(out), "--workers", "1"]) == 0
    assert "samples by modality: text 6 (60.0%), image 4 (40.0%)" in capsys.readouterr().out
    assert _tree(out) == _tree(one)
    assert tool.main(["--verify", str(out), "--deep", "--workers", "2"]) == 0


def test_tar_shard_bytes_equal_tarfile(tmp_path):
    members = {"k_0.json": b'{"id": 1}', "k_0.m0.jpg": bytes(range(256)) * 3, "k_1.json": b""}
    shard = TarShard(tmp_path / "a.tar")
    shard.add(members)
    entry = shard.close()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o644
            tar.addfile(info, io.BytesIO(data))
    assert (tmp_path / "a.tar").read_bytes() == buf.getvalue()
    assert entry["bytes"] == len(buf.getvalue()) and entry["samples"] == 1


def test_modality_per_sample():
    assert [sample_modality(t) for t in ([], ["image"] * 2, ["video"], ["image", "video"])] == [
        "text", "image", "video", "mixed"]
    from collections import Counter

    caption = Counter(caption=16)
    # 11 image samples and 5 video samples: an image dataset (it said "video 100%").
    assert infer_modality(caption, Counter(image=11, video=5)) == "image"
    assert infer_modality(caption, Counter(image=2, video=5, text=9)) == "video"
    assert infer_modality(caption, Counter(text=4)) == "text"
    assert infer_modality(Counter(interleaved=3, caption=1), Counter(image=4)) == "interleaved"


def _wchar() -> int:
    """Bytes this process has passed to write() so far (Linux /proc/self/io)."""
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("wchar:"):
            return int(line.split()[1])
    raise AssertionError("no wchar in /proc/self/io")


@pytest.mark.skipif(not Path("/proc/self/io").is_file(), reason="needs Linux /proc/self/io")
def test_no_sample_byte_is_written_twice(tmp_path):
    """Item 6: a slice writes each media byte once (no temporary tar, no loose copy)."""
    import numpy as np

    media = np.random.default_rng(0).integers(0, 256, 3 << 17, dtype=np.uint8).tobytes()
    (tmp_path / "big.jpg").write_bytes(media)  # 384 KiB, not decoded (check_media=False)
    records = [{"id": f"r{k}", "image": "big.jpg", "caption": "c."} for k in range(3)]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    before = _wchar()
    part = prepare_slice({"train": [tmp_path / "in.jsonl"]}, tmp_path / "ds", name="big",
                         samples_per_shard=2, check_media=False, workers=1)
    written = _wchar() - before
    shard_bytes = sum(s["bytes"] for s in part["shards"])
    assert shard_bytes > 3 * len(media)
    # the shards plus a few KB of slice metadata (sample list, reject log, partial manifest)
    assert shard_bytes <= written < shard_bytes + 16_384, (written, shard_bytes)


def test_slices_by_file_open_only_their_files_and_merge_to_one_process(raw, tmp_path,
                                                                       monkeypatch):
    """--slice-by file: input f goes to slice f % N, which never opens the other inputs; keys
    and shards are numbered within each file, so 2 slices merged == 1 process again."""
    from megatron_vlm.data import prepare

    lines = (raw / "train.jsonl").read_text().splitlines(keepends=True)
    files = [tmp_path / n for n in ("a.jsonl", "b.jsonl", "c.jsonl")]
    for path, part in zip(files, (lines[:5], lines[5:9], lines[9:])):
        path.write_text("".join(part))  # the duplicate "a" is b.jsonl's 4th record
    inputs = {"train": files, "val": [raw / "val.txt"]}
    one = tmp_path / "one"
    prepare_dataset(inputs, one, name="mix", media_root=raw, samples_per_shard=SPS,
                    progress=False, verbose=False, workers=1, slice_by="file")
    opened: list[str] = []
    real = prepare.iter_input
    monkeypatch.setattr(prepare, "iter_input", lambda p, r=None: (opened.append(p.name),
                                                                   real(p, r))[1])
    out = tmp_path / "sliced"
    for i in (1, 0):
        opened.clear()
        prepare_slice(inputs, out, shard=(i, 2), name="mix", media_root=raw,
                      samples_per_shard=SPS, workers=1, slice_by="file")
        assert opened == (["b.jsonl"] if i else ["a.jsonl", "c.jsonl", "val.txt"])
    merge_slices(out, verbose=False, workers=1)
    assert _tree(out) == _tree(one) and _samples(out) == _samples(one)
    assert sorted(_samples(one))[:3] == ["train/train_00000_000000000",
                                         "train/train_00000_000000001",
                                         "train/train_00000_000000002"]
    assert "train/shard_00001_000001.tar/train_00001_000000003" in (
        out / ".nv-meta/split.yaml").read_text()
    dup = [json.loads(x) for x in (out / "rejects.jsonl").read_text().splitlines()
           if '"duplicate_id"' in x]
    assert [d["where"] for d in dup] == [f"{files[1]}:4"]
    assert "first: sample train_00000_000000000" in dup[0]["message"]
    manifest = json.loads((out / "mm_dataset.json").read_text())
    assert manifest["splits"]["train"]["samples"] == 8


def test_docs_engine_examples_use_the_real_signatures():
    """docs/data_at_scale.md: the signatures it shows are the real ones, and every call of
    prepare_slice/merge_slices in its Ray/Dask examples binds to them."""
    import ast
    import inspect
    import re

    from megatron_vlm.data import prepare

    text = (REPO / "docs/data_at_scale.md").read_text()
    blocks = [ast.parse(b) for b in re.findall(r"```python\n(.*?)```", text, re.S)]
    real = {n: inspect.signature(getattr(prepare, n)) for n in ("prepare_slice", "merge_slices")}
    shown, calls = {}, 0
    for tree in blocks:
        for node in ast.walk(tree):
            if isinstance(node, ast.FunctionDef) and node.name in real:
                args = node.args
                defaults = [None] * (len(args.args) - len(args.defaults)) + args.defaults
                shown[node.name] = [(a.arg, d and ast.unparse(d)) for a, d in zip(
                    args.args, defaults)] + [(a.arg, d and ast.unparse(d)) for a, d in zip(
                        args.kwonlyargs, args.kw_defaults)]
            if isinstance(node, ast.Call):
                func = node.func
                if isinstance(func, ast.Call) and func.args:  # dask.delayed(prepare_slice)(...)
                    func = func.args[0]
                name = getattr(func, "id", None)
                if name in real:
                    real[name].bind(*[None] * len(node.args),
                                    **{k.arg: None for k in node.keywords})
                    calls += 1
    for name, sig in real.items():
        expected = [(p.name, None if p.default is p.empty else repr(p.default))
                    for p in sig.parameters.values()]
        assert shown[name] == expected, name
    assert calls >= 4  # Ray and Dask: a slice call and a merge call each


def test_auto_slicing_splits_a_folder_of_shards_by_file(tmp_path):
    """--slice-by auto: a folder of >= AUTO_FILE_INPUTS tars is expanded and sliced by file
    (shard_<f>_<b>), a single manifest by blocks (shard_<b>); folder and tar list agree."""
    from fixtures.formats import image_bytes
    from fixtures.loader_checks import write_tar

    from megatron_vlm.data.prepare import AUTO_FILE_INPUTS

    folder = tmp_path / "shards"
    for f in range(AUTO_FILE_INPUTS):
        write_tar(folder / f"{f:05d}.tar", [{"__key__": f"{f:05d}{k}", "jpg": image_bytes(f, "jpg"),
                                             "txt": f"caption {f} {k}".encode()}
                                            for k in range(2)])
    by_folder, by_list = tmp_path / "folder", tmp_path / "list"
    prepare_dataset({"train": [folder]}, by_folder, name="t", progress=False, verbose=False,
                    workers=1)
    prepare_dataset({"train": sorted(folder.glob("*.tar"))}, by_list, name="t",
                    progress=False, verbose=False, workers=1)
    shards = [e["path"] for e in load_manifest(by_folder)["splits"]["train"]["shards"]]
    assert shards == [f"train/shard_{f:05d}_000000.tar" for f in range(AUTO_FILE_INPUTS)]
    assert _tree(by_folder) == _tree(by_list)
    few = tmp_path / "few"
    prepare_dataset({"train": sorted(folder.glob("*.tar"))[:3]}, few, name="t",
                    progress=False, verbose=False, workers=1)
    assert [e["path"] for e in load_manifest(few)["splits"]["train"]["shards"]] == [
        "train/shard_000000.tar"]
