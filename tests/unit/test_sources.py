"""Input readers (issue 17 item 1): every ecosystem format's fixture (tests/fixtures/formats.py,
real JPEG/PNG/WebP/H.264 bytes) read in place and normalised to the expected canonical samples
(ids, segments, media bytes and clips), the one-line errors for unknown inputs, and the media
names that rejections carry."""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from fixtures.formats import WRITERS, image_bytes, video_bytes, write_img2dataset

from megatron_vlm.data.media_errors import BadSampleError
from megatron_vlm.data.records import CanonicalSample, normalize_record, read_records
from megatron_vlm.data.sources import iter_input


def _read(path: Path, media_root: Path | None) -> tuple[list[CanonicalSample], list[tuple]]:
    """Samples and (where, reason, media, message) rejects, as preparation would see them."""
    root = media_root or (path if path.is_dir() else path.parent)
    samples, rejects = [], []
    for where, load in iter_input(path, media_root):
        try:
            samples.append(normalize_record(load(), root, check_media=True))
        except BadSampleError as exc:
            rejects.append((where, exc.reason, exc.media, str(exc)))
    return samples, rejects


@pytest.mark.parametrize("fmt", list(WRITERS))
def test_format_reads_to_expected_samples(tmp_path, fmt):
    fixture = WRITERS[fmt](tmp_path)
    samples, rejects = _read(fixture.path, fixture.media_root)
    got = [(s.id, s.segments, [(m.type, m.ext, m.data, m.clip) for m in s.media])
           for s in samples]
    want = [(e.id, e.segments, e.media) for e in fixture.samples]
    assert got == want
    assert [r[:3] for r in rejects] == [(r.where, r.reason, r.media) for r in fixture.rejects]
    for *_, message in rejects:
        assert "bytes>" not in message and "BytesIO" not in message


def test_img2dataset_single_tar_and_reject_message(tmp_path):
    fixture = write_img2dataset(tmp_path)
    tar = fixture.path / "00000.tar"
    samples, rejects = _read(tar, None)  # a .tar file, not only a folder ("utf-8 codec" before)
    assert [s.id for s in samples] == ["000000000", "000000001"]
    assert samples[1].segments[-1]["text"] == "a green square, lossless"
    assert len(rejects) == 1 and "failed_to_download" in rejects[0][3]
    assert "HTTP Error 404" in rejects[0][3]


def test_media_in_canonical_meta_carries_clip(tmp_path):
    fixture = WRITERS["panda70m"](tmp_path)
    samples, _ = _read(fixture.path, fixture.media_root)
    meta = json.loads(samples[1].to_members("train_000000001")["train_000000001.json"])
    assert meta["media"] == [{"type": "video", "ext": "mp4", "clip": [2.0, 3.75]}]
    plain = normalize_record({"id": "x", "text": "hi"}, tmp_path).to_members("k")
    assert "clip" not in json.dumps(json.loads(plain["k.json"])["media"])


def _one_line_error(path: Path, *needles: str) -> str:
    with pytest.raises(ValueError) as info:
        list(iter_input(path))
    message = str(info.value)
    assert "\n" not in message and "accepted inputs" in message
    for needle in ("WebDataset .tar", "LLaVA", "WebVid", "Panda-70M", "parquet", ".jsonl",
                   *needles):
        assert needle in message
    return message


def test_unknown_inputs_raise_one_line(tmp_path):
    (tmp_path / "empty_dir").mkdir()
    (tmp_path / "empty_dir" / "notes.md").write_text("no shards here")
    _one_line_error(tmp_path / "empty_dir", "no .tar shards")
    (tmp_path / "blob.jsonl").write_bytes(bytes(range(256)) * 4)
    _one_line_error(tmp_path / "blob.jsonl", "binary")
    (tmp_path / "blob.bin").write_bytes(b"\x89\x00\x01garbage")
    _one_line_error(tmp_path / "blob.bin", "binary")
    (tmp_path / "obj.json").write_text(json.dumps({"data": [1, 2]}, indent=2))
    _one_line_error(tmp_path / "obj.json", "not a list of records")
    (tmp_path / "latin1.csv").write_bytes(b"videoid,contentUrl,name\n" + b"1,a.mp4,ok\n" * 2000
                                          + b"2,b.mp4,caf\xe9\n")
    _one_line_error(tmp_path / "latin1.csv", "unreadable CSV after line")
    (tmp_path / "latin1.csv").write_bytes(b"videoid,contentUrl,name\n" + b"1,a.mp4,ok\n" * 400
                                          + b"2,b.mp4,caf\xe9\n")
    _one_line_error(tmp_path / "latin1.csv", "unreadable CSV at its start")
    (tmp_path / "other.csv").write_text("a,b\n1,2\n")
    _one_line_error(tmp_path / "other.csv", "['a', 'b']")
    pq.write_table(pa.table({"x": [1], "y": ["z"]}), tmp_path / "other.parquet")
    _one_line_error(tmp_path / "other.parquet", "neither captioning")
    (tmp_path / "fake.parquet").write_text("not parquet")
    _one_line_error(tmp_path / "fake.parquet", "unreadable parquet")
    _one_line_error(tmp_path / "missing.jsonl", "no such file")


