"""Multimodal energon loader: exact resume across simulated DP ranks (workers, shuffle buffer),
refusals, realised mix ratios, seeded corruption fuzz with exact skip counts, shard checks at
start-up, validation batches, the contract on real packs and a family's M-RoPE rule carried
into them."""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_vlm.config.data_mm import MultimodalDataConfig, StageMix
from megatron_vlm.data.corpus import bundled_corpus_dir
from megatron_vlm.data.energon_state import unpack_energon_state
from megatron_vlm.data.kimi_tokenizer import SpecialTokensTokenizer
from megatron_vlm.data.mm_corpus import bundled_mm_corpus, write_raw_corpus
from megatron_vlm.data.mm_loader import (
    STATE_EVERY_N_PACKS,
    MultimodalLoader,
    decode_state,
    encode_state,
)
from megatron_vlm.data.shards import ShardVerificationError, prepare_dataset
from megatron_vlm.data.tokenizer import get_or_train_tokenizer
from megatron_vlm.families.keye.positions import keye_position_ids

SIZES = {"image_caption": (120, 12), "image_qa": (60, 8), "video": (80, 8),
         "interleaved": (40, 6), "text": (300, 20)}

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> SpecialTokensTokenizer:
    spm = get_or_train_tokenizer(bundled_corpus_dir(), tmp_path_factory.mktemp("spm"), 1024, 0)
    return SpecialTokensTokenizer(spm)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return bundled_mm_corpus(tmp_path_factory.mktemp("cache"), SIZES, seed=5,
                             samples_per_shard=25)


def config(root: Path, **kw) -> MultimodalDataConfig:
    base = dict(root=str(root), num_workers=0, shuffle_buffer_size=16, packing_buffer_size=32,
                max_patches_per_micro_batch=2048, image_max_patches=1024)
    base.update(kw)
    return MultimodalDataConfig(**base)


def loader(cfg, tok, **kw) -> MultimodalLoader:
    args = dict(seq_length=512, global_batch_size=4, dp_rank=0, dp_size=2, seed=11)
    args.update(kw)
    return MultimodalLoader(cfg, tok, **args)


RESUME_MIX = {"resume": StageMix(weights={"image_caption": 1, "video": 1, "text": 1},
                                 unit="samples")}


def test_resume_two_dp_ranks_with_workers_and_shuffle(corpus, tok):
    cfg = config(corpus, num_workers=1, mixes=RESUME_MIX, stage="resume")
    steps, cut = 6, 3
    full, resumed = {}, {}
    for rank in range(2):
        with loader(cfg, tok, dp_rank=rank) as a:
            ids = []
            for step in range(steps):
                if step == cut:
                    state = json.loads(json.dumps(a.state_dict()))  # through JSON, as saved
                a.next_global_batch()
                ids.append(a.last_step_sample_ids)
        with loader(cfg, tok, dp_rank=rank) as b:
            b.load_state_dict(state)
            after = []
            for _ in range(steps - cut):
                b.next_global_batch()
                after.append(b.last_step_sample_ids)
            metrics = b.metrics()
        assert after == ids[cut:], f"rank {rank}: resumed stream differs"
        assert metrics["data/packs"] == steps * 2
        full[rank] = [i for step in ids for pack in step for i in pack]
        resumed[rank] = [i for step in ids[:cut] + after for pack in step for i in pack]
    union_full = full[0] + full[1]
    union_resumed = resumed[0] + resumed[1]
    assert sorted(union_resumed) == sorted(union_full)
    assert len(set(union_resumed)) == len(union_resumed), "a sample repeated"
    assert not set(full[0]) & set(full[1]), "DP ranks overlap"
    assert {i.split("_")[0] for i in union_full} == {"image", "video", "text"}


def test_saved_state_depends_only_on_the_data_consumed(corpus, tok):
    # An uninterrupted stream and one interrupted at step 5 and resumed save the same state at
    # step 12 (energon's default snapshots every 60 s of wall time would make it depend on
    # timing), and a resume replays fewer than STATE_EVERY_N_PACKS packs after the snapshot.
    cfg = config(corpus, num_workers=1, mixes=RESUME_MIX, stage="resume")
    steps, cut = 12, 5  # x 4 packs per step: 48 packs, past two snapshots
    with loader(cfg, tok, dp_size=1) as a:
        for _ in range(steps):
            a.next_global_batch()
        full = json.loads(json.dumps(a.state_dict()))
    with loader(cfg, tok, dp_size=1) as b:
        for _ in range(cut):
            b.next_global_batch()
        state = json.loads(json.dumps(b.state_dict()))
    with loader(cfg, tok, dp_size=1) as c:
        c.load_state_dict(state)
        for _ in range(steps - cut):
            c.next_global_batch()
        resumed = json.loads(json.dumps(c.state_dict()))
    assert resumed == full
    (worker,) = unpack_energon_state(full["energon"]).worker_states
    assert worker.state.sample_index + worker.offset == steps * 4
    assert 0 <= worker.offset < STATE_EVERY_N_PACKS


