"""prepare_dataset / tools/prepare_data.py: canonical samples, rejections per reason, shard
verification (a tar cut short while writing, truncated or altered after), energon's index."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from tiny_runs import load_tool

from megatron_vlm.data.mm_corpus import (
    Shape,
    draw_scene,
    encode_h264,
    encode_image,
    random_video_script,
    render_video_frames,
)
from megatron_vlm.data.shards import (
    ShardVerificationError,
    iter_shard,
    prepare_dataset,
    verify_shards,
)

REPO = Path(__file__).resolve().parents[2]


def _tool():
    return load_tool("prepare_data")


@pytest.fixture()
def raw(tmp_path) -> Path:
    """Raw inputs with 6 good records and one bad record per rejection reason."""
    media = tmp_path / "media"
    media.mkdir()
    img = draw_scene(70, 120, "white", [Shape("circle", "red", (1, 1))])
    (media / "a.jpg").write_bytes(encode_image(img, "jpg"))
    (media / "b.png").write_bytes(encode_image(img, "png"))
    clip = encode_h264(render_video_frames(random_video_script(np.random.default_rng(0))), 3)
    (media / "v.mp4").write_bytes(clip)
    (media / "bad.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg" * 10)
    (media / "cut.mp4").write_bytes(clip[: len(clip) // 3])
    lines = [
        {"id": "cap", "image": "media/a.jpg", "caption": "a red circle."},
        {"id": "vid", "video": "media/v.mp4", "caption": "a clip."},
        {"id": "conv", "images": ["media/a.jpg", "media/b.png"], "conversations": [
            {"from": "human", "value": "<image>\nwhat is this?"},
            {"from": "gpt", "value": "a circle."},
            {"from": "human", "value": "and <image>?"},
            {"from": "gpt", "value": "the same."}]},
        {"id": "doc", "segments": [{"text": "look:"}, {"image": "media/b.png"},
                                   {"text": "a circle."}, {"video": "media/v.mp4"}]},
        {"id": "txt", "text": "just text."},
        {"id": "missing", "image": "media/nope.jpg", "caption": "x"},
        {"id": "corrupt", "image": "media/bad.jpg", "caption": "x"},
        {"id": "cutvid", "video": "media/cut.mp4", "caption": "x"},
        {"id": "pad", "text": "sneaky <|media_pad|> token"},
        {"id": "cap", "text": "duplicate id"},
        {"id": "weird", "foo": 1},
        {"id": "empty", "segments": [{"text": "   "}]},
    ]
    body = "".join(json.dumps(r) + "\n" for r in lines) + "{not json\n"
    (tmp_path / "train.jsonl").write_text(body)
    (tmp_path / "val.txt").write_text("held out one.\n\nheld out two.\n")
    return tmp_path


def test_prepare_writes_canonical_samples_and_counts_rejections(raw, tmp_path):
    out = tmp_path / "ds"
    summary = prepare_dataset({"train": [raw / "train.jsonl"], "val": [raw / "val.txt"]}, out,
                              name="mixed", samples_per_shard=2, progress=False, verbose=False)
    assert summary.written == {"train": 5, "val": 2}
    assert dict(summary.rejected) == {
        "missing_file": 1, "image_decode": 1, "video_decode": 1, "placeholder_in_text": 1,
        "duplicate_id": 1, "bad_record": 2, "empty_text": 1,
    }
    assert "missing_file" in summary.format()
    # Block b of 2 records -> shard b; blocks 3, 5, 6 hold no valid record (no file), block 4
    # holds the duplicate "cap" (written, excluded from energon's index at merge).
    assert sorted(p.name for p in (out / "train").glob("*.tar")) == [
        f"shard_{b:06d}.tar" for b in (0, 1, 2, 4)]
    assert summary.num_shards == 4 + 1
    assert "train/shard_000004.tar/train_000000009" in (out / ".nv-meta/split.yaml").read_text()
    # modality per sample: cap/conv image, vid video, doc mixed, txt + 2 val text
    assert dict(summary.sample_modalities) == {"text": 3, "image": 2, "video": 1, "mixed": 1}
    assert summary.modality == "image"  # most samples with media are image-only
    samples = [m for shard in sorted((out / "train").glob("*.tar")) for _, m in iter_shard(shard)]
    recs = [json.loads(m["json"]) for m in samples]
    assert [r["id"] for r in recs] == ["cap", "vid", "conv", "doc", "txt", "cap"]
    assert [r["kind"] for r in recs] == ["caption", "caption", "conversation", "interleaved",
                                         "text", "text"]
    assert samples[0]["m0.jpg"] == (raw / "media/a.jpg").read_bytes()
    assert set(samples[2]) == {"json", "m0.jpg", "m1.png"}
    conv = recs[2]["segments"]
    # Turns are role-tagged (the family's chat template writes them at encode time); media sit
    # where the tags were; prompts carry no loss, answers do.
    assert conv[:2] == [{"turn": "user"}, {"media": 0}]
    trained = [s["text"] for s in conv if s.get("loss")]
    assert trained == ["a circle.", "the same."]
    assert [s["turn"] for s in conv if "turn" in s] == ["user", "assistant"] * 2
    assert {"media": 1} in conv
    assert [s.get("media") for s in recs[3]["segments"]] == [None, 0, None, 1]
    # energon's index agrees with what we wrote, per split.
    info = json.loads((out / ".nv-meta/.info.json").read_text())["shard_counts"]
    assert sum(v for k, v in info.items() if k.startswith("train/")) == 5 + 1  # + excluded
    assert sum(v for k, v in info.items() if k.startswith("val/")) == 2
    assert "CrudeWebdataset" in (out / ".nv-meta/dataset.yaml").read_text()


def test_shard_cut_short_while_writing_is_caught(raw, tmp_path):
    def truncate_second(path: Path) -> None:
        if path.name == "shard_000001.tar":
            data = path.read_bytes()
            path.write_bytes(data[: len(data) // 2])

    with pytest.raises(ShardVerificationError, match="shard_000001.tar"):
        prepare_dataset({"train": [raw / "train.jsonl"]}, tmp_path / "ds", name="x",
                        samples_per_shard=2, progress=False, verbose=False,
                        after_write=truncate_second)


def test_verify_catches_truncation_and_alteration_after_prepare(raw, tmp_path):
    out = tmp_path / "ds"
    prepare_dataset({"train": [raw / "train.jsonl"]}, out, name="x", samples_per_shard=2,
                    progress=False, verbose=False, check_media=False)
    assert verify_shards(out)["splits"]["train"]["samples"] == 7  # undecoded: 2 bad ones pass
    shard = out / "train/shard_000000.tar"
    data = bytearray(shard.read_bytes())
    data[700] ^= 0xFF  # same size, one byte altered: only the deep check sees it
    shard.write_bytes(bytes(data))
    verify_shards(out, deep=False)
    with pytest.raises(ShardVerificationError, match="SHA-256"):
        verify_shards(out, deep=True)
    shard.write_bytes(bytes(data[:-1024]))  # what energon would hit as a fatal error mid-run
    with pytest.raises(ShardVerificationError, match="truncated"):
        verify_shards(out, deep=False)
    tool = _tool()
    assert tool.main(["--verify", str(out)]) == 2


def test_cli_prepares_text_and_refuses_existing_output(tmp_path, capsys):
    tool = _tool()
    (tmp_path / "t.txt").write_text("one doc.\ntwo doc.\n")
    out = tmp_path / "web"
    assert tool.main(["--name", "web", "--train", str(tmp_path / "t.txt"), "--out", str(out),
                      "--no-progress"]) == 0
    assert "web (text): wrote 2 train, 0 val" in capsys.readouterr().out
    assert tool.main(["--verify", str(out), "--deep"]) == 0
    assert tool.main(["--name", "web", "--train", str(tmp_path / "t.txt"), "--out", str(out),
                      "--no-progress"]) == 1
    assert "--overwrite" in capsys.readouterr().err
