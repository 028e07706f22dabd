"""Pre-packed micro-batches (``data.prepacked``, ``megatron_vlm/data/prepacked.py``): the file
round-trips every field through ``torch.load(weights_only=True)``, the replay is the documented
cycle sharded over DP ranks, a state resumes it (also under another DP size), and wrong files,
states and tokenizers are refused naming the config key."""

from __future__ import annotations

import dataclasses
import json
from types import SimpleNamespace

import pytest
import torch

from megatron_vlm.config import DataConfig
from megatron_vlm.data.contract import PackedBatch, VisionInputs
from megatron_vlm.data.image import normalize
from megatron_vlm.data.packing import pack_documents
from megatron_vlm.data.prepacked import (
    PrepackedData,
    PrepackedLoader,
    load_prepacked,
    save_prepacked,
)

S = 32


def text_batch(marker: int) -> PackedBatch:
    """A packed text sequence whose first token is ``marker`` (to tell batches apart)."""
    docs = [[marker, 5, 6, 7, 8], [9, 10, 11], list(range(20, 30))]
    return pack_documents(docs, S, 0, 4)


def vision_batch(marker: int, exact_pixels: bool) -> PackedBatch:
    batch = text_batch(marker)
    gen = torch.Generator().manual_seed(marker)
    raw = torch.randint(0, 256, (12, 3, 14, 14), dtype=torch.uint8, generator=gen)
    pixels = normalize(raw) if exact_pixels else torch.rand(12, 3, 14, 14, generator=gen)
    batch.vision = VisionInputs(
        pixel_values=pixels, grid_thw=torch.tensor([[1, 2, 2], [2, 2, 2]]),
        placeholder_starts=torch.tensor([1, 3]), is_video=torch.tensor([False, True]),
        media_index=torch.tensor([0, 1]))
    return batch


def assert_same(a: PackedBatch, b: PackedBatch) -> None:
    def fields(x) -> dict:
        out = {f.name: getattr(x, f.name) for f in dataclasses.fields(x) if f.name != "vision"}
        if x.vision is not None:
            out |= {f"vision.{f.name}": getattr(x.vision, f.name)
                    for f in dataclasses.fields(x.vision)}
        return out

    fa, fb = fields(a), fields(b)
    assert fa.keys() == fb.keys()
    for k, va in fa.items():
        vb = fb[k]
        if torch.is_tensor(va):
            assert va.dtype == vb.dtype and torch.equal(va, vb), k
        else:
            assert va == vb, k


def write(tmp_path, train, valid=None, **meta):
    return save_prepacked(tmp_path / "packs.pt",
                          PrepackedData(train=train, valid=valid or {}, meta=meta))


def test_round_trip_keeps_every_field_and_stores_exact_pixels_as_uint8(tmp_path):
    train = [vision_batch(1, exact_pixels=True), text_batch(2), vision_batch(3, False)]
    path = write(tmp_path, train, {"image": [vision_batch(4, True)]})
    raw = torch.load(path, weights_only=True)  # plain containers and tensors only
    assert raw["train"][0]["vision"]["pixel_values"].dtype == torch.uint8
    assert raw["train"][2]["vision"]["pixel_values"].dtype == torch.float32  # not exact: kept
    assert raw["meta"]["seq_length"] == S and raw["meta"]["num_train"] == 3
    back = load_prepacked(path)
    for a, b in zip(train, back.train, strict=True):
        assert_same(a, b)
    assert_same(back.valid["image"][0], vision_batch(4, True))


def test_replay_is_the_documented_cycle_sharded_over_dp(tmp_path):
    n, g = 5, 4
    path = write(tmp_path, [text_batch(100 + i) for i in range(n)])
    seen = {}
    for rank in range(2):
        loader = PrepackedLoader(path, seq_length=S, global_batch_size=g, dp_rank=rank, dp_size=2)
        seen[rank] = [[int(b.tokens[0, 0]) - 100 for b in loader.next_global_batch()]
                      for _ in range(3)]
    for step in range(3):
        stream = [(step * g + i) % n for i in range(g)]  # step k: [kG, (k+1)G) mod N
        assert seen[0][step] + seen[1][step] == stream


