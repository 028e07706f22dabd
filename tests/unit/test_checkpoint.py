"""Checkpoints: bit-exact resume, refusal of damaged/foreign/mismatched checkpoints, retention.

World size 1 on gloo. The tiny MLA/MoE model trains a few steps on synthetic packed batches;
a fresh model from another seed loads the checkpoint and must match the original bit for bit,
including its next training step.
"""

from __future__ import annotations

import json
import logging
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from megatron_vlm.checkpoint import (
    CheckpointError,
    find_latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
    verify_checkpoint,
    wait_for_pruning,
)
from megatron_vlm.config import ParallelConfig, apply_overrides
from megatron_vlm.data.contract import PackedBatch
from megatron_vlm.parallel.init import init_distributed
from megatron_vlm.recipes import get_recipe

SEQ = 64
VOCAB = 100
NUM_MICROBATCHES = 2


@pytest.fixture(scope="module")
def job():
    import torch.distributed as dist
    from megatron.core import parallel_state

    if not (dist.is_initialized() and parallel_state.model_parallel_is_initialized()):
        init_distributed(ParallelConfig(), seed=1)
    return apply_overrides(get_recipe("tiny_text_cpu"), [f"model.llm.vocab_size={VOCAB}"])


def _micro_batch(gen: torch.Generator) -> PackedBatch:
    """Two documents (40 + 20 real tokens) and 4 tokens of tail padding."""
    tokens = torch.randint(0, VOCAB, (1, SEQ), generator=gen)
    loss_mask = torch.ones(1, SEQ)
    loss_mask[0, 39] = 0
    loss_mask[0, 60:] = 0
    return PackedBatch(
        tokens=tokens,
        labels=torch.roll(tokens, -1, 1),
        loss_mask=loss_mask,
        position_ids=torch.cat([torch.arange(40), torch.arange(24)])[None],
        cu_seqlens=torch.tensor([0, 40, 60], dtype=torch.int32),
        cu_seqlens_padded=torch.tensor([0, 40, 64], dtype=torch.int32),
        max_seqlen=40,
    )


def _batches(step: int) -> list[PackedBatch]:
    gen = torch.Generator().manual_seed(1000 + step)
    return [_micro_batch(gen) for _ in range(NUM_MICROBATCHES)]


def _build(job, seed: int, distributed_optimizer: bool = False):
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from megatron_vlm.optim.builder import build_optimizer
    from megatron_vlm.optim.schedules import build_scheduler
    from megatron_vlm.training.model_setup import build_model_chunks

    torch.manual_seed(seed)
    model_parallel_cuda_manual_seed(seed)
    job.parallel.use_distributed_optimizer = distributed_optimizer
    chunks = build_model_chunks(job)
    optimizer = build_optimizer(job.optim, chunks, "fp32", distributed_optimizer)
    scheduler = build_scheduler(job.optim, optimizer, total_steps=100)
    return chunks, optimizer, scheduler


def _train_step(chunks, optimizer, scheduler, step: int) -> torch.Tensor:
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_vlm.training.step import forward_step

    for c in chunks:
        c.zero_grad_buffer()
    optimizer.zero_grad()
    out = get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter(_batches(step)), model=chunks,
        num_microbatches=NUM_MICROBATCHES, seq_length=SEQ, micro_batch_size=1,
        forward_only=False,
    )
    ok, _, _ = optimizer.step()
    assert ok
    scheduler.step(1)
    total = torch.stack([o["lm loss"] for o in out]).sum(0)
    return total[0] / total[1]


def _params(chunks) -> dict[str, torch.Tensor]:
    return {f"{i}.{n}": p.detach().clone() for i, c in enumerate(chunks)
            for n, p in c.module.named_parameters()}


def _expert_biases(chunks) -> dict[str, torch.Tensor]:
    return {f"{i}.{n}": b.detach().clone() for i, c in enumerate(chunks)
            for n, b in c.module.named_buffers() if n.endswith("expert_bias")}