def test_url_only_parquet_is_refused(tmp_path):
    fixture = write_img2dataset(tmp_path)  # img2dataset's metadata parquet: URLs, no bytes
    _one_line_error(fixture.path / "00000.parquet", "URL-only rows are out of scope")


def test_corrupt_media_errors_name_the_member(tmp_path):
    import webdataset as wds

    good = image_bytes(0, "jpg")
    with wds.TarWriter(str(tmp_path / "s.tar")) as sink:
        sink.write({"__key__": "k0", "jpg": good[: len(good) // 3], "txt": "cut short"})
        sink.write({"__key__": "k1", "png": b"not a png", "txt": "garbage"})
    _, rejects = _read(tmp_path / "s.tar", None)
    tar = tmp_path / "s.tar"
    assert [(r[1], r[2]) for r in rejects] == [("image_decode", f"{tar}:k0.jpg"),
                                               ("image_decode", f"{tar}:k1.png")]
    for *_, message in rejects:
        assert f"{tar}:k" in message and "bytes>" not in message and "BytesIO" not in message

    schema = pa.schema([("image", pa.struct([("bytes", pa.binary()), ("path", pa.string())])),
                        ("caption", pa.string())])
    pq.write_table(pa.Table.from_pylist(
        [{"image": {"bytes": b"\xff\xd8\xffjunk", "path": None}, "caption": "c"}], schema=schema),
        tmp_path / "p.parquet")
    _, rejects = _read(tmp_path / "p.parquet", None)
    assert [(r[1], r[2]) for r in rejects] == [("image_decode", f"{tmp_path / 'p.parquet'}:row 0")]
    assert "bytes>" not in rejects[0][3]

    (tmp_path / "v.mp4").write_bytes(video_bytes(0)[:300])
    with pytest.raises(BadSampleError) as info:
        normalize_record({"id": "v", "video": "v.mp4", "caption": "c"}, tmp_path)
    assert info.value.media == str(tmp_path / "v.mp4") and "bytes>" not in str(info.value)


def test_clip_values_checked(tmp_path):
    (tmp_path / "v.mp4").write_bytes(video_bytes(0))  # 4 s
    (tmp_path / "i.png").write_bytes(image_bytes(0, "png"))
    cases = [({"path": "v.mp4", "clip": [2.0, 1.0]}, "bad_record"),
             ({"path": "v.mp4", "clip": [float("nan"), 1.0]}, "bad_record"),
             ({"path": "i.png", "clip": [0, 1]}, "bad_record"),
             ({"path": "v.mp4", "clip": [9.0, 10.0]}, "video_empty")]
    for value, reason in cases:
        key = "video" if value["path"].endswith("mp4") else "image"
        with pytest.raises(BadSampleError) as info:
            normalize_record({"id": "x", key: value, "caption": "c"}, tmp_path)
        assert (info.value.reason, info.value.media) == (reason, str(tmp_path / value["path"]))
    sample = normalize_record({"id": "x", "segments": [
        {"type": "video", "path": "v.mp4", "clip": [1, 3]}, {"text": "t"}]}, tmp_path)
    assert sample.media[0].clip == (1.0, 3.0)


def test_truncated_tar_keeps_earlier_samples(tmp_path):
    fixture = write_img2dataset(tmp_path)
    tar = fixture.path / "00001.tar"
    full = tar.read_bytes()
    with tarfile.open(tar) as tf:
        members = tf.getmembers()  # json, txt, webp of the first sample, then the second's
    tar.write_bytes(full[:members[3].offset + 100])  # inside the second sample's first header
    samples, rejects = _read(tar, None)
    assert [s.id for s in samples] == ["000100000"]
    assert [r[:3] for r in rejects] == [(f"{tar}:<end>", "bad_record", str(tar))]
    assert "truncated" in rejects[0][3]
    last = members[2]
    assert last.name == "000100000.webp"
    tar.write_bytes(full[:last.offset_data + last.size // 2])  # inside the first sample's image
    samples, rejects = _read(tar, None)
    assert samples == []
    assert [r[:3] for r in rejects] == [(f"{tar}:000100000", "bad_record", f"{tar}:000100000.webp"),
                                        (f"{tar}:<end>", "bad_record", str(tar))]


def test_read_records_wrapper(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_bytes(b'{"id": 1, "text": "a"}\n\nnot json\n\xff\xfe\n')
    got = list(read_records(path))
    assert got[0] == (f"{path}:1", {"id": 1, "text": "a"})
    assert [(w, o.reason) for w, o in got[1:]] == [(f"{path}:3", "bad_record"),
                                                   (f"{path}:4", "bad_record")]


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT, tarfile.USTAR_FORMAT])
def test_tar_index_reads_every_tar_flavour(tmp_path, fmt):
    """Long names (GNU ``L``, pax ``path``, ustar prefix), pax sizes, folders and links skipped;
    offsets point at each member's bytes."""
    import io

    from megatron_vlm.data.tar_index import scan_tarfile

    path = tmp_path / "t.tar"
    long_dir = "d" * 90 + "/" + "e" * 60
    with tarfile.open(path, "w", format=fmt) as tf:
        for name, data in [("a/000.jpg", b"x" * 700), (f"{long_dir}/001.txt", b"caption"),
                           ("b/002.json", b"{}")]:
            info = tarfile.TarInfo(name)
            info.size, info.mtime = len(data), 1.5
            tf.addfile(info, io.BytesIO(data))
        folder = tarfile.TarInfo("c")
        folder.type = tarfile.DIRTYPE
        tf.addfile(folder)
        link = tarfile.TarInfo("c/link.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "a/000.jpg"
        tf.addfile(link)
    members, error = scan_tarfile(path)
    assert error is None
    assert [m[0] for m in members] == ["a/000.jpg", f"{long_dir}/001.txt", "b/002.json"]
    raw = path.read_bytes()
    assert [raw[o:o + n] for _, o, n in members] == [b"x" * 700, b"caption", b"{}"]
    keys = [w for w, _ in iter_input(path)]
    assert keys == [f"{path}:a/000", f"{path}:{long_dir}/001", f"{path}:b/002"]


def test_video_webdataset_tar(tmp_path):
    """video2dataset writes clips the same way (``KEY.mp4`` + ``KEY.txt`` + ``KEY.json``)."""
    import webdataset as wds

    clip = video_bytes(2, num_sampled=4)
    with wds.TarWriter(str(tmp_path / "00000.tar")) as sink:
        sink.write({"__key__": "v0", "mp4": clip, "txt": "a blue triangle moves down",
                    "json": json.dumps({"status": "success", "caption": "ignored: txt wins"})})
        sink.write({"__key__": "v1", "mp4": clip, "json": json.dumps({"caption": "from json"})})
    samples, rejects = _read(tmp_path, None)
    assert rejects == []
    assert [(s.id, s.segments[-1]["text"], [(m.type, m.ext, m.data) for m in s.media])
            for s in samples] == [("v0", "a blue triangle moves down", [("video", "mp4", clip)]),
                                  ("v1", "from json", [("video", "mp4", clip)])]


@pytest.mark.parametrize("fmt", ["webvid", "panda70m", "llava"])
def test_relative_input_paths(tmp_path, monkeypatch, fmt):
    """Inputs and --media-root given relative to the working directory resolve once."""
    fixture = WRITERS[fmt](tmp_path)
    monkeypatch.chdir(tmp_path)
    rel = lambda p: None if p is None else p.relative_to(tmp_path)  # noqa: E731
    samples, _ = _read(rel(fixture.path), rel(fixture.media_root))
    assert [s.media[0].data for s in samples] == [e.media[0][2] for e in fixture.samples]
