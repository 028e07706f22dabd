"""Plan a parallel layout before queueing: per-GPU memory, fit in 80 GB, step time.

    python tools/plan_parallel.py --recipe kimi_k25 --gpus 1024
    python tools/plan_parallel.py --recipe kimi_k25 --gpus 1024 --seq 4096 --gbs 16384 \\
        --optimizer muon --recompute full --json plan.json
    python tools/plan_parallel.py --recipe kimi_k25 --gpus 1024 --check    # the recipe's layout
    python tools/plan_parallel.py --recipe kimi_k25 --gpus 512 --stages    # stage split only

Every candidate (tp, pp, vpp, cp, ep, etp) is checked; the ones that fit are ranked by estimated
step time and the others listed with the reason they fail. Dotted overrides after the options
edit the recipe as for the trainer (``data.multimodal.max_patches_per_micro_batch=8192``).
The arithmetic lives in ``megatron_vlm/planning/``; its assumptions are printed with the table.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_vlm.config import apply_overrides
from megatron_vlm.config.parallel import layers_from_layout
from megatron_vlm.planning.costs import VisionBudget
from megatron_vlm.planning.layouts import (
    Hardware,
    Layout,
    PlanInputs,
    evaluate,
    plan_layouts,
)
from megatron_vlm.planning.report import (
    assumptions,
    format_detail,
    format_table,
    to_json,
)
from megatron_vlm.recipes import get_recipe


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", required=True, help="recipe name (e.g. kimi_k25)")
    p.add_argument("--gpus", type=int, required=True, help="number of GPUs")
    p.add_argument("--seq", type=int, default=None, help="sequence length (default: recipe's)")
    p.add_argument("--gbs", type=int, default=None,
                   help="global batch in sequences (default: recipe's)")
    p.add_argument("--optimizer", choices=("adamw", "muon"), default=None)
    p.add_argument("--sharding", choices=("flat", "layerwise", "none"), default=None,
                   help="optimizer-state sharding (default: flat for AdamW, layerwise for Muon)")
    p.add_argument("--recompute", choices=("none", "full", "selective"), default=None,
                   help="LLM activation recompute (default: recipe's)")
    p.add_argument("--vision-recompute", choices=("none", "full"), default=None)
    p.add_argument("--vision-fill", type=float, default=1.0,
                   help="average fraction of the ViT patch budget used per micro-batch")
    p.add_argument("--patches-per-item", type=int, default=None,
                   help="patches one image / video chunk attends over (default: the budget's)")
    p.add_argument("--unfused-attention", action="store_true",
                   help="keep the softmax output (no flash attention kernel)")
    p.add_argument("--gpu-memory", type=float, default=80.0, help="GiB per GPU")
    p.add_argument("--reserved", type=float, default=6.0, help="GiB kept free per GPU")
    p.add_argument("--efficiency", type=float, default=0.55,
                   help="fraction of peak FLOP/s the math reaches")
    p.add_argument("--top", type=int, default=15, help="fitting layouts to list")
    p.add_argument("--check", action="store_true", help="evaluate only the recipe's layout")
    p.add_argument("--stages", action="store_true",
                   help="print the recipe layout's pipeline stage split and exit")
    p.add_argument("--json", default=None, help="write every evaluated layout to this file")
    p.add_argument("overrides", nargs="*", help="section.field=value recipe overrides")
    return p.parse_args(argv)


def build_inputs(args: argparse.Namespace):
    job = apply_overrides(get_recipe(args.recipe), list(args.overrides))
    changes: dict = {}
    if args.seq:
        changes["seq_length"] = args.seq
    if args.gbs:
        changes["global_batch_size"] = args.gbs
    if args.optimizer:
        changes["optimizer"] = args.optimizer
        if not args.sharding:
            changes["sharding"] = "layerwise" if args.optimizer == "muon" else "flat"
    if args.sharding:
        changes["sharding"] = args.sharding
    if args.recompute:
        changes["recompute"] = args.recompute
    if args.vision_recompute:
        changes["vision_recompute"] = args.vision_recompute
    budget = VisionBudget.from_job(job, fill=args.vision_fill)
    if budget is not None and args.patches_per_item:
        budget = dataclasses.replace(budget, patches_per_item=args.patches_per_item)
    changes["vision_budget"] = budget
    changes["flash_attention"] = not args.unfused_attention
    changes["hardware"] = Hardware(gpu_memory_gib=args.gpu_memory, reserved_gib=args.reserved,
                                   efficiency=args.efficiency)
    return job, PlanInputs.from_job(job, args.gpus, **changes)


def recipe_layout(job, num_gpus: int) -> Layout:
    """The recipe's own layout, with its pipeline split when it sets one."""
    layout = job.parallel.pipeline_layout
    split = tuple(layers_from_layout(layout)) if layout else None
    return Layout.of(job.parallel, num_gpus, split=split)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        job, inputs = build_inputs(args)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print("\n".join(f"# {line}" for line in assumptions(inputs)))
    if args.check or args.stages:
        est = evaluate(inputs, recipe_layout(job, args.gpus))
        if args.stages and est.stage_plan is not None:
            print(est.stage_plan.describe())
        else:
            print(format_detail(est))
        estimates = [est]
    else:
        estimates = plan_layouts(inputs)
        print(format_table(estimates, top=args.top))
        best = next((e for e in estimates if e.fits), None)
        if best is not None:
            print("\nbest:\n" + format_detail(best))
    if args.json:
        Path(args.json).write_text(json.dumps(to_json(inputs, estimates), indent=1))
        print(f"wrote {args.json}")
    return 0 if all(e.fits for e in estimates) or not (args.check or args.stages) else 1


if __name__ == "__main__":
    sys.exit(main())