def _optimizer_states(optimizer) -> list[tuple[str, torch.Tensor]]:
    """Every per-parameter state tensor, in parameter order (independent of object identity)."""
    out = []
    for oi, o in enumerate(getattr(optimizer, "chained_optimizers", [optimizer])):
        torch_opt = o.optimizer
        for gi, group in enumerate(torch_opt.param_groups):
            for pi, p in enumerate(group["params"]):
                for k, v in sorted(torch_opt.state[p].items()):
                    out.append((f"{oi}.{gi}.{pi}.{k}", torch.as_tensor(v).clone()))
    return out


def _rng_draws() -> dict[str, object]:
    """Draws from every RNG the checkpoint restores (consumes them)."""
    from megatron.core.tensor_parallel.random import get_cuda_rng_tracker

    with get_cuda_rng_tracker().fork():
        tracker = torch.rand(4)
    return {
        "python": [random.random() for _ in range(3)],
        "numpy": np.random.rand(3).tolist(),
        "torch": torch.rand(4).tolist(),
        "tracker": tracker.tolist(),
    }


def _assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for k, v in a.items():
        assert torch.equal(v, b[k]), k


@pytest.fixture(scope="module")
def trained(job, tmp_path_factory):
    """Model A after 3 steps, checkpointed at step 3, plus everything captured at save time."""
    chunks, optimizer, scheduler = _build(job, seed=1)
    for step in range(3):
        _train_step(chunks, optimizer, scheduler, step)
    root = tmp_path_factory.mktemp("ckpt")
    extra = {"data": {"epoch": 0, "position": 123}, "skipped": {"too_long": 2}}
    path = save_checkpoint(root, 3, chunks, optimizer, scheduler, extra, job.to_yaml())
    snapshot = {
        "params": _params(chunks),
        "expert_bias": _expert_biases(chunks),
        "optim": _optimizer_states(optimizer),
        "sched": scheduler.state_dict(),
        "rng": _rng_draws(),
        "extra": extra,
    }
    snapshot["next_loss"] = _train_step(chunks, optimizer, scheduler, 3)
    snapshot["next_params"] = _params(chunks)
    return path, snapshot


