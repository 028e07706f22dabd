"""A run checked against the nodes it asks for, before anything is queued.

Two checks, both arithmetic on the config (no model is built, no process group):

1. **World size** (``nodes x gpus_per_node``) against the layout: the trainer's own rendezvous
   check (:meth:`ParallelConfig.data_parallel_size`: ``tp*pp*cp`` divides the world size, the
   expert grid ``ep*etp`` divides ``dp*cp*tp``).
2. **The planner** (``megatron_vlm/planning``, as ``tools/plan_parallel.py --check``): the rest
   of the structure on that many GPUs (global batch over DP, TP inside a node, the stage split)
   and per-GPU memory (parameters, gradients, optimizer shards over DP, activations in flight).

A refusal names the numbers and the nearest node counts (below and above) that pass both.
"""

from __future__ import annotations

import dataclasses

from megatron_vlm.config.job import JobConfig
from megatron_vlm.config.parallel import layers_from_layout
from megatron_vlm.planning.layouts import (
    GIB,
    Hardware,
    Layout,
    LayoutEstimate,
    PlanInputs,
    evaluate,
)

#: Node counts searched on each side of the requested one, and planner evaluations at most.
MAX_NODES = 4096
MAX_EVALUATIONS = 16


def recipe_layout(job: JobConfig, num_gpus: int) -> Layout:
    """The job's own layout on ``num_gpus`` GPUs, with its pipeline split when it sets one (as
    ``tools/plan_parallel.py --check`` evaluates it)."""
    layout = job.parallel.pipeline_layout
    split = tuple(layers_from_layout(layout)) if layout else None
    return Layout.of(job.parallel, num_gpus, split=split)


def layout_problems(job: JobConfig, num_gpus: int,
                    hardware: Hardware) -> tuple[list[str], LayoutEstimate | None]:
    """Why ``job`` cannot run on ``num_gpus`` GPUs (empty: it can), and the planner's estimate
    (None when the world size alone rules it out)."""
    try:
        job.parallel.data_parallel_size(num_gpus)
    except ValueError as e:
        return [str(e)], None
    inputs = PlanInputs.from_job(job, num_gpus, hardware=hardware)
    est = evaluate(inputs, recipe_layout(job, num_gpus))
    return list(est.reasons), est


def nearest_node_counts(job: JobConfig, nodes: int, hardware: Hardware
                        ) -> tuple[tuple[int, LayoutEstimate] | None,
                                   tuple[int, LayoutEstimate] | None]:
    """The largest node count below ``nodes`` and the smallest above it on which ``job`` passes
    both checks (None on a side without one within ``MAX_NODES`` / ``MAX_EVALUATIONS``)."""
    gpn = hardware.gpus_per_node

    def search(counts) -> tuple[int, LayoutEstimate] | None:
        evaluations = 0
        for n in counts:
            reasons, est = layout_problems(job, n * gpn, hardware)
            if est is not None and est.stage_plan is not None:
                evaluations += 1  # a memory estimate was made (the costly part, ~15 ms)
            if not reasons:
                return n, est
            if evaluations >= MAX_EVALUATIONS:
                return None
        return None

    return (search(range(nodes - 1, 0, -1)),
            search(range(nodes + 1, max(nodes, MAX_NODES) + 1)))


def _describe(nodes: int, est: LayoutEstimate, gpn: int) -> str:
    return (f"{nodes} node{'s' if nodes > 1 else ''} ({nodes * gpn} GPUs, dp{est.layout.dp}: "
            f"planned peak {est.peak_memory / GIB:.1f} GiB per GPU)")


def check_launch(job: JobConfig, *, recipe: str | None, nodes: int, gpus_per_node: int,
                 gpu_memory_gib: float = 80.0, planned_gpus: int | None = None) -> LayoutEstimate:
    """The planner's estimate of ``job`` on ``nodes x gpus_per_node`` GPUs of
    ``gpu_memory_gib`` each.

    Raises:
        ValueError: the world size does not suit the layout, or the planner says it does not
            fit; the message names the numbers and the nearest node counts that work.
    """
    hardware = dataclasses.replace(Hardware(), gpu_memory_gib=gpu_memory_gib,
                                   gpus_per_node=gpus_per_node)
    num_gpus = nodes * gpus_per_node
    reasons, est = layout_problems(job, num_gpus, hardware)
    if not reasons:
        return est
    p = job.parallel
    label = (f"tp{p.tp} pp{p.pp}{f' vpp{p.vpp}' if p.vpp else ''} cp{p.cp} ep{p.ep} "
             f"etp{p.expert_tp}")
    shown = reasons[:2] + ([f"... and {len(reasons) - 2} more"] if len(reasons) > 2 else [])
    what = "does not fit" if est is not None and est.stage_plan is not None else "cannot use"
    lines = [f"{recipe or job.name}'s layout ({label}) {what} {nodes} node"
             f"{'s' if nodes > 1 else ''} x {gpus_per_node} GPUs = {num_gpus} GPUs "
             f"({gpu_memory_gib:g} GiB each): " + "; ".join(shown)]
    below, above = nearest_node_counts(job, nodes, hardware)
    near = [f"below: {_describe(*below, gpus_per_node) if below else 'none'}",
            f"above: {_describe(*above, gpus_per_node) if above else 'none'}"]
    lines.append(f"nearest node counts that work ({gpus_per_node} GPUs per node): "
                 + "; ".join(near))
    if planned_gpus:
        lines.append(f"the recipe is laid out for {planned_gpus} GPUs"
                     + (f" = {planned_gpus // gpus_per_node} nodes x {gpus_per_node}"
                        if planned_gpus % gpus_per_node == 0 else ""))
    if recipe:
        lines.append(f"details: python tools/plan_parallel.py --recipe {recipe} --gpus N "
                     f"--gpu-memory {gpu_memory_gib:g} --check [the same overrides]")
    raise ValueError("\n  ".join(lines))
