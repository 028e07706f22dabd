"""Vision tower under TP=2: ``split`` mode vs TP inside the tower (``model.vision.parallel_mode``).

Two gloo ranks (``torchrun`` started by :func:`main`), TP=2 with sequence parallelism, the tiny
LLM with a wider tower (CPU: width 128, 4 layers, 4 heads, MLP 512) and micro-batches of 512
tokens holding native-resolution images (8x8 .. 16x20 patches), a 6-frame video (chunks of 4 + 2
frames) and text. For each mode, the same weights and batches:

* ``train_step_s``: one optimizer step of the whole VLM over 2 micro-batches (megatron schedule,
  DDP, AdamW), median and min over the timed rounds;
* ``vision_fwd_bwd_s``: the tower + projector alone, forward and backward over one micro-batch's
  media (the part the mode changes).

In split mode each TP rank encodes a cost-balanced share of the items with a replicated tower
(no communication inside it) and the merged features are all-gathered once; in TP mode both
ranks run every item through a TP-sharded tower (all-gathers/reduce-scatters in every layer).
``--smoke`` uses the tiny recipe's tower and one round.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import parse_args, write_result

CPU = dict(vision=dict(hidden_size=128, num_layers=4, num_attention_heads=4,
                       ffn_hidden_size=512, pos_emb_height=32, pos_emb_width=32),
           images=[(1, 16, 16), (1, 12, 20), (1, 8, 8), (1, 20, 12)], video=(6, 8, 8),
           seq_length=512, micro_batches=2, warmup=2, rounds=6)
SMOKE = dict(vision=dict(hidden_size=32, num_layers=2, num_attention_heads=4, ffn_hidden_size=64,
                         pos_emb_height=16, pos_emb_width=16),
             images=[(1, 4, 6), (1, 2, 2)], video=(6, 4, 4), seq_length=128, micro_batches=2,
             warmup=0, rounds=1)
MODES = ("split", "tp")


def _batch(cfg: dict, seed: int):
    """One packed micro-batch: text, each image, the video (chunks of <= 4 frames), text."""
    import torch

    from megatron_vlm.data.contract import VisionInputs
    from megatron_vlm.data.packing import pack_documents

    g = torch.Generator().manual_seed(seed)
    t, h, w = cfg["video"]
    chunks = [(min(4, t - s), h, w) for s in range(0, t, 4)]
    media = [[grid] for grid in cfg["images"]] + [chunks]
    docs, grids, rel, is_video = [], [], [], []
    for item in media:
        ids = torch.randint(3, 1000, (8,), generator=g).tolist()
        starts = []
        for grid in item:
            starts.append(len(ids))
            grids.append(grid)
            is_video.append(item is chunks)
            ids += [1001] * (grid[1] * grid[2] // 4)
        docs.append(ids + torch.randint(3, 1000, (8,), generator=g).tolist())
        rel.append(starts)
    batch = pack_documents(docs, cfg["seq_length"], 0, 4)
    cu = batch.cu_seqlens_padded.tolist()
    starts = [cu[d] + s for d, item in enumerate(rel) for s in item]
    batch.loss_mask[batch.tokens == 1001] = 0.0
    grid = torch.tensor(grids)
    batch.vision = VisionInputs(
        pixel_values=torch.randn(int(grid.prod(1).sum()), 3, 14, 14, generator=g),
        grid_thw=grid, placeholder_starts=torch.tensor(starts),
        is_video=torch.tensor(is_video))
    return batch


def _worker(cfg: dict, out: Path) -> None:
    import torch
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from megatron_vlm.config import apply_overrides
    from megatron_vlm.optim.builder import build_optimizer
    from megatron_vlm.parallel.init import init_distributed
    from megatron_vlm.recipes import get_recipe
    from megatron_vlm.training.model_setup import build_model_chunks, unwrap
    from megatron_vlm.training.trainer import run_forward_backward

    batches = [_batch(cfg, seed) for seed in range(cfg["micro_batches"])]
    vis = cfg["vision"]
    setups = {}
    for mode in MODES:  # both modes share the TP groups; rounds alternate between them
        job = apply_overrides(get_recipe("tiny_vlm_cpu"), [
            "parallel.tp=2", "parallel.sequence_parallel=true", "data.pad_to_multiple=4",
            f"data.seq_length={cfg['seq_length']}", "model.llm.vocab_size=1024",
            f"model.vision.parallel_mode={mode}",
            *[f"model.vision.{k}={v}" for k, v in vis.items()],
            f"model.projector.vision_hidden_size={vis['hidden_size']}",
            "optim.warmup_steps=0", "optim.schedule=constant"])
        if not ps.model_parallel_is_initialized():
            init_distributed(job.parallel, seed=1)
        torch.manual_seed(1)
        chunks = build_model_chunks(job)
        setups[mode] = (chunks, build_optimizer(job.optim, chunks, "fp32", False))
    times = {mode: {"step": [], "vision": []} for mode in MODES}
    rounds = cfg["warmup"] + cfg["rounds"]
    for i in range(rounds):
        for mode, (chunks, optimizer) in setups.items():
            model = unwrap(chunks[0])
            dist.barrier()
            t0 = time.perf_counter()
            for c in chunks:
                c.zero_grad_buffer()
            optimizer.zero_grad()
            run_forward_backward(chunks, batches, cfg["seq_length"], forward_only=False)
            optimizer.step()
            dist.barrier()
            t1 = time.perf_counter()
            v = batches[0].vision
            features = model.projector(model.vision_tower(v.pixel_values, v.grid_thw))
            features.square().mean().backward()
            dist.barrier()
            t2 = time.perf_counter()
            if i >= cfg["warmup"]:
                times[mode]["step"].append(t1 - t0)
                times[mode]["vision"].append(t2 - t1)
    presented = rounds * (sum(b.vision.grid_thw.shape[0] for b in batches)
                          + batches[0].vision.grid_thw.shape[0])
    results = {}
    for mode, (chunks, _) in setups.items():
        step_times, vision_times = times[mode]["step"], times[mode]["vision"]
        results[mode] = {
            "train_step_s": {"median": statistics.median(step_times), "min": min(step_times)},
            "vision_fwd_bwd_s": {"median": statistics.median(vision_times),
                                 "min": min(vision_times)},
            # Items this rank encoded / items it was handed (split ~ 1/tp, tp = 1).
            "encoded_fraction_per_rank":
                unwrap(chunks[0]).vision_tower.num_encoded_items / presented,
        }
    if dist.get_rank() == 0:
        out.write_text(json.dumps(results))
    dist.barrier()


def main(argv: list[str] | None = None) -> Path:
    if argv is None:
        argv = sys.argv[1:]
    if "--worker" in argv:  # inside torchrun: --worker OUT [--smoke]
        out = Path(argv[argv.index("--worker") + 1])
        _worker(SMOKE if "--smoke" in argv else CPU, out)
        return out
    args = parse_args(__doc__.splitlines()[0], argv)
    cfg = SMOKE if args.smoke else CPU
    env = dict(os.environ, TORCH_COMPILE_DISABLE="1", OMP_NUM_THREADS="1")
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw.json"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node=2", "-m", "benchmarks.vision_parallel_mode", "--worker",
               str(raw)] + (["--smoke"] if args.smoke else [])
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800,
                              cwd=Path(__file__).resolve().parents[1])
        if proc.returncode:
            raise RuntimeError(f"benchmark workers failed:\n{proc.stderr[-4000:]}")
        results = json.loads(raw.read_text())
    results["split_speedup_train_step"] = (results["tp"]["train_step_s"]["median"]
                                           / results["split"]["train_step_s"]["median"])
    results["split_speedup_vision"] = (results["tp"]["vision_fwd_bwd_s"]["median"]
                                       / results["split"]["vision_fwd_bwd_s"]["median"])
    return write_result("vision_parallel_mode", {**cfg, "tp": 2, "ranks": 2, "backend": "gloo",
                                                 "omp_threads_per_rank": 1},
                        results, args.out_dir, smoke=args.smoke,
                        notes="2 gloo ranks on a shared CPU; medians over the timed rounds")


if __name__ == "__main__":
    main()