def test_resume_with_other_dp_size_or_mix_is_refused(corpus, tok):
    cfg = config(corpus, mixes=RESUME_MIX, stage="resume")
    with loader(cfg, tok) as a:
        a.next_global_batch()
        state = a.state_dict()
    with loader(cfg, tok, dp_size=4) as b, pytest.raises(ValueError, match="data-parallel size 2"):
        b.load_state_dict(state)
    other = config(corpus, mixes={"resume": StageMix(weights={"text": 1}, unit="samples")},
                   stage="resume")
    with loader(other, tok) as c, pytest.raises(ValueError, match="different datasets"):
        c.load_state_dict(state)
    # close() mid-stream stops the workers; used again, the loader continues where it was.
    with loader(cfg, tok) as d, loader(cfg, tok) as e:
        d.next_global_batch()
        d.close()
        d.next_global_batch()
        e.next_global_batch()
        e.next_global_batch()
        assert d.last_step_sample_ids == e.last_step_sample_ids
    # The codec round-trips energon's state objects exactly (tuples, bytes, arrays, tensors).
    sample = {"a": (1, b"\x00\xff", np.arange(3, dtype=np.uint32)), 2: [None, 1.5]}
    back = decode_state(json.loads(json.dumps(encode_state(sample))))
    assert back[2] == [None, 1.5] and back["a"][:2] == (1, b"\x00\xff")
    assert back["a"][2].dtype == np.uint32 and back["a"][2].tolist() == [0, 1, 2]
    with pytest.raises(ValueError, match="only energon classes"):
        decode_state({"__dataclass__": "os:PathLike", "fields": {}})


def test_realised_mix_ratios_in_tokens(corpus, tok):
    # Token shares of the annealing mix (24% video / 50% image / 26% text), measured over ~400
    # samples: each dataset within 0.06 of its target share of LLM tokens.
    cfg = config(corpus, stage="joint", shuffle_buffer_size=64, packing_buffer_size=None)
    with loader(cfg, tok, seq_length=1024, dp_size=1, global_batch_size=8) as mm:
        num = 0
        while num < 400:
            mm.next_global_batch()
            num += sum(len(p) for p in mm.last_step_sample_ids)
        m = mm.metrics()
    for name, target in cfg.mixes["joint"].weights.items():
        assert abs(m[f"data/mix/{name}"] - target) <= 0.06, (name, m)
    image = m["data/modality/image"] + m["data/modality/interleaved"]
    assert abs(image - 0.50) <= 0.06 and abs(m["data/modality/video"] - 0.24) <= 0.06
    assert m["data/padding_fraction"] <= 0.05  # auto packing buffer (~32 packs of documents)
    cfg = config(corpus, stage="early_fusion", shuffle_buffer_size=64, packing_buffer_size=64)
    with loader(cfg, tok, seq_length=1024, dp_size=1, global_batch_size=8) as mm:
        for _ in range(6):
            mm.next_global_batch()
        m = mm.metrics()
    assert abs(m["data/vision_token_fraction"] - 0.10) <= 0.03, m
    assert m["data/mix/text"] > 0.5


def _corrupt_raw(raw: Path, rng: np.random.Generator) -> tuple[Counter, set[str]]:
    """Corrupt a seeded choice of media files in place: expected skips per reason, bad ids."""
    expected: Counter = Counter()
    bad: set[str] = set()
    for name in ("image_caption", "video"):
        records = [json.loads(x) for x in (raw / f"{name}.train.jsonl").read_text().splitlines()]
        for rec in records:
            if rng.random() >= 0.3:
                continue
            path = raw / (rec.get("image") or rec["video"])
            data = path.read_bytes()
            how = int(rng.integers(3))
            if how == 0:  # cut short: header intact for images, moov atom gone for videos
                path.write_bytes(data[: int(len(data) * rng.uniform(0.2, 0.6))])
            elif how == 1:  # garbage
                path.write_bytes(rng.integers(0, 256, size=len(data), dtype=np.uint8).tobytes())
            else:  # empty member
                path.write_bytes(b"")
            reason = "missing_file" if how == 2 else (
                "image_decode" if name == "image_caption" else "video_decode")
            expected[reason] += 1
            bad.add(rec["id"])
    return expected, bad


