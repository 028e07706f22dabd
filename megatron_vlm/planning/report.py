"""Text and JSON reports of the layout planner (``tools/plan_parallel.py``)."""

from __future__ import annotations

from collections import Counter

from megatron_vlm.planning.layouts import GIB, LayoutEstimate, PlanInputs

_PARTS = ("params", "grads", "main_params", "optimizer_state", "activations")


def _reason_kind(reason: str) -> str:
    """A reason with its numbers dropped, to group rejections."""
    words = [w for w in reason.split() if not any(c.isdigit() for c in w)]
    return " ".join(words[:8])


def assumptions(inputs: PlanInputs) -> list[str]:
    """The numbers the estimate rests on, one line each."""
    hw, b = inputs.hardware, inputs.vision_budget
    modules = f" {list(inputs.recompute_modules)}" if inputs.recompute == "selective" else ""
    attention = "flash attention" if inputs.flash_attention else "unfused attention"
    lines = [
        (f"{inputs.num_gpus} GPUs x {hw.gpu_memory_gib:.0f} GiB ({hw.reserved_gib:.0f} GiB "
         f"reserved), {hw.gpus_per_node} per node; seq {inputs.seq_length}, global batch "
         f"{inputs.global_batch_size} sequences (micro-batch 1)"),
        (f"optimizer {inputs.optimizer}, sharding {inputs.sharding}; LLM recompute "
         f"{inputs.recompute}{modules}, ViT recompute {inputs.vision_recompute}; {attention}"),
        (f"step time: FLOPs at {hw.efficiency:.0%} of {hw.peak_tflops:.0f} TFLOP/s, TP/CP/EP "
         f"traffic at {hw.nvlink_gbps:.0f} GB/s (node) / {hw.network_gbps:.0f} GB/s "
         f"(network), {hw.comm_overlap:.0%} hidden"),
    ]
    if b is not None:
        lines.append(f"vision budget: {b.patches_per_micro_batch} patches per micro-batch at "
                     f"{b.fill:.0%} fill, items of {b.patches_per_item} patches, ViT on stage 0")
    return lines


def format_table(estimates: list[LayoutEstimate], top: int = 15) -> str:
    """Fitting layouts ranked by step time, then why the others fail (grouped)."""
    fitting = [e for e in estimates if e.fits]
    rows = [(f"{'layout':<34} {'step s':>7} {'MFU':>6} {'bubble':>6} {'GiB':>6} "
             f"{'par':>5} {'grad':>5} {'opt':>5} {'act':>5}  stages")]
    for e in fitting[:top]:
        worst = max(e.rank_memory, key=lambda m: m["total"])
        opt = worst["main_params"] + worst["optimizer_state"]
        rows.append(
            f"{e.layout.label:<34} {e.step_time_s:>7.2f} {e.mfu:>6.1%} "
            f"{e.bubble_fraction:>6.1%} {worst['total'] / GIB:>6.1f} "
            f"{worst['params'] / GIB:>5.1f} {worst['grads'] / GIB:>5.1f} {opt / GIB:>5.1f} "
            f"{worst['activations'] / GIB:>5.1f}  {_stages(e)}")
    out = [(f"{len(fitting)} of {len(estimates)} layouts fit; the {min(top, len(fitting))} "
            "fastest (memory of the busiest pipeline rank):"), *rows]
    failing = [e for e in estimates if not e.fits]
    if failing:
        kinds = Counter(_reason_kind(e.reasons[0]) for e in failing)
        examples: dict[str, LayoutEstimate] = {}
        for e in failing:
            examples.setdefault(_reason_kind(e.reasons[0]), e)
        out.append(f"{len(failing)} layouts rejected; by first reason:")
        for kind, count in kinds.most_common():
            e = examples[kind]
            out.append(f"  {count:>6} x  e.g. {e.layout.label}: {e.reasons[0]}")
    return "\n".join(out)


def _stages(e: LayoutEstimate) -> str:
    if e.stage_plan is None or e.layout.pp == 1:
        return "-"
    counts = e.stage_plan.layers_per_stage
    return f"{'/'.join(map(str, counts))} (imb {e.stage_plan.imbalance:.2f})"


def format_detail(e: LayoutEstimate) -> str:
    """One layout in full: verdict, per-rank memory, the stage split."""
    lines = [f"layout {e.layout.label}: " + ("fits" if e.fits else "does not fit")]
    lines += [f"  - {r}" for r in e.reasons]
    if e.rank_memory:
        lines.append(f"  {'pp rank':>7} " + " ".join(f"{p:>15}" for p in _PARTS)
                     + f" {'total GiB':>10}")
        for r, m in enumerate(e.rank_memory):
            lines.append(f"  {r:>7} " + " ".join(f"{m[p] / GIB:>15.2f}" for p in _PARTS)
                         + f" {m['total'] / GIB:>10.2f}")
    if e.step_time_s is not None:
        lines.append(f"  step {e.step_time_s:.2f} s, MFU {e.mfu:.1%}, bubble "
                     f"{e.bubble_fraction:.1%}, exposed communication {e.comm_s:.2f} s, "
                     f"{e.tokens_per_s_per_gpu:.0f} tokens/s/GPU")
    if e.stage_plan is not None:
        lines.append(e.stage_plan.describe())
    return "\n".join(lines)


def to_json(inputs: PlanInputs, estimates: list[LayoutEstimate]) -> dict:
    """Everything evaluated, for ``--json``."""
    return {"assumptions": assumptions(inputs), "num_gpus": inputs.num_gpus,
            "seq_length": inputs.seq_length, "global_batch_size": inputs.global_batch_size,
            "optimizer": inputs.optimizer, "sharding": inputs.sharding,
            "layouts": [e.to_dict() for e in estimates]}
