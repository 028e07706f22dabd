"""CLI: ``python -m megatron_vlm.train --recipe tiny_cpu train.steps=20 parallel.tp=2``.

Runs under ``torchrun`` for several processes, or as a plain single process.

A run directory (``train.output_dir``) belongs to one run and one job at a time
(``megatron_vlm/checkpoint/run_dir.py``):

* no flag: a fresh run; refused if the directory holds a previous run's checkpoints or metrics;
* ``--resume`` (= ``--resume=auto``): the newest complete checkpoint, or step 0 (it says so);
* ``--resume=require``: the newest complete checkpoint, or exit with an error naming the
  directory (what a requeued SLURM job passes);
* ``--overwrite``: a fresh run that first moves the previous one to ``replaced-<UTC time>/``.

Refusals (config errors, a run directory in use or holding another run, nothing to resume, a
checkpoint of another model or layout) print one ``error: ...`` line and exit with status 2.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from pathlib import Path

from megatron_vlm.config.checkpoint import RESUME_MODES


def _recipes_help() -> str:
    from megatron_vlm.recipes import RECIPES

    lines = []
    for name, fn in RECIPES.items():
        doc = (fn.__doc__ or "").strip().splitlines()
        lines.append(f"  {name:<22} {doc[0] if doc else ''}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Pretrain a megatron_vlm model.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Overrides are dotted config paths: train.steps=20 optim.lr=1e-3 parallel.tp=2 "
               "data.multimodal.mixes.joint.weights.text=0.5 (see --print-config for every "
               "key).\n\nrecipes:\n" + _recipes_help(),
    )
    parser.add_argument("--recipe", default="tiny_cpu",
                        help="recipe name (default: tiny_cpu; the list is below)")
    parser.add_argument("--config", default=None, help="YAML saved by a previous run (job.yaml)")
    parser.add_argument("--resume", choices=RESUME_MODES, default=None, metavar="{auto,require}",
                        help="--resume or --resume=auto: continue from the newest complete "
                        "checkpoint, or start at step 0 if there is none; --resume=require: "
                        "exit with an error if there is none (checkpoint.resume=...)")
    parser.add_argument("--overwrite", action="store_true",
                        help="start afresh in a run directory that holds a previous run, moving "
                        "its checkpoints and metrics to replaced-<time>/ (checkpoint.overwrite)")
    parser.add_argument("--print-config", action="store_true", help="print the config and exit")
    parser.add_argument("overrides", nargs="*", help="section.field=value")
    return parser.parse_args(_bare_resume(sys.argv[1:] if argv is None else list(argv)))


def _bare_resume(argv: list[str]) -> list[str]:
    """``--resume`` alone means ``--resume=auto``; ``--resume MODE`` is ``--resume=MODE``.
    (argparse's optional value would swallow a following ``section.field=value`` override.)"""
    out, i = [], 0
    while i < len(argv):
        if argv[i] == "--resume":
            mode = argv[i + 1] if i + 1 < len(argv) and argv[i + 1] in RESUME_MODES else None
            out.append(f"--resume={mode or 'auto'}")
            i += 2 if mode else 1
            continue
        out.append(argv[i])
        i += 1
    return out


def build_job(args: argparse.Namespace):
    from megatron_vlm.config import apply_overrides, load_yaml
    from megatron_vlm.recipes import get_recipe

    job = load_yaml(args.config) if args.config else get_recipe(args.recipe)
    overrides = list(args.overrides)
    if args.resume:
        overrides.append(f"checkpoint.resume={args.resume}")
    if args.overwrite:
        overrides.append("checkpoint.overwrite=true")
    return apply_overrides(job, overrides)


def _is_rank0() -> bool:
    return os.environ.get("RANK", "0") == "0"


def quiet_third_party() -> None:
    """Silence third-party output that repeats per rank and says nothing actionable.

    - megatron-core without TE/Apex (the CPU path) warns per module that it falls back to torch
      (expected, SPEC §6), and emits deprecation notices for its own APIs;
    - torch's DataLoader warns per loader that ``pin_memory`` has no accelerator to pin for
      (energon's loaders ask for pinned memory; on CPU it is a no-op);
    - energon's "Filling reading buffer" progress bar from every rank's loader workers
      (``TQDM_DISABLE``, inherited by the workers; export ``TQDM_DISABLE=0`` to see them) and
      its INFO logs.
    """
    os.environ.setdefault("TQDM_DISABLE", "1")
    warnings.filterwarnings("ignore", message=r".*not installed.*[Ff]all(ing)? back.*")
    warnings.filterwarnings("ignore", message=r".*'pin_memory' argument is set as true.*")
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"megatron\.")
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"megatron\.")
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch\.jit")
    # torch's ShardedTensor deprecation, raised through megatron's dist_checkpointing on each load.
    warnings.filterwarnings("ignore", message=r".*Please use DTensor instead.*")
    for name in ("megatron.energon", "megatron.core"):
        logging.getLogger(name).setLevel(logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        job = build_job(args)
    except ValueError as err:  # config errors: one clear line, no traceback, once
        if _is_rank0():
            print(f"config error: {err}", file=sys.stderr)
        return 2
    if args.print_config:
        print(job.to_yaml())
        return 0
    quiet_third_party()  # first: tqdm reads TQDM_DISABLE when it is imported (torch imports it)
    # CPU: megatron's jit_fuser compiles (first MoE forward 19 s vs 0.03 s, SPEC §6); on CUDA the
    # fused kernels the banner reports (bias-SwiGLU, flex attention) need torch.compile.
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TORCH_COMPILE_DISABLE", "1")
    from megatron_vlm.checkpoint.run_dir import RunDirError
    from megatron_vlm.parallel.agree import StartupError
    from megatron_vlm.training.trainer import train

    out = Path(job.train.output_dir)
    try:
        result = train(job)  # writes job.yaml once it holds the run directory
    except (RunDirError, StartupError) as err:  # refused start: one line (every rank raises it)
        if _is_rank0():
            print(f"error: {err}", file=sys.stderr)
        return 2
    if _is_rank0():
        print(f"done: step {result.state.step}, valid loss {result.final_valid_loss}, "
              f"checkpoint {result.checkpoint}, plot {out / 'loss_curve.png'}")
    from megatron_vlm.parallel.init import destroy_distributed

    destroy_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