def _copy(path: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "root" / path.name
    shutil.copytree(path, dst)
    return dst


def test_resume_is_bit_identical(job, trained):
    path, ref = trained
    assert path.name == "step_0000003"
    assert any(b.abs().sum() > 0 for b in ref["expert_bias"].values())  # biases have drifted
    chunks, optimizer, scheduler = _build(job, seed=2)
    fresh = _params(chunks)
    assert not all(torch.equal(fresh[k], ref["params"][k]) for k in fresh)
    random.seed(7)
    np.random.seed(7)
    torch.manual_seed(7)

    extra = load_checkpoint(path, chunks, optimizer, scheduler, config_yaml=job.to_yaml())

    assert extra == ref["extra"]
    _assert_same_tensors(_params(chunks), ref["params"])
    _assert_same_tensors(_expert_biases(chunks), ref["expert_bias"])
    states = _optimizer_states(optimizer)
    assert [k for k, _ in states] == [k for k, _ in ref["optim"]]
    assert {k.rsplit(".", 1)[1] for k, _ in states} == {"exp_avg", "exp_avg_sq", "step"}
    for (k, v), (_, r) in zip(states, ref["optim"]):
        assert torch.equal(v, r), k
    assert scheduler.state_dict() == ref["sched"]
    assert _rng_draws() == ref["rng"]
    loss = _train_step(chunks, optimizer, scheduler, 3)
    assert torch.equal(loss, ref["next_loss"])
    _assert_same_tensors(_params(chunks), ref["next_params"])


def test_resume_distributed_optimizer(job, tmp_path):
    """DistributedOptimizer (dp_reshardable): same round trip, and the next step matches."""
    chunks, optimizer, scheduler = _build(job, seed=1, distributed_optimizer=True)
    for step in range(2):
        _train_step(chunks, optimizer, scheduler, step)
    path = save_checkpoint(tmp_path, 2, chunks, optimizer, scheduler, {}, job.to_yaml())
    assert json.loads((path / "manifest.json").read_text())["distributed_optimizer"]
    saved, saved_states = _params(chunks), _optimizer_states(optimizer)
    next_loss = _train_step(chunks, optimizer, scheduler, 2)
    next_params = _params(chunks)

    chunks2, optimizer2, scheduler2 = _build(job, seed=2, distributed_optimizer=True)
    load_checkpoint(path, chunks2, optimizer2, scheduler2)
    _assert_same_tensors(_params(chunks2), saved)
    states = _optimizer_states(optimizer2)
    assert [k for k, _ in states] == [k for k, _ in saved_states]
    for (k, v), (_, r) in zip(states, saved_states):
        assert torch.equal(v, r), k
    assert torch.equal(_train_step(chunks2, optimizer2, scheduler2, 2), next_loss)
    _assert_same_tensors(_params(chunks2), next_params)


def test_manifest_lists_every_file(trained):
    path, _ = trained
    manifest = verify_checkpoint(path, full=True)
    listed = {e["path"] for e in manifest["files"]}
    on_disk = {p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file()}
    assert listed == on_disk - {"manifest.json"}
    assert {"common.pt", "rank_00000.pt", ".metadata"} <= listed
    assert manifest["step"] == 3 and manifest["world_size"] == 1
    assert manifest["layout"]["tp"] == 1
    assert set(manifest["versions"]) >= {"torch", "megatron_core", "megatron_vlm"}
    assert "hidden_size: 64" in manifest["config_yaml"]


def test_rank_file_loads_weights_only(trained):
    path, _ = trained
    state = torch.load(path / "rank_00000.pt", weights_only=True)
    assert json.loads(state["extra_json"])["data"]["position"] == 123


def test_loading_never_unpickles_unsafely(job, trained, monkeypatch):
    path, _ = trained
    calls = []
    real_load = torch.load

    def recording_load(*args, **kwargs):
        calls.append(kwargs.get("weights_only"))
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", recording_load)
    chunks, optimizer, scheduler = _build(job, seed=2)
    load_checkpoint(path, chunks, optimizer, scheduler)
    assert calls and all(w is True for w in calls), calls


def test_truncated_file_is_refused(job, trained, tmp_path):
    path = _copy(trained[0], tmp_path)
    data_file = next(path.glob("*.distcp"))
    size = data_file.stat().st_size
    with open(data_file, "r+b") as f:
        f.truncate(size - 100)
    with pytest.raises(CheckpointError, match=data_file.name):
        verify_checkpoint(path)
    chunks, optimizer, scheduler = _build(job, seed=2)
    with pytest.raises(CheckpointError, match=rf"wrong size for .*{data_file.name}"):
        load_checkpoint(path, chunks, optimizer, scheduler)
    assert find_latest_checkpoint(path.parent) is None


def test_corrupted_bytes_are_refused_by_hash(trained, tmp_path):
    path = _copy(trained[0], tmp_path)
    target = path / "common.pt"
    raw = bytearray(target.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    target.write_bytes(bytes(raw))
    verify_checkpoint(path)  # same size: the cheap check passes
    with pytest.raises(CheckpointError, match="sha256 mismatch for .*common.pt"):
        verify_checkpoint(path, full=True)


def test_digests_hashed_while_writing_equal_the_files(trained):
    """The data files' sha256 and XXH3-128 are computed as they are written (no re-read); they
    must equal the bytes on disk, and each rank writes WRITE_THREADS data files."""
    import hashlib

    import xxhash

    from megatron_vlm.checkpoint.hashed_io import WRITE_THREADS

    path, _ = trained
    manifest = json.loads((path / "manifest.json").read_text())
    data = [e for e in manifest["files"] if e["path"].endswith(".distcp")]
    assert len(data) == WRITE_THREADS
    for e in manifest["files"]:
        raw = (path / e["path"]).read_bytes()
        assert (e["size"], e["sha256"]) == (len(raw), hashlib.sha256(raw).hexdigest()), e["path"]
        assert e["xxh3_128"] == xxhash.xxh3_128(raw).hexdigest(), e["path"]


@pytest.mark.parametrize("min_cpus", [1, 10**6], ids=["beside_read", "first"])
@pytest.mark.parametrize("digest", ["xxh3_128", "sha256"])
def test_load_refuses_corrupted_data_file_by_hash(job, trained, tmp_path, monkeypatch,
                                                  min_cpus, digest):
    """A flipped byte inside a tensor's storage (same size, DCP reads it without complaint) is
    caught by the digests, checked beside the read or before it, before the state is applied:
    by XXH3-128, or by sha256 in a manifest without XXH3 (checkpoints of older versions)."""
    from megatron_vlm.checkpoint import hashed_io

    monkeypatch.setattr(hashed_io, "OVERLAP_MIN_CPUS", min_cpus)
    path = _copy(trained[0], tmp_path)
    if digest == "sha256":
        manifest = json.loads((path / "manifest.json").read_text())
        for e in manifest["files"]:
            del e["xxh3_128"]
        (path / "manifest.json").write_text(json.dumps(manifest))
    target = max(path.glob("*.distcp"), key=lambda p: p.stat().st_size)
    raw = bytearray(target.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    target.write_bytes(bytes(raw))
    chunks, optimizer, scheduler = _build(job, seed=2)
    with pytest.raises(CheckpointError, match=rf"{digest} mismatch for .*{target.name}"):
        load_checkpoint(path, chunks, optimizer, scheduler)
    chunks, optimizer, scheduler = _build(job, seed=2)
    load_checkpoint(path, chunks, optimizer, scheduler, verify_hashes=False)  # sizes only


def test_foreign_directory_is_refused(job, tmp_path):
    foreign = tmp_path / "step_0000005"
    foreign.mkdir()
    (foreign / "model.safetensors").write_bytes(b"\0" * 16)
    with pytest.raises(CheckpointError, match="not a megatron_vlm checkpoint: no manifest.json"):
        verify_checkpoint(foreign)
    chunks, optimizer, scheduler = _build(job, seed=2)
    with pytest.raises(CheckpointError, match="not a megatron_vlm checkpoint"):
        load_checkpoint(foreign, chunks, optimizer, scheduler)
    (foreign / "manifest.json").write_text('{"format": "someone-else", "files": []}')
    with pytest.raises(CheckpointError, match="not a megatron_vlm checkpoint.*someone-else"):
        verify_checkpoint(foreign)
    (foreign / "manifest.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="corrupt manifest"):
        verify_checkpoint(foreign)


def test_different_model_config_is_refused(job, trained):
    path, _ = trained
    other = apply_overrides(job, ["model.llm.hidden_size=32", "model.llm.num_experts=4"])
    chunks, optimizer, scheduler = _build(job, seed=2)
    with pytest.raises(CheckpointError, match="model.llm.hidden_size: 64 in checkpoint != 32") as e:
        load_checkpoint(path, chunks, optimizer, scheduler, config_yaml=other.to_yaml())
    assert "model.llm.num_experts" in str(e.value)
    # A change outside the model section is not a model mismatch.
    longer = apply_overrides(job, ["train.steps=999"])
    load_checkpoint(path, chunks, optimizer, scheduler, config_yaml=longer.to_yaml())


def test_find_latest_skips_tmp_and_incomplete(trained, tmp_path, caplog):
    path = _copy(trained[0], tmp_path)
    root = path.parent
    leftover = root / ".tmp-step_0000009-deadbeef"
    shutil.copytree(path, leftover)  # complete-looking, but never renamed into place
    (root / "step_0000010").mkdir()  # no manifest
    with caplog.at_level(logging.WARNING, logger="megatron_vlm.checkpoint.dist"):
        assert find_latest_checkpoint(root) == path
    assert ".tmp-step_0000009-deadbeef" in caplog.text
    assert find_latest_checkpoint(tmp_path / "nothing-here") is None


def test_keep_last_and_resave(job, trained, tmp_path):
    path, _ = trained
    chunks, optimizer, scheduler = _build(job, seed=2)
    load_checkpoint(path, chunks, optimizer, scheduler)
    root = tmp_path / "ckpts"
    for step in (4, 5, 6, 7):
        save_checkpoint(root, step, chunks, optimizer, scheduler, {"s": step}, "a: 1\n",
                        keep_last=2)
        # Pruned at once from resume's view (renamed to .tmp-*), deleted in the background.
        assert sorted(p.name for p in root.iterdir() if p.name.startswith("step_")) == sorted(
            f"step_{s:07d}" for s in range(max(4, step - 1), step + 1))
    wait_for_pruning()
    assert sorted(p.name for p in root.iterdir()) == ["step_0000006", "step_0000007"]
    again = save_checkpoint(root, 7, chunks, optimizer, scheduler, {"s": 70}, "a: 1\n",
                            keep_last=2)
    wait_for_pruning()
    assert sorted(p.name for p in root.iterdir()) == ["step_0000006", "step_0000007"]
    assert find_latest_checkpoint(root) == again
    assert json.loads((again / "manifest.json").read_text())["extra_rank0"] == {"s": 70}


def test_extra_must_be_json(job, trained, tmp_path):
    chunks, optimizer, scheduler = _build(job, seed=2)
    with pytest.raises(ValueError, match="JSON-serialisable"):
        save_checkpoint(tmp_path, 1, chunks, optimizer, scheduler, {"t": torch.ones(1)}, "")
    assert not any(tmp_path.iterdir())


def test_model_only_load(job, trained):
    path, ref = trained
    chunks, optimizer, scheduler = _build(job, seed=2)
    extra = load_checkpoint(path, chunks, optimizer, None, strict=False, load_optimizer=False)
    assert extra == ref["extra"]
    _assert_same_tensors(_params(chunks), ref["params"])
    assert _optimizer_states(optimizer) == []
    assert scheduler.num_steps == 0


def test_save_before_first_step(job, tmp_path):
    """An optimizer that never stepped has no state; the checkpoint still round-trips."""
    chunks, optimizer, scheduler = _build(job, seed=2)
    path = save_checkpoint(tmp_path, 0, chunks, optimizer, scheduler, {}, job.to_yaml())
    assert not json.loads((path / "manifest.json").read_text())["optimizer_state"]
    chunks2, optimizer2, scheduler2 = _build(job, seed=3)
    load_checkpoint(path, chunks2, optimizer2, scheduler2)
    _assert_same_tensors(_params(chunks2), _params(chunks))


class _Exploit:
    """Pickles to a call of ``os.system``: what a tampered checkpoint file could hold."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        import os

        return os.system, (f"touch {self.marker}",)


def _replace_listed_file(path: Path, rel: str, data: bytes) -> None:
    """Overwrite a file and update its manifest entry, as a deliberate tamperer would."""
    import hashlib

    import xxhash

    (path / rel).write_bytes(data)
    manifest = json.loads((path / "manifest.json").read_text())
    for e in manifest["files"]:
        if e["path"] == rel:
            e["size"], e["sha256"] = len(data), hashlib.sha256(data).hexdigest()
            e["xxh3_128"] = xxhash.xxh3_128(data).hexdigest()
    (path / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("victim", [".metadata", "common.pt"])
def test_tampered_pickles_are_not_executed(job, trained, tmp_path, victim):
    import io
    import pickle

    path = _copy(trained[0], tmp_path)
    marker = tmp_path / "exploited"
    if victim == ".metadata":
        data = pickle.dumps(_Exploit(marker))
    else:
        buf = io.BytesIO()
        torch.save({"x": _Exploit(marker)}, buf)
        data = buf.getvalue()
    _replace_listed_file(path, victim, data)
    verify_checkpoint(path, full=True)  # consistent with its manifest: only the loader can refuse
    chunks, optimizer, scheduler = _build(job, seed=2)
    expected = {".metadata": "refusing to unpickle posix.system",
                "common.pt": r"refusing to load .*common.pt"}[victim]
    with pytest.raises(CheckpointError, match=expected):
        load_checkpoint(path, chunks, optimizer, scheduler)
    assert not marker.exists()


# --- async save (megatron's AsyncCallsQueue; our persistent writer process) ---------------------


def _dcp_tensors(ckpt: Path, out: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a torch_dist checkpoint, read back by torch's own DCP converter."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(str(ckpt), str(out))
    state = torch.load(out, weights_only=True)
    return {k: v for k, v in state.items() if torch.is_tensor(v)}


def _distopt_real_elements(optimizer) -> torch.Tensor:
    """Mask of a DistributedOptimizer bucket's elements that belong to a parameter (world 1,
    one buffer of one bucket in the tiny model)."""
    (opt,) = optimizer.chained_optimizers
    (buf,) = opt.buffers
    (bucket,) = buf.buckets
    mask = torch.zeros(bucket.grad_data.numel(), dtype=torch.bool)
    for start, end, _ in buf.param_index_map.values():
        mask[start:end] = True
    return mask


@pytest.mark.parametrize("distributed_optimizer", [False, True], ids=["ddp", "distopt"])
def test_async_save_equals_sync_save_while_training_goes_on(job, tmp_path,
                                                            distributed_optimizer):
    """An async save of step 2 is complete only once finished, and then equals a synchronous
    save of step 2 (every tensor, every file but DCP's .metadata, the manifest) although a
    training step changed every weight while the write was in flight."""
    from megatron_vlm.checkpoint import CheckpointSaver

    chunks, optimizer, scheduler = _build(job, seed=1, distributed_optimizer=distributed_optimizer)
    for step in range(2):
        _train_step(chunks, optimizer, scheduler, step)
    extra = {"data": {"position": 16}}
    sync = save_checkpoint(tmp_path / "sync", 2, chunks, optimizer, scheduler, extra,
                           job.to_yaml())
    before = _params(chunks)

    saver = CheckpointSaver(tmp_path / "async", keep_last=3, async_save=True)
    try:
        assert saver.save(2, chunks, optimizer, scheduler, extra, job.to_yaml()) == []
        assert saver.in_flight
        assert find_latest_checkpoint(tmp_path / "async") is None  # not complete yet
        _train_step(chunks, optimizer, scheduler, 2)  # in place, while the writer runs
        after = _params(chunks)
        assert all(not torch.equal(before[k], after[k]) for k in before)
        (report,) = saver.finish()
    finally:
        saver.close()
    assert report.async_save and report.step == 2
    assert report.path == find_latest_checkpoint(tmp_path / "async")
    assert 0 < report.blocked_s and report.write_start_unix <= report.write_end_unix
    assert not [p for p in (tmp_path / "async").iterdir() if p.name.startswith(".tmp-")]

    a = _dcp_tensors(sync, tmp_path / "a.pt")
    b = _dcp_tensors(report.path, tmp_path / "b.pt")
    assert a.keys() == b.keys() and any("exp_avg_sq" in k for k in a)
    real = _distopt_real_elements(optimizer) if distributed_optimizer else None
    for key in a:
        if ".bucket_idx_" in key:  # DistributedOptimizer bucket: padding between params is
            assert real is not None  # uninitialised memory (two sync saves differ there too)
            x, y = a[key][real[: a[key].numel()]], b[key][real[: b[key].numel()]]
            assert x.numel() > 0.9 * a[key].numel() and torch.equal(x, y), key
        else:
            assert torch.equal(a[key], b[key]), key
    ma = verify_checkpoint(sync, full=True)
    mb = verify_checkpoint(report.path, full=True)
    # DCP's .metadata pickles a random save id; every other file is byte-identical (but the
    # data files under the DistributedOptimizer, whose bucket padding is uninitialised).
    files_a = {e["path"]: e for e in ma.pop("files")}
    files_b = {e["path"]: e for e in mb.pop("files")}
    assert files_a.keys() == files_b.keys()
    skip = {".metadata"} | ({k for k in files_a if k.endswith(".distcp")}
                            if distributed_optimizer else set())
    assert len(files_a.keys() - skip) >= 3
    for rel in files_a.keys() - skip:
        assert files_a[rel] == files_b[rel], rel
    for m in (ma, mb):
        del m["time_unix"], m["time_utc"]
    assert ma == mb

    # And it loads: a fresh model gets step 2's weights, not step 3's.
    chunks2, optimizer2, scheduler2 = _build(job, seed=2,
                                             distributed_optimizer=distributed_optimizer)
    assert load_checkpoint(report.path, chunks2, optimizer2, scheduler2) == extra
    _assert_same_tensors(_params(chunks2), before)


def test_async_saves_share_one_writer_process_which_is_replaced_if_it_dies(job, tmp_path):
    """Every async save of a saver goes to one writer process (not the trainer, not a fork per
    save); a writer killed between saves is replaced, and the next save is complete and equals
    the live weights."""
    import os
    import signal

    from megatron_vlm.checkpoint import CheckpointSaver

    chunks, optimizer, scheduler = _build(job, seed=1)
    _train_step(chunks, optimizer, scheduler, 0)
    saver = CheckpointSaver(tmp_path, keep_last=3, async_save=True)
    try:
        writer = saver._writer._proc
        for step in (1, 2):
            saver.save(step, chunks, optimizer, scheduler, {}, job.to_yaml())
            saver.finish()
        assert saver._writer._proc is writer and writer.pid != os.getpid()
        assert writer.poll() is None  # still alive between saves
        os.kill(writer.pid, signal.SIGKILL)
        writer.wait()
        saver.save(3, chunks, optimizer, scheduler, {}, job.to_yaml())
        (report,) = saver.finish()
        assert saver._writer._proc is not writer
    finally:
        saver.close()
    assert report.path == find_latest_checkpoint(tmp_path) == tmp_path / "step_0000003"
    verify_checkpoint(report.path, full=True)
    chunks2, optimizer2, scheduler2 = _build(job, seed=2)
    load_checkpoint(report.path, chunks2, optimizer2, scheduler2)
    _assert_same_tensors(_params(chunks2), _params(chunks))


def test_verify_share_partitions_files_by_writer():
    """Every file is verified by exactly one rank; a data file by the rank that wrote (and, in
    an unchanged layout, reads) it."""
    from megatron_vlm.checkpoint.hashed_io import verify_share

    names = [".metadata", "common.pt", "metadata.json"] + [
        f"__{r}_{i}.distcp" for r in range(4) for i in range(2)] + [
        f"rank_{r:05d}.pt" for r in range(4)]
    entries = [{"path": n} for n in names]
    for world in (1, 2, 4):
        shares = [[e["path"] for e in verify_share(entries, r, world)] for r in range(world)]
        assert sorted(n for share in shares for n in share) == sorted(names)
        for r, share in enumerate(shares):
            assert {n for n in share if n.endswith(".distcp")} == {
                f"__{k}_{i}.distcp" for k in range(4) if k % world == r for i in range(2)}
