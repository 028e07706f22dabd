"""Issue 17's end-to-end check: every format teams hold, prepared or read in place, in one blend.

The six ecosystem formats of ``fixtures/formats.py`` (img2dataset tars, LLaVA JSON, WebVid and
Panda-70M CSVs, HF parquet captioning and interleaved) go through ``prepare_dataset``; a dataset
made by the real ``energon prepare`` as ``CaptioningSample`` and an img2dataset folder indexed in
place (``foreign.index_in_place``) are trained on without preparation. At the loader, every
dataset's documents carry exactly the fixture's captions (decoded back from the packed tokens);
then the tiny VLM trains 5 steps on the blend of all eight, and the trainer's samples/s agrees with
the loader's per-sample counts.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from fixtures.formats import image_bytes, write_all, write_llava_json
from fixtures.loader_checks import decode_documents, energon_prepare, write_tar

from megatron_vlm.config.data_mm import MultimodalDataConfig, StageMix
from megatron_vlm.config.job import apply_overrides
from megatron_vlm.data.corpus import bundled_corpus_dir
from megatron_vlm.data.foreign import index_in_place
from megatron_vlm.data.kimi_tokenizer import SpecialTokensTokenizer
from megatron_vlm.data.mm_loader import MultimodalLoader
from megatron_vlm.data.shards import prepare_dataset
from megatron_vlm.data.tokenizer import get_or_train_tokenizer
from megatron_vlm.recipes import get_recipe
from megatron_vlm.training.trainer import train

ENERGON_CAPTIONS = {f"cap{i:03d}": f"an energon caption number {i}" for i in range(4)}


def _squash(text: str) -> str:
    return "".join(text.split())


@pytest.fixture(scope="module")
def blend(tmp_path_factory) -> tuple[Path, dict[str, dict[str, str]], dict[str, str]]:
    """(root, dataset -> {sample id -> trained caption}, dataset -> directory)."""
    tmp = tmp_path_factory.mktemp("blend")
    root = tmp / "prepared"
    expected: dict[str, dict[str, str]] = {}
    dirs: dict[str, str] = {}
    fixtures = write_all(tmp / "raw")
    for name, fx in fixtures.items():
        prepare_dataset({"train": [fx.path]}, root / name, name=name, media_root=fx.media_root,
                        progress=False, verbose=False)
        expected[name] = {s.id: s.caption for s in fx.samples}
        dirs[name] = name
    # energon's own CaptioningSample dataset, trained on in place.
    cap = tmp / "energon_caption"
    write_tar(cap / "train" / "shard_000.tar", [
        {"__key__": key, "jpg": image_bytes(i, "jpg"), "txt": text.encode()}
        for i, (key, text) in enumerate(ENERGON_CAPTIONS.items())])
    energon_prepare(cap, "CaptioningSample", {"image": "jpg", "caption": "txt"})
    expected["energon_caption"], dirs["energon_caption"] = dict(ENERGON_CAPTIONS), str(cap)
    # img2dataset tars indexed in place (only energon's index files are added).
    in_place = tmp / "img2dataset_in_place"
    shutil.copytree(fixtures["img2dataset"].path, in_place)
    index_in_place(in_place, fmt="img2dataset")
    expected["img2dataset_in_place"] = dict(expected["img2dataset"])
    dirs["img2dataset_in_place"] = str(in_place)
    return root, expected, dirs


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> SpecialTokensTokenizer:
    spm = get_or_train_tokenizer(bundled_corpus_dir(), tmp_path_factory.mktemp("spm"), 1024, 0)
    return SpecialTokensTokenizer(spm)


def test_every_format_reaches_the_batch_with_its_captions(blend, tok, tmp_path):
    root, expected, dirs = blend
    assert len(expected) == 8
    turns_of = {e.id: e.segments for e in write_llava_json(tmp_path).samples}
    for name, captions in expected.items():
        cfg = MultimodalDataConfig(
            root=str(root), datasets={name: dirs[name]}, num_workers=0, shuffle_buffer_size=1,
            packing_buffer_size=16, max_patches_per_micro_batch=4096, markers_loss=False,
            mixes={"s": StageMix(weights={name: 1})}, stage="s")
        with MultimodalLoader(cfg, tok, seq_length=1024, global_batch_size=1, dp_rank=0,
                              dp_size=1, seed=0, one_pass=True) as loader:
            docs = decode_documents(loader, tok)
        assert set(docs) == set(captions), name
        for sid, (_prompt, trained) in docs.items():
            # through the tiny tokenizer (it maps characters it lacks, e.g. "ü", to unk)
            want = tok.decode(tok.encode(captions[sid]))
            if name == "llava":  # conversations: each answer's turn ends with Kimi's <|im_end|>
                end = _squash(tok.decode(tok.encode_with_special("<|im_end|>")))
                assert _squash(trained).count(end) == sum(  # one per assistant turn
                    "turn" in s and s["turn"] == "assistant" for s in turns_of[sid]), sid
                trained = _squash(trained).replace(end, "")
            assert _squash(trained) == _squash(want), (name, sid)


def test_five_steps_on_the_blend_of_all_formats(blend, tmp_path):
    root, expected, dirs = blend
    weights = ", ".join(f"{n}: 1" for n in expected)
    datasets = ", ".join(f"{n}: {d}" for n, d in dirs.items())
    run = tmp_path / "run"
    job = apply_overrides(get_recipe("tiny_vlm_cpu"), [
        f"train.output_dir={run}", "train.steps=5", "optim.warmup_steps=1",
        "train.eval_interval=0", "train.plot=false", "train.tensorboard=false",
        "data.global_batch_size=2", f"data.multimodal.root={root}",
        f"data.multimodal.datasets={{{datasets}}}", "data.multimodal.stage=all",
        f"data.multimodal.mixes={{all: {{weights: {{{weights}}}, unit: samples}}}}",
        "data.multimodal.num_workers=0", "data.multimodal.shuffle_buffer_size=8"])
    result = train(job)
    assert result.state.step == 5 and result.state.skipped_steps == 0
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    rows = [r for r in rows if r["split"] == "train"]
    assert len(rows) == 5 and all(np.isfinite(r["loss"]) for r in rows)
    # samples/s (trainer: documents of the packed batches) against the loader's own counts.
    counted = [sum(r.get(f"data/samples/{m}", 0.0) for m in ("text", "image", "video", "mixed"))
               for r in rows]
    per_step = np.diff([0.0, *counted])
    assert np.allclose([r["samples_per_s"] * r["step_time_s"] for r in rows], per_step)
    assert sum(r > 0 for r in per_step) == 5
