"""TP=2 (or PP=2) training of the tiny VLM through ``trainer.train`` (torchrun, 2 gloo ranks),
three runs in one process start: ``handoff`` (batches built on rank 0 only and handed over;
step 1, then a checkpoint and exit), ``every_rank`` (the former path: each rank builds its own,
by giving ``prepare_run`` no groups; steps 1-2) and ``resumed`` (hand-off, step 2 from
``handoff``'s checkpoint: the loader state saved by the source rank). Each rank counts the
multimodal loader's batch builds and pack calls per run and writes them to
``OUT/counts_rank{R}.json`` (layout -> run -> counts); rank 0 writes each run's
``metrics.jsonl`` (under PP the last stage computes the loss, and megatron's reductions bring it
to rank 0's log).

Usage: torchrun --nproc-per-node=2 handoff_train_worker.py OUT LAYOUTS
(LAYOUTS: comma-separated, of tp2, pp2 (PP=2: stage 0 builds, stage 1 receives) and cp2; each in
``OUT/<layout>/<run>``, megatron's groups rebuilt between layouts).
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from collections import Counter
from pathlib import Path

import torch.distributed as dist

from megatron_vlm.config import apply_overrides
from megatron_vlm.data import mm_loader
from megatron_vlm.recipes import get_recipe
from megatron_vlm.training import trainer

COUNTS: Counter = Counter()
LAYOUTS = {"tp2": ["parallel.tp=2", "parallel.sequence_parallel=true"],
           "pp2": ["parallel.pp=2", "model.llm.num_layers=4"],
           "cp2": ["parallel.cp=2"]}  # pad_to_multiple=4 = 2 x cp x tp
COMMON = ["train.steps=2",
          "data.global_batch_size=2", "data.pad_to_multiple=4", "train.eval_interval=0",
          "train.eval_batches=1", "train.log_interval=1", "train.plot=false",
          "train.tensorboard=false", "checkpoint.save_on_exit=false", "optim.warmup_steps=1"]


def _counted(name: str, fn):
    def wrapper(*args, **kwargs):
        COUNTS[name] += 1
        return fn(*args, **kwargs)
    return wrapper


def _every_rank_prepare_run(prepare_run):
    """``prepare_run`` as before the hand-off: no groups, so every rank builds its loader."""
    def wrapper(*args, pg_collection=None, **kwargs):
        return prepare_run(*args, **kwargs)
    return wrapper


def run_layout(out: Path, layout: list[str], tokenizer_dir: Path | None) -> dict:
    """The three runs in one layout under ``out``; each rank's counts per run."""
    runs = [("handoff", ["train.exit_after_steps=1"]),  # saves step 1 and stops
            ("every_rank", []),
            ("resumed", ["checkpoint.resume=require",
                         f"checkpoint.dir={out / 'handoff' / 'checkpoints'}"])]
    prepare_run, counts = trainer.prepare_run, {}
    for name, extra in runs:
        COUNTS.clear()
        trainer.prepare_run = (_every_rank_prepare_run(prepare_run) if name == "every_rank"
                               else prepare_run)
        job = apply_overrides(get_recipe("tiny_vlm_cpu"),
                              [*layout, *COMMON, f"train.output_dir={out / name}", *extra])
        source = tokenizer_dir or out / "handoff"
        if (out / name) != source and dist.get_rank() == 0:  # one tokenizer, trained once
            (out / name).mkdir(parents=True)
            for f in source.glob("spm_*"):
                shutil.copy(f, out / name / f.name)
        t0 = time.perf_counter()
        try:
            trainer.train(job)
        finally:
            trainer.prepare_run = prepare_run
        if dist.get_rank() == 0:
            print(f"[handoff_train_worker] {out.name} {name}: {time.perf_counter() - t0:.1f} s",
                  flush=True)
        counts[name] = dict(COUNTS)
    return counts


def main() -> None:
    from megatron.core import parallel_state

    out = Path(sys.argv[1])
    loader = mm_loader.MultimodalLoader
    loader.next_global_batch = _counted("next_global_batch", loader.next_global_batch)
    loader.validation_batches = _counted("validation_batches", loader.validation_batches)
    loader._next_pack = _counted("pack", loader._next_pack)
    counts, tokenizer_dir = {}, None
    for layout in sys.argv[2].split(","):
        if parallel_state.model_parallel_is_initialized():  # the next layout's groups
            parallel_state.destroy_model_parallel()
        counts[layout] = run_layout(out / layout, LAYOUTS[layout], tokenizer_dir)
        tokenizer_dir = tokenizer_dir or out / layout / "handoff"
    (out / f"counts_rank{dist.get_rank()}.json").write_text(json.dumps(counts))


if __name__ == "__main__":
    main()
