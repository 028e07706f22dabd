"""Collect a sweep's runs into a table: tokens, training compute, realised vision share (overall
and, for runs of several phases, per phase: ``vision_fraction/phase<k>``), final validation
losses, wall time.

Compute is counted as the trainer counts model FLOPs (Megatron-LM's formula, ``planning/costs``:
every LLM layer and the head over the configured sequence length) plus the ViT + projector for
the patches the run actually encoded: the realised image and video token shares of each phase
(``data/image_token_fraction``, ``data/video_token_fraction``, cumulative per loader) times the
phase's tokens, ``merge`` patches per image token and ``merge x temporal_patch_size`` per video
token (full 4-frame chunks; a short last chunk costs less), ViT attention over items of
``image_max_patches`` patches (the cap before padding, which can add a 28-px strip).
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

from megatron_vlm.config import load_yaml
from megatron_vlm.families import family_costs
from megatron_vlm.planning.costs import VisionBudget, llm_head_flops, llm_layer_flops
from tools.scaling.sweep import Sweep


def _records(run_dir: Path) -> list[dict]:
    out = []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def collect_run(run_dir: str | Path, end_steps: list[int]) -> dict:
    """One finished run's row (see the module docstring); ``end_steps`` are its phases' ends."""
    run_dir = Path(run_dir)
    job = load_yaml(str(run_dir / "job.yaml"))
    records = _records(run_dir)
    train = [r for r in records if r.get("split") == "train"]
    valid = [r for r in records if r.get("split") == "valid"]
    if not train or not valid:
        raise ValueError(f"{run_dir}: no training or validation records in metrics.jsonl")
    steps = max(r["step"] for r in train)
    seq, gbs = job.data.seq_length, job.data.global_batch_size
    llm = job.model.llm
    per_micro = sum(sum(llm_layer_flops(llm, i, seq).values()) for i in range(llm.num_layers))
    per_micro += llm_head_flops(llm, seq, job.parallel.tp)
    llm_flops = steps * gbs * per_micro
    tokens = vision_tokens = patches = 0.0
    start = 0
    per_phase = {}
    for k, end in enumerate(end_steps):
        phase = [r for r in train if start < r["step"] <= end]
        start = end
        if not phase:
            continue
        last = phase[-1]
        real = len(phase) * gbs * seq * (1.0 - last.get("data/padding_fraction", 0.0))
        image = last.get("data/image_token_fraction", 0.0) * real
        video = last.get("data/video_token_fraction", 0.0) * real
        tokens += real
        vision_tokens += image + video
        per_phase[f"vision_fraction/phase{k}"] = (image + video) / real if real else 0.0
        if job.model.is_vlm:
            merge = job.model.vision.merge_size
            patches += merge * (image + video * job.model.vision.temporal_patch_size)
    vit_flops = 0.0
    if job.model.is_vlm and patches:
        mm = job.data.multimodal
        item = mm.image_max_patches if mm is not None else job.model.vision.merge_size * seq
        capacity = max(math.ceil(patches), item)  # ceil: fill <= 1 for fractional counts
        budget = VisionBudget(patches_per_micro_batch=capacity, patches_per_item=item,
                              fill=patches / capacity)
        costs = family_costs(job.model.family)
        vit_flops = sum(costs.vision_flops(job.model.vision, job.model.projector,
                                           budget).values())
    final = valid[-1]
    row = {"steps": steps, "tokens": tokens, "llm_flops": llm_flops, "vit_flops": vit_flops,
           "compute": llm_flops + vit_flops,
           "vision_fraction": vision_tokens / tokens if tokens else 0.0}
    if len(end_steps) > 1:
        row.update(per_phase)
    row.update({f"valid/{k}": v for k, v in final.items() if k.startswith("loss/")})
    seconds = sum(r.get("step_time_s", 0.0) for r in train)
    row["train_seconds"] = seconds
    return row


def collect(sweep: Sweep) -> list[dict]:
    """Rows of every finished run of ``sweep`` (unfinished ones are skipped)."""
    rows = []
    for run in sweep.runs:
        run_dir = Path(run.output_dir)
        if not (run_dir / "metrics.jsonl").exists():
            continue
        info_path = run_dir / "sweep_run.json"
        info = json.loads(info_path.read_text()) if info_path.exists() else {}
        row = {"name": run.name, **run.tags,
               **collect_run(run_dir, [p.end_step for p in run.phases])}
        if row["steps"] < run.steps:
            continue
        row["wall_seconds"] = info.get("seconds")
        rows.append(row)
    return rows


def write_table(rows: list[dict], out_dir: str | Path, stem: str) -> tuple[Path, Path]:
    """``<stem>.csv`` and ``<stem>.json`` under ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    keys: list[str] = []
    for row in rows:
        keys += [k for k in row if k not in keys]
    csv_path, json_path = out_dir / f"{stem}.csv", out_dir / f"{stem}.json"
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    json_path.write_text(json.dumps(rows, indent=1))
    return csv_path, json_path