def test_state_resumes_the_stream_under_another_dp_size(tmp_path):
    path = write(tmp_path, [text_batch(100 + i) for i in range(5)])
    first = PrepackedLoader(path, seq_length=S, global_batch_size=4, dp_rank=1, dp_size=2)
    for _ in range(2):
        first.next_global_batch()
    state = json.loads(json.dumps(first.state_dict()))  # plain JSON, as checkpoints keep it
    again = PrepackedLoader(path, seq_length=S, global_batch_size=4, dp_rank=0, dp_size=1)
    again.load_state_dict(state)
    assert [int(b.tokens[0, 0]) - 100 for b in again.next_global_batch()] == [3, 4, 0, 1]
    other = write(tmp_path / "other", [text_batch(200 + i) for i in range(5)])
    with pytest.raises(ValueError, match="checkpoint.load_data_state=false"):
        PrepackedLoader(other, seq_length=S, global_batch_size=4, dp_rank=0,
                        dp_size=1).load_state_dict(state)


def test_validation_share_per_rank(tmp_path):
    valid = {"text": [text_batch(i) for i in range(6)], "empty": []}
    path = write(tmp_path, [text_batch(0)], valid)
    shares = [PrepackedLoader(path, seq_length=S, global_batch_size=2, dp_rank=r,
                              dp_size=2).validation_batches(3) for r in range(2)]
    assert [[int(b.tokens[0, 0]) for b in s["text"]] for s in shares] == [[0, 2], [1]]
    assert all("empty" not in s for s in shares)


def test_refusals_name_the_config_key(tmp_path):
    path = write(tmp_path, [text_batch(1)], tokenizer_vocab_size=1031,
                 token_ids={"eos": 2, "image": 1025})
    with pytest.raises(ValueError, match=r"data.seq_length=64; set data.seq_length=32"):
        PrepackedLoader(path, seq_length=64, global_batch_size=1, dp_rank=0, dp_size=1)
    with pytest.raises(ValueError, match="data.prepacked='/nonexistent.pt' does not exist"):
        PrepackedLoader("/nonexistent.pt", seq_length=S, global_batch_size=1, dp_rank=0,
                        dp_size=1)
    (tmp_path / "junk.pt").write_bytes(b"not a torch file")
    with pytest.raises(ValueError, match="not a readable pre-packed file"):
        load_prepacked(tmp_path / "junk.pt")
    loader = PrepackedLoader(path, seq_length=S, global_batch_size=1, dp_rank=0, dp_size=1)
    loader.check_tokenizer(1031, {"eos": 2, "image": 1025, "pad": 0})  # the same: passes
    with pytest.raises(ValueError, match=r"1031 ids in the file, 1024 now.*set data.tokenizer"):
        loader.check_tokenizer(1024, {"eos": 2, "image": 1025})
    with pytest.raises(ValueError, match="image id 1025 in the file, 7 now"):
        loader.check_tokenizer(1031, {"eos": 2, "image": 7})


def test_config_field_and_loader_wiring(tmp_path):
    from megatron_vlm.config import apply_overrides
    from megatron_vlm.recipes import get_recipe
    from megatron_vlm.training.data_setup import _build_loaders

    cfg = DataConfig(require_inputs=True, prepacked="/x.pt")
    assert cfg.missing_inputs() == ["data.tokenizer"]  # no data root: the batches are in the file
    path = write(tmp_path, [text_batch(i) for i in range(3)], {"text": [text_batch(9)]},
                 tokenizer_vocab_size=40, token_ids={"eos": 2, "pad": 0, "bos": None})
    job = apply_overrides(get_recipe("tiny_text_cpu"), [
        f"data.prepacked={path}", f"data.seq_length={S}", "data.global_batch_size=2",
        "train.eval_batches=1"])
    tok = SimpleNamespace(vocab_size=40, bos_id=None, eos_id=2, pad_id=0)  # the ids it reads
    setup = _build_loaders(job, tok, tmp_path, dp_rank=0, dp_size=1)
    assert isinstance(setup.loader, PrepackedLoader)
    assert [int(b.tokens[0, 0]) for b in setup.loader.next_global_batch()] == [0, 1]
    assert [int(b.tokens[0, 0]) for b in setup.valid["text"]] == [9]
    assert setup.metrics() == {"data/prepacked_epochs": 2 / 3}
    with pytest.raises(ValueError, match="packed with another tokenizer"):
        _build_loaders(job, SimpleNamespace(vocab_size=41, bos_id=None, eos_id=2, pad_id=0),
                       tmp_path, dp_rank=0, dp_size=1)
