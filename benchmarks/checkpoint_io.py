"""Benchmark: our checkpoint save/load against plain torch DCP of the same state, plus async cost.

One process (gloo, world size 1) builds the tiny MLA/MoE LLM widened to a few hundred MB of
state (fp32 weights + Adam moments after one step), then in interleaved pairs (ours, baseline):

1. ``save``: ``checkpoint.save_checkpoint`` (megatron torch_dist, per-rank file, manifest with
   every file's sha256, temp directory + rename) vs ``torch.distributed.checkpoint.save`` of the
   same tensors (``FileSystemWriter`` defaults: fsync on, one thread);
2. ``load``: ``checkpoint.load_checkpoint(verify_hashes=True)`` vs ``dcp.load`` of the same
   tensors into preallocated ones; ``load_sizes_only`` (``verify_hashes=False``) for reference;
3. ``async``: the tiny run (``tiny_text_cpu``'s model) trained in interleaved pairs of blocks
   of steps without saves and with ``CheckpointSaver(async_save=True)`` saving after every
   step: the training part of the steps that ran inside a write (wall and CPU seconds, page
   faults; the background writer's cost) against the block without saves, the time each save
   blocks the loop, and the time an async save blocks before its writer runs (state dict,
   plan, the copy into the writer's staging buffer) for the tiny and the big state,
   extrapolated linearly to 10 GB.

Each figure is the median of >= 5 pairs; ratios are baseline time / our time per pair (so >= 0.8
means "at least 0.8x the baseline's speed"). The load average is recorded before and after.

    python -m benchmarks.checkpoint_io              # writes benchmarks/results/checkpoint_io_*.json
    python -m benchmarks.checkpoint_io --smoke      # a few MB, seconds
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import RESULTS_DIR, write_result

FULL = {"hidden_size": 512, "vocab_size": 32768, "pairs": 7, "async_steps": 10, "snapshots": 3}
SMOKE = {"hidden_size": 64, "vocab_size": 1024, "pairs": 1, "async_steps": 2, "snapshots": 1}
"""``SMOKE``'s model is also the tiny run of the async part."""
SEQ = 64


def _job(cfg: dict[str, Any]):
    from megatron_vlm.config import apply_overrides
    from megatron_vlm.recipes import get_recipe

    return apply_overrides(get_recipe("tiny_text_cpu"), [
        f"model.llm.vocab_size={cfg['vocab_size']}", f"model.llm.hidden_size={cfg['hidden_size']}"])


def _batches(step: int, vocab: int) -> list:
    from megatron_vlm.data.contract import PackedBatch

    gen = torch.Generator().manual_seed(step)
    tokens = torch.randint(0, vocab, (1, SEQ), generator=gen)
    batch = PackedBatch(
        tokens=tokens, labels=torch.roll(tokens, -1, 1), loss_mask=torch.ones(1, SEQ),
        position_ids=torch.arange(SEQ)[None],
        cu_seqlens=torch.tensor([0, SEQ], dtype=torch.int32),
        cu_seqlens_padded=torch.tensor([0, SEQ], dtype=torch.int32), max_seqlen=SEQ)
    return [batch]


def _build(job):
    from megatron.core.tensor_parallel.random import model_parallel_cuda_manual_seed

    from megatron_vlm.optim.builder import build_optimizer
    from megatron_vlm.optim.schedules import build_scheduler
    from megatron_vlm.training.model_setup import build_model_chunks

    torch.manual_seed(1)
    model_parallel_cuda_manual_seed(1)
    chunks = build_model_chunks(job)
    optimizer = build_optimizer(job.optim, chunks, "fp32", False)
    scheduler = build_scheduler(job.optim, optimizer, total_steps=100)
    return chunks, optimizer, scheduler


def _train_step(chunks, optimizer, scheduler, step: int, vocab: int) -> None:
    from megatron.core.pipeline_parallel import get_forward_backward_func

    from megatron_vlm.training.step import forward_step

    for c in chunks:
        c.zero_grad_buffer()
    optimizer.zero_grad()
    get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter(_batches(step, vocab)), model=chunks,
        num_microbatches=1, seq_length=SEQ, micro_batch_size=1, forward_only=False)
    optimizer.step()
    scheduler.step(1)