def _skips(metrics: dict[str, float]) -> dict[str, float]:
    return {k.split("/")[-1]: v for k, v in metrics.items() if k.startswith("data/skipped/")}


def test_fuzz_corruption_inside_members_gives_exact_skip_counts(tmp_path, tok):
    raw = tmp_path / "raw"
    write_raw_corpus(raw, {"image_caption": (60, 0), "video": (40, 0)}, seed=9)
    expected, bad = _corrupt_raw(raw, np.random.default_rng(123))
    lines = [json.loads(x) for n in ("image_caption", "video")
             for x in (raw / f"{n}.train.jsonl").read_text().splitlines()]
    long_text = {"id": "too_long", "text": " ".join(["the red circle"] * 400)}
    (raw / "mixed.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines + [long_text]))
    expected["too_long"] += 1
    expected["total"] = sum(expected.values())
    good = {r["id"] for r in lines} - bad
    assert len(bad) > 20 and {"image_decode", "video_decode", "missing_file"} <= set(expected)
    prepare_dataset({"train": [raw / "mixed.jsonl"]}, tmp_path / "fuzz" / "mixed", name="mixed",
                    check_media=False, samples_per_shard=20, progress=False, verbose=False)
    cfg = config(tmp_path / "fuzz", num_workers=1, stage="all", shuffle_buffer_size=8,
                 mixes={"all": StageMix(weights={"mixed": 1})})
    with loader(cfg, tok, dp_size=1, one_pass=True) as mm:
        seen = [i for pack in mm.packs() for i in pack.sample_ids]
        assert _skips(mm.metrics()) == dict(expected)
    assert sorted(seen) == sorted(good), "a good sample was lost or repeated"
    # The SlowFast sampler decodes videos while planning (not after the packing choice): the
    # same samples survive and the counts stay exact.
    slowfast = dataclasses.replace(cfg, num_workers=0, video_sampler="slowfast")
    with loader(slowfast, tok, dp_size=1, one_pass=True) as mm:
        seen_sf = [i for pack in mm.packs() for i in pack.sample_ids]
        assert _skips(mm.metrics()) == dict(expected)
    assert sorted(seen_sf) == sorted(good)
    # Interrupted half way and resumed: the same samples and exactly the same skip counts
    # (energon replays the worker from its checkpoint; replayed packs carry their own skips).
    with loader(cfg, tok, dp_size=1, one_pass=True) as a:
        packs = a.packs()
        first = [i for _, pack in zip(range(4), packs) for i in pack.sample_ids]
        state = json.loads(json.dumps(a.state_dict()))
    with loader(cfg, tok, dp_size=1, one_pass=True) as b:
        b.load_state_dict(state)
        rest = [i for pack in b.packs() for i in pack.sample_ids]
        assert _skips(b.metrics()) == dict(expected)
    assert first + rest == seen


def test_training_completes_on_corrupted_data(tmp_path, tok):
    """The tiny VLM trains through a seeded-corrupt dataset (SlowFast videos): every step runs
    with a finite loss and the skips reach the training metrics by reason."""
    from megatron_vlm.config import apply_overrides
    from megatron_vlm.recipes import get_recipe
    from megatron_vlm.training.trainer import train

    raw = tmp_path / "raw"
    write_raw_corpus(raw, {"image_caption": (30, 0), "video": (30, 0)}, seed=4)
    expected, bad = _corrupt_raw(raw, np.random.default_rng(5))
    lines = [x for n in ("image_caption", "video")
             for x in (raw / f"{n}.train.jsonl").read_text().splitlines()]
    (raw / "mixed.jsonl").write_text("".join(x + "\n" for x in lines))
    assert len(bad) >= 10
    prepare_dataset({"train": [raw / "mixed.jsonl"]}, tmp_path / "fuzz" / "mixed", name="mixed",
                    check_media=False, samples_per_shard=20, progress=False, verbose=False)
    run = tmp_path / "run"
    job = apply_overrides(get_recipe("tiny_vlm_cpu"), [
        f"train.output_dir={run}", "train.steps=4", "optim.warmup_steps=1", "train.eval_interval=0",
        "train.tensorboard=false", "train.plot=false", "checkpoint.save_on_exit=false",
        f"data.tokenizer_model={tok.base.model_path}", "data.global_batch_size=2",
        f"data.multimodal.root={tmp_path / 'fuzz'}", "data.multimodal.stage=all",
        "data.multimodal.mixes={all: {weights: {mixed: 1}}}", "data.multimodal.num_workers=0",
        "data.multimodal.shuffle_buffer_size=8", "data.multimodal.video_sampler=slowfast"])
    result = train(job)
    assert result.state.step == 4 and result.state.skipped_steps == 0
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["split"] == "train"]
    assert len(train_rows) == 4 and all(np.isfinite(r["loss"]) for r in train_rows)
    skips = _skips(train_rows[-1])
    assert skips["total"] > 0 and set(skips) <= set(expected) | {"total"}
    assert skips["total"] == sum(v for k, v in skips.items() if k != "total")