def plain_state(chunks, optimizer) -> dict[str, torch.Tensor]:
    """The same tensors our checkpoint holds, as a flat dict for torch DCP (model weights and
    every per-parameter optimizer state tensor)."""
    out = {}
    for i, c in enumerate(chunks):
        for k, v in c.module.state_dict().items():
            if isinstance(v, torch.Tensor) and not k.endswith("_extra_state"):
                out[f"model{i}.{k}"] = v
    for oi, o in enumerate(getattr(optimizer, "chained_optimizers", [optimizer])):
        for gi, group in enumerate(o.optimizer.param_groups):
            for pi, p in enumerate(group["params"]):
                for k, v in o.optimizer.state[p].items():
                    if isinstance(v, torch.Tensor) and v.dim() > 0:
                        out[f"optim{oi}.{gi}.{pi}.{k}"] = v
    return out


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def _timed(fn) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process, all threads) of ``fn()``."""
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t0, time.process_time() - c0


def _pairs(n: int, ours, base) -> dict[str, Any]:
    """``n`` interleaved (ours, baseline) pairs, the order alternating; medians and the ratio
    (wall time, and the process's CPU time, which a busy shared machine disturbs less)."""
    t_ours, t_base = [], []
    for i in range(n):
        if i % 2:
            t_base.append(base())
            t_ours.append(ours())
        else:
            t_ours.append(ours())
            t_base.append(base())
    wall_o, cpu_o = zip(*t_ours)
    wall_b, cpu_b = zip(*t_base)
    return {"ours_s": statistics.median(wall_o), "baseline_s": statistics.median(wall_b),
            "baseline_over_ours": statistics.median(b / o for o, b in zip(wall_o, wall_b)),
            "ours_cpu_s": statistics.median(cpu_o), "baseline_cpu_s": statistics.median(cpu_b),
            "cpu_baseline_over_ours": statistics.median(b / o for o, b in zip(cpu_o, cpu_b)),
            "ours_all_s": list(wall_o), "baseline_all_s": list(wall_b)}


def bench_save_load(work: Path, cfg: dict, job, chunks, optimizer, scheduler) -> dict[str, Any]:
    import torch.distributed.checkpoint as dcp

    from megatron_vlm.checkpoint import load_checkpoint, save_checkpoint

    yaml = job.to_yaml()
    state = plain_state(chunks, optimizer)
    counter = iter(range(1, 10**6))

    def ours_save() -> tuple[float, float]:
        root = work / f"ours_{next(counter)}"
        dt = _timed(lambda: save_checkpoint(root, 1, chunks, optimizer, scheduler, {}, yaml,
                                            keep_last=1))
        shutil.rmtree(root)
        return dt

    def dcp_save() -> tuple[float, float]:
        d = work / f"dcp_{next(counter)}"
        dt = _timed(lambda: dcp.save(state, storage_writer=dcp.FileSystemWriter(str(d))))
        shutil.rmtree(d)
        return dt

    save = _pairs(cfg["pairs"], ours_save, dcp_save)
    ckpt = save_checkpoint(work / "ours_load", 1, chunks, optimizer, scheduler, {}, yaml)
    dcp_dir = work / "dcp_load"
    dcp.save(state, storage_writer=dcp.FileSystemWriter(str(dcp_dir)))

    def ours_load(verify: bool = True) -> tuple[float, float]:
        return _timed(lambda: load_checkpoint(ckpt, chunks, optimizer, scheduler,
                                              verify_hashes=verify))

    def dcp_load() -> tuple[float, float]:
        return _timed(lambda: dcp.load(state, storage_reader=dcp.FileSystemReader(str(dcp_dir))))

    load = _pairs(cfg["pairs"], ours_load, dcp_load)
    sizes_only = _pairs(cfg["pairs"], lambda: ours_load(False), dcp_load)
    return {"ours_bytes": _dir_bytes(ckpt), "baseline_bytes": _dir_bytes(dcp_dir),
            "save": save, "load_verified": load, "load_sizes_only": sizes_only}


def _async_block(saver, state: tuple, steps: int, start: int, vocab: int,
                 with_saves: bool) -> dict[str, list]:
    """``steps`` training steps (saving after each if asked). Per step: the seconds of its
    training alone (the background writer's cost shows there), its CPU seconds and minor page
    faults in this process, and its ``[start, end]`` wall-clock window; per finished save, the
    seconds it blocked the loop and the writer's ``[start, end]`` window."""
    chunks, optimizer, scheduler = state
    out: dict[str, list] = {"train_s": [], "cpu_s": [], "faults": [], "window": [],
                            "blocked_s": [], "write_window": []}

    def record(reports, drop_wait: bool = False) -> None:
        for r in reports:
            out["blocked_s"].append(r.blocked_s - (r.wait_s if drop_wait else 0.0))
            out["write_window"].append((r.write_start_unix, r.write_end_unix))

    for step in range(start, start + steps):
        f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        w0, t0, c0 = time.time(), time.perf_counter(), time.process_time()
        _train_step(chunks, optimizer, scheduler, step, vocab)
        out["train_s"].append(time.perf_counter() - t0)
        out["cpu_s"].append(time.process_time() - c0)
        out["faults"].append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
        out["window"].append((w0, time.time()))
        if with_saves:
            record(saver.poll())
            record(saver.save(step, chunks, optimizer, scheduler, {}, "model: {}\n"))
    if with_saves:
        record(saver.finish(), drop_wait=True)
    return out


def _overlapped(block: dict[str, list]) -> list[int]:
    """Indices of the block's steps that ran at least half inside some write window."""
    idx = []
    for i, (a, b) in enumerate(block["window"]):
        inside = sum(max(0.0, min(b, we) - max(a, ws)) for ws, we in block["write_window"])
        if inside >= 0.5 * (b - a):
            idx.append(i)
    return idx


def _snapshot_s(saver, state: tuple, first_step: int, n: int) -> tuple[float, float]:
    """Seconds one async save blocks before its writer runs (state dict, plan, staging copy),
    and the staging copy's share; medians of ``n`` saves (the first may grow the buffer)."""
    out, copy = [], []
    for step in range(first_step, first_step + n):
        saver.save(step, *state, {}, "model: {}\n")
        out.append(saver._in_flight.schedule_s)
        copy.append(saver._writer.stage_s)
        saver.finish()
    return statistics.median(out), statistics.median(copy)


def bench_async(work: Path, cfg: dict, big_state: tuple) -> dict[str, Any]:
    """The tiny run (``tiny_text_cpu``'s model) trained in interleaved pairs of blocks without
    saves and with an async save after every step (the steps of the saving block, and the subset
    that ran mostly inside a write window, against the steps of the block without saves); and
    the blocking part of an async save of the tiny and the big state, extrapolated linearly to
    10 GB of rank state."""
    from megatron_vlm.checkpoint import CheckpointSaver

    tiny_cfg = dict(SMOKE)
    job = _job(tiny_cfg)
    tiny = _build(job)
    vocab, steps = tiny_cfg["vocab_size"], cfg["async_steps"]
    _train_step(*tiny, 0, vocab)
    saver = CheckpointSaver(work / "async", keep_last=2, async_save=True)
    pairs, blocked, step = [], [], 1
    try:
        saver.save(0, *tiny, {}, "model: {}\n")  # the writer process's start-up, not timed
        saver.finish()
        for i in range(max(1, cfg["pairs"])):
            pair = {}
            for with_saves in ((False, True) if i % 2 == 0 else (True, False)):
                block = _async_block(saver, tiny, steps, step, vocab, with_saves)
                step += steps
                # Every step of the saving block starts with the previous step's write just
                # handed over; the steps that ran mostly inside a write window are a subset.
                for key in ("train_s", "cpu_s", "faults"):
                    pair[f"{key}_{'saving' if with_saves else 'plain'}"] = statistics.median(
                        block[key])
                if with_saves:
                    blocked += block["blocked_s"]
                    inside = _overlapped(block)
                    pair["steps_inside_a_write"] = len(inside)
                    pair["train_s_inside_a_write"] = (statistics.median(
                        block["train_s"][j] for j in inside) if inside else None)
            pairs.append(pair)
        sizes = [sum(v.numel() * v.element_size() for v in plain_state(*st[:2]).values())
                 for st in (tiny, big_state)]
        snaps = [_snapshot_s(saver, tiny, 10**6, cfg["snapshots"])]
        snaps.append(_snapshot_s(saver, big_state, 10**6 + 10, cfg["snapshots"])
                     if sizes[1] > sizes[0] else snaps[0])
    finally:
        saver.close()
    blocking = [s for s, _ in snaps]
    # Smoke: one size, so the proportional figure stands in for the slope.
    slope = ((blocking[1] - blocking[0]) / (sizes[1] - sizes[0]) if sizes[1] > sizes[0]
             else blocking[1] / sizes[1])

    def med(key: str) -> float:
        return statistics.median(p[key] for p in pairs)

    return {"pairs": pairs,
            "tiny_train_s_without_saves": med("train_s_plain"),
            "tiny_train_s_while_writer_runs": med("train_s_saving"),
            "writer_cost_fraction": statistics.median(
                p["train_s_saving"] / p["train_s_plain"] - 1.0 for p in pairs),
            "writer_cost_fraction_steps_inside_a_write": statistics.median(
                [p["train_s_inside_a_write"] / p["train_s_plain"] - 1.0 for p in pairs
                 if p["train_s_inside_a_write"] is not None] or [None]),
            "writer_cpu_cost_fraction": statistics.median(
                p["cpu_s_saving"] / p["cpu_s_plain"] - 1.0 for p in pairs),
            "page_faults_per_step": {"plain": med("faults_plain"),
                                     "saving": med("faults_saving")},
            "tiny_blocked_s_per_save": statistics.median(blocked),
            "blocked_fraction_of_step": statistics.median(blocked) / med("train_s_plain"),
            "snapshot_s": dict(zip(("tiny", "big"), blocking)),
            "staging_copy_s": dict(zip(("tiny", "big"), (c for _, c in snaps))),
            "rank_state_bytes": dict(zip(("tiny", "big"), sizes)),
            "blocked_s_at_10GB_linear": blocking[0] + slope * (10e9 - sizes[0]),
            # Less noisy: the tiny save's fixed part plus the big state's staging copy rate.
            "blocked_s_at_10GB_from_copy_rate": blocking[0] + snaps[1][1] * 10e9 / sizes[1],
            "blocked_s_per_10GB_proportional": blocking[1] * 10e9 / sizes[1]}


def main(argv: list[str] | None = None) -> Path:
    """Run the benchmark; the path of the JSON it wrote."""
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="tiny sizes, a few seconds")
    p.add_argument("--out-dir", default=None, help=f"result directory (default {RESULTS_DIR})")
    p.add_argument("--work-dir", default=None, help="where checkpoints are written (a temp dir "
                   "under it; default the system temp dir)")
    p.add_argument("--no-async", action="store_true", help="skip the async step-time part")
    args = p.parse_args(argv)
    cfg = dict(SMOKE if args.smoke else FULL)

    from benchmarks.harness import init_single_process

    init_single_process()
    job = _job(cfg)
    chunks, optimizer, scheduler = _build(job)
    _train_step(chunks, optimizer, scheduler, 0, cfg["vocab_size"])
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(dir=args.work_dir, prefix="ckpt_io_") as tmp:
        work = Path(tmp)
        results = bench_save_load(work, cfg, job, chunks, optimizer, scheduler)
        if not args.no_async:
            results["async"] = bench_async(work, cfg, (chunks, optimizer, scheduler))
    results["loadavg_before"], results["loadavg_after"] = load_before, os.getloadavg()
    return write_result(
        "checkpoint_io", {**cfg, "seq_length": SEQ, "threads": torch.get_num_threads()},
        results, out_dir=args.out_dir, smoke=args.smoke,
        notes="ratios: baseline seconds / our seconds per interleaved pair, median")


if __name__ == "__main__":
    main()