def test_a_dataset_of_garbage_stops_the_run(tmp_path, tok):
    raw = tmp_path / "raw"
    write_raw_corpus(raw, {"image_caption": (12, 0)}, seed=1)
    for path in (raw / "media").iterdir():  # headers survive, pixels do not
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    prepare_dataset({"train": [raw / "image_caption.train.jsonl"]}, tmp_path / "g" / "junk",
                    name="junk", check_media=False, progress=False, verbose=False)
    cfg = config(tmp_path / "g", mixes={"j": StageMix(weights={"junk": 1})}, stage="j",
                 max_consecutive_skips=5)
    with loader(cfg, tok, dp_size=1) as mm, pytest.raises(Exception, match="5 bad samples in a"):
        mm.next_global_batch()


def test_truncated_shard_is_refused_at_start_up(corpus, tok, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(corpus / "text", copy / "text")
    shard = copy / "text" / "train" / "shard_000001.tar"
    shard.write_bytes(shard.read_bytes()[:-3000])
    cfg = config(copy, mixes={"t": StageMix(weights={"text": 1})}, stage="t")
    with pytest.raises(ShardVerificationError, match="shard_000001.tar.*truncated"):
        loader(cfg, tok)


def test_real_packs_honour_the_contract_and_validation_is_deterministic(corpus, tok):
    cfg = config(corpus, stage="joint")
    with loader(cfg, tok, pad_to_multiple=4, dp_size=1) as mm:
        placeholder_ids = set(tok.media_token_ids().placeholder_ids)
        for batch in mm.next_global_batch() + mm.next_global_batch():
            spans = np.diff(batch.cu_seqlens_padded.numpy())
            assert batch.seq_length == 512 and (spans % 4 == 0).all()
            tokens = batch.tokens[0].numpy()
            assert not (batch.loss_mask[0].numpy()[np.isin(tokens, list(placeholder_ids))]).any()
            v = batch.vision
            if v is not None:
                assert int(v.cu_seqlens[-1]) == v.pixel_values.shape[0] <= 2048
                assert int(np.isin(tokens, list(placeholder_ids)).sum()) == int(
                    v.num_llm_tokens.sum())
        val = mm.validation_batches(2)
        again = mm.validation_batches(2)
    assert set(val) == set(SIZES) and all(1 <= len(b) <= 2 for b in val.values())
    for name in val:
        for x, y in zip(val[name], again[name]):
            assert np.array_equal(x.tokens, y.tokens)
    with loader(cfg, tok, dp_rank=1) as other:
        val1 = other.validation_batches(1)
    assert not np.array_equal(val1["text"][0].tokens, val["text"][0].tokens)


def test_a_family_position_rule_reaches_every_pack(corpus, tok):
    # The loader takes an M-RoPE rule as a callable (here Keye's) and every pack carries its ids:
    # equal axes on text, each media item (one pooled block per item with this tokenizer) at
    # t = s, h = s + row, w = s + col over its h/2 x w/2 grid, ids never past a token's index.
    cfg = config(corpus, stage="joint")
    with loader(cfg, tok, pad_to_multiple=4, dp_size=1, position_rule=keye_position_ids) as mm:
        batches = mm.next_global_batch()
    seen_media = 0
    for batch in batches:
        ids = batch.mrope_position_ids
        assert ids.dtype == torch.int64 and ids.shape == (3, 512)
        media = torch.zeros(512, dtype=torch.bool)
        v = batch.vision
        for (_, h, w), start in zip(v.grid_thw.tolist() if v else [],
                                    v.placeholder_starts.tolist() if v else []):
            rows, cols = h // 2, w // 2
            block = ids[:, start : start + rows * cols]
            r, c = torch.arange(rows).repeat_interleave(cols), torch.arange(cols).repeat(rows)
            s = int(block[0, 0])
            assert torch.equal(block, torch.stack([torch.full_like(r, s), s + r, s + c]))
            media[start : start + rows * cols] = True
            seen_media += 1
        assert torch.equal(ids[0][~media], ids[1][~media])
        assert torch.equal(ids[0][~media], ids[2][~media])
        assert bool((ids <= batch.position_ids).all())
    assert seen_media > 0
