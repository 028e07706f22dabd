"""GPU smoke (issue 16 item 8): 3 steps of the tiny VLM on NCCL, then the LLM MFU benchmark.

One command on one lent H100/H200 (SPEC §12: torch + CUDA, no megatron-core/TE/Apex/energon),
well under 5 minutes, JSON written after every stage so a run cut off still brings back what it
measured:

1. ``train``: ``torchrun --nproc-per-node 1 -m megatron_vlm.train --recipe tiny_cpu`` for 3 steps
   on NCCL with megatron's local spec (``model.kernels.backend=local``; attention ``sdpa_doc``,
   see :func:`run_overrides`), fed from pre-packed
   micro-batches (``data.prepacked``: energon, PyAV and decord do not fit the 64 MiB that
   travels) with the tokenizer they were packed with. Recorded: per-step loss, grad norm and step
   time, validation losses, the checkpoint written at exit, wall time, and the traceback of a
   failure.
2. ``llm_mfu``: ``python -m benchmarks.llm_mfu`` (K2-proxy, ours vs ``stock+sdpa``; ``--smoke``
   with ``--cpu``); its JSON is embedded.

A failed stage records its error and the script goes on; it exits 1 if any stage failed.

Here, where energon and the package index work (once; the outputs are git-ignored)::

    bash benchmarks/gpu_smoke.sh --prepare     # benchmarks/data/gpu_smoke/ + .gpu_wheels/

On the lent machine, with the device tool's ``run`` (timeout_s 360; ~1 minute of start-up)::

    command: bash benchmarks/gpu_smoke.sh
    carry:   [".gpu_wheels", "benchmarks/data"]

Results: ``benchmarks/results/gpu_smoke_<device>.json`` and, when ``$OUT`` is set, the same file
in ``$OUT`` (+ the benchmark's JSON and the training log). ``--cpu`` runs the same
stages on gloo/CPU (what ``tests/e2e/test_gpu_smoke.py`` checks).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS_DIR, device_info, device_tag

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DIR = REPO / "benchmarks" / "data" / "gpu_smoke"
PACKS = "tiny_vlm_packs.pt"
"""The pre-packed micro-batches (``data.prepacked``), in the smoke directory."""
TOKENIZER = "tokenizer.model"
"""The SentencePiece model the packs were tokenised with (``data.tokenizer``)."""
RECIPE = "tiny_cpu"
STEPS = 3
TRAIN_TIMEOUT_S = 150
"""Cap of stage 1 (start-up ~30 s, 3 steps of a 3-layer model, one checkpoint)."""


def job_overrides(steps: int) -> list[str]:
    """What the smoke changes in ``tiny_cpu``, at prepare time and at run time alike."""
    return [f"train.steps={steps}", "optim.warmup_steps=1", "train.eval_interval=0",
            "train.eval_batches=1", "train.log_interval=1", "train.tensorboard=false",
            "train.plot=false", "model.kernels.backend=local"]


def run_overrides(smoke_dir: Path, run_dir: Path, steps: int, cpu: bool,
                  extra: list[str] = ()) -> list[str]:
    """Stage 1's overrides: the smoke's job reading the pre-packed file on NCCL (gloo on CPU),
    then ``extra`` (``--train-override``).

    The attention kernel is per-document SDPA: ``auto`` would pick flex for the fp32 tiny model
    on CUDA, whose torch.compile of four graphs (LLM/ViT, forward/backward) can take a minute of
    the 5-minute budget; the CUDA kernels are checked on their own (issue 22 item 2). Pass
    ``--train-override model.kernels.attention_kernel=auto`` to train through them here.
    """
    return [*job_overrides(steps), f"train.output_dir={run_dir}",
            f"data.prepacked={smoke_dir / PACKS}", f"data.tokenizer={smoke_dir / TOKENIZER}",
            f"parallel.backend={'gloo' if cpu else 'nccl'}",
            "model.kernels.attention_kernel=sdpa_doc",
            *(["train.cpu_threads=1"] if cpu else []), *extra]


# --------------------------------------------------------------------------- prepare


def prepare(smoke_dir: Path, steps: int = STEPS) -> dict[str, Any]:
    """Run the real multimodal loader here and write the pre-packed file and its tokenizer.

    The file holds the first ``steps`` global batches of ``tiny_cpu``'s stream (DP size 1, no
    workers) and one held-out micro-batch per dataset; returns what was written.
    """
    from megatron_vlm.config import apply_overrides
    from megatron_vlm.data.prepacked import PrepackedData, save_prepacked
    from megatron_vlm.recipes import get_recipe
    from megatron_vlm.train import quiet_third_party
    from megatron_vlm.training.data_setup import build_data

    quiet_third_party()
    job = apply_overrides(get_recipe(RECIPE),
                          [*job_overrides(steps), "data.multimodal.num_workers=0"])
    smoke_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        data = build_data(job, dp_rank=0, dp_size=1, run_dir=Path(tmp))
        try:
            train = [b for _ in range(steps) for b in data.loader.next_global_batch()]
            lines = data.loader.describe()
        finally:
            data.close()
        shutil.copyfile(data.tokenizer.base.model_path, smoke_dir / TOKENIZER)
    meta = {"source": f"{RECIPE}'s multimodal loader ({', '.join(data.loader.datasets)})",
            "source_lines": lines, "recipe": RECIPE, "overrides": job_overrides(steps),
            "global_batch_size": job.data.global_batch_size, "steps": steps,
            "tokenizer_file": TOKENIZER, "tokenizer_vocab_size": data.tokenizer.vocab_size,
            "token_ids": dataclasses.asdict(data.token_ids),
            "written": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    path = save_prepacked(smoke_dir / PACKS, PrepackedData(train=train, valid=data.valid,
                                                           meta=meta))
    sizes = {p.name: p.stat().st_size for p in (path, smoke_dir / TOKENIZER)}
    print(f"wrote {path} ({len(train)} train + {sum(map(len, data.valid.values()))} valid "
          f"micro-batches) and {smoke_dir / TOKENIZER}; bytes: {sizes}")
    return {"packs": str(path), "tokenizer": str(smoke_dir / TOKENIZER), "bytes": sizes}


# --------------------------------------------------------------------------- stages


def _tail(text: str | bytes | None, chars: int = 6000) -> str:
    if isinstance(text, bytes):
        text = text.decode(errors="replace")
    return (text or "")[-chars:]


def _last_traceback(stderr: str) -> str | None:
    """The last Python traceback in a child's stderr (torchrun prints the worker's)."""
    start = stderr.rfind("Traceback (most recent call last)")
    return stderr[start:][-8000:] if start >= 0 else None


def run_child(cmd: list[str], timeout_s: float, env: dict[str, str]) -> dict[str, Any]:
    """Run ``cmd`` from the repository root; its exit status, wall time and output tails."""
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True,
                              timeout=max(timeout_s, 1))
        out, err, rc, timed_out = proc.stdout, proc.stderr, proc.returncode, False
    except subprocess.TimeoutExpired as exc:
        out, err, rc, timed_out = _tail(exc.stdout), _tail(exc.stderr), None, True
    row: dict[str, Any] = {"command": cmd, "returncode": rc, "timed_out": timed_out,
                           "wall_s": time.perf_counter() - t0, "stdout_tail": _tail(out, 3000),
                           "stderr_tail": _tail(err)}
    if rc != 0:
        row["error"] = (f"timed out after {timeout_s:.0f} s" if timed_out
                        else f"exit status {rc}")
        row["traceback"] = _last_traceback(err or "")
    return row


def read_run(run_dir: Path) -> dict[str, Any]:
    """Losses, grad norms, step times and validation losses from a run's ``metrics.jsonl``."""
    path = run_dir / "metrics.jsonl"
    rows = [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []
    train = [r for r in rows if r["split"] == "train"]
    out: dict[str, Any] = {
        "steps": [r["step"] for r in train], "loss": [r.get("loss") for r in train],
        "grad_norm": [r.get("grad_norm") for r in train],
        "step_time_s": [r.get("step_time_s") for r in train],
        "tokens_per_s": [r.get("tokens_per_s") for r in train],
        "valid": [{k: v for k, v in r.items() if k == "step" or k.startswith("loss/")}
                  for r in rows if r["split"] == "valid"]}
    ckpts = sorted(p.name for p in (run_dir / "checkpoints").glob("step_*")) \
        if (run_dir / "checkpoints").is_dir() else []
    out["checkpoints"] = ckpts
    return out


def child_env(cpu: bool) -> dict[str, str]:
    """The children's environment: the repository importable; on CPU no CUDA, one thread and no
    torch.compile. On the GPU torch.compile stays as set (on by default: megatron's fused
    kernels and flex attention are compiled, as in ``run_gpu_suite.sh``; the trainer turns it
    off unless ``TORCH_COMPILE_DISABLE`` is set)."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    if cpu:
        env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1", TORCH_COMPILE_DISABLE="1")
    return env


def stage_train(args: argparse.Namespace, work: Path, timeout_s: float) -> dict[str, Any]:
    """Stage 1: torchrun, one process, the smoke's job from the pre-packed file."""
    smoke_dir = Path(args.dir)
    missing = [str(smoke_dir / n) for n in (PACKS, TOKENIZER) if not (smoke_dir / n).is_file()]
    if missing:
        raise FileNotFoundError(f"{missing} missing: run `bash benchmarks/gpu_smoke.sh --prepare` "
                                "where energon works, and carry benchmarks/data")
    run_dir = work / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
           "-m", "megatron_vlm.train", "--recipe", RECIPE,
           *run_overrides(smoke_dir, run_dir, args.steps, args.cpu, args.train_override)]
    row = run_child(cmd, timeout_s, child_env(args.cpu))
    row.update(read_run(run_dir))
    row["ok"] = row["returncode"] == 0 and len(row["loss"]) == args.steps
    log = work / "train_log.txt"
    log.write_text(f"$ {' '.join(cmd)}\n--- stdout\n{row['stdout_tail']}\n"
                   f"--- stderr\n{row['stderr_tail']}\n")
    return row


def stage_llm_mfu(args: argparse.Namespace, work: Path, timeout_s: float) -> dict[str, Any]:
    """Stage 2: the LLM MFU benchmark, ours vs ``stock+sdpa`` (its JSON embedded)."""
    out_dir = work / "llm_mfu"
    cmd = [sys.executable, "-m", "benchmarks.llm_mfu", "--out-dir", str(out_dir),
           *(["--smoke"] if args.cpu else []), *(["--no-ablations"] if not args.ablations else [])]
    row = run_child(cmd, timeout_s, child_env(args.cpu))
    files = sorted(out_dir.glob("llm_mfu_*.json")) if out_dir.is_dir() else []
    if files:  # written after every variant: a cut-off run still has the finished ones
        row["json_file"] = files[-1].name
        row["result"] = json.loads(files[-1].read_text())
    results = (row.get("result") or {}).get("results", {})
    row["ok"] = row["returncode"] == 0 and "ours_over_stock_tokens_per_s" in results
    return row


STAGES = {"train": (stage_train, TRAIN_TIMEOUT_S), "llm_mfu": (stage_llm_mfu, None)}


# --------------------------------------------------------------------------- driver


def versions() -> dict[str, str | None]:
    """Installed versions read from package metadata (importing megatron-core or probing the
    media libraries would cost the driver seconds; the training child imports what it needs)."""
    from importlib import metadata

    out: dict[str, str | None] = {}
    for dist in ("torch", "megatron-core", "numpy", "sentencepiece", "megatron-energon", "av",
                 "decord"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = None
    return out


def gpu_name() -> str | None:
    import torch

    return torch.cuda.get_device_name(0) if torch.cuda.is_available() else None


def write_json(report: dict[str, Any], out_dirs: list[Path], name: str) -> list[Path]:
    """The report to every directory in ``out_dirs`` (atomically: a reader never sees half)."""
    paths = []
    for d in out_dirs:
        d.mkdir(parents=True, exist_ok=True)
        path = d / name
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(report, indent=2, default=str) + "\n")
        os.replace(tmp, path)
        paths.append(path)
    return paths


def run_stages(args: argparse.Namespace, out_dirs: list[Path], name: str) -> dict[str, Any]:
    """Every selected stage in order, the report written before and after each."""
    t_start = time.perf_counter()
    report: dict[str, Any] = {
        "benchmark": "gpu_smoke", "smoke": args.cpu, "device_kind": "cpu" if args.cpu else "cuda",
        "gpu": None if args.cpu else gpu_name(), "device": device_info(), "versions": versions(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "budget_s": args.budget_s, "steps": args.steps, "stages": {}}
    work = Path(tempfile.mkdtemp(prefix="gpu_smoke_"))
    for stage in args.stages:
        fn, cap = STAGES[stage]
        left = args.budget_s - (time.perf_counter() - t_start)
        timeout_s = min(cap, left) if cap else left
        report["stages"][stage] = {"status": "running", "timeout_s": timeout_s}
        write_json(report, out_dirs, name)
        try:
            row = fn(args, work, timeout_s)
        except Exception as err:  # noqa: BLE001 - the report carries it; the next stage runs
            row = {"ok": False, "error": f"{type(err).__name__}: {err}",
                   "traceback": traceback.format_exc()}
        row["status"] = "done" if row.get("ok") else "failed"
        report["stages"][stage] = {"timeout_s": timeout_s, **row}
        report["elapsed_s"] = time.perf_counter() - t_start
        write_json(report, out_dirs, name)
        print(f"gpu_smoke: stage {stage} {row['status']} ({report['elapsed_s']:.0f} s elapsed)"
              + (f": {row.get('error')}" if not row.get("ok") else ""), flush=True)
    report["ok"] = all(s.get("ok") for s in report["stages"].values())
    for d in out_dirs:  # the training log and the benchmark's own JSON beside the report
        for extra in [work / "train_log.txt", *sorted((work / "llm_mfu").glob("*.json"))]:
            if extra.is_file():
                shutil.copyfile(extra, d / extra.name)
    write_json(report, out_dirs, name)
    shutil.rmtree(work, ignore_errors=True)
    return report


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--prepare", action="store_true",
                   help="write the pre-packed batches and tokenizer here (needs energon) and exit")
    p.add_argument("--cpu", action="store_true",
                   help="gloo on CPU, llm_mfu --smoke (the CI proof of everything but CUDA)")
    p.add_argument("--dir", default=str(DEFAULT_DIR),
                   help=f"pre-packed batches + tokenizer (default {DEFAULT_DIR})")
    p.add_argument("--steps", type=int, default=STEPS, help=f"training steps (default {STEPS})")
    p.add_argument("--stages", default="train,llm_mfu",
                   help="comma-separated stages in order (default train,llm_mfu)")
    p.add_argument("--train-override", action="append", default=[], metavar="KEY=VALUE",
                   help="extra config override of stage 1 (repeatable), e.g. "
                        "model.kernels.attention_kernel=auto")
    p.add_argument("--ablations", action="store_true",
                   help="llm_mfu's two ablation rows too (~2 more variants)")
    p.add_argument("--budget-s", type=float, default=290.0,
                   help="wall-clock budget of all stages (default 290)")
    p.add_argument("--out-dir", default=None,
                   help=f"write here instead of {RESULTS_DIR} (and to $OUT when set)")
    args = p.parse_args(argv)
    args.stages = [s for s in args.stages.split(",") if s]
    unknown = [s for s in args.stages if s not in STAGES]
    if unknown:
        p.error(f"unknown stage(s) {unknown}; choose from {sorted(STAGES)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.prepare:
        prepare(Path(args.dir), args.steps)
        return 0
    if not args.cpu and gpu_name() is None:
        print("gpu_smoke: no CUDA device visible; use --cpu for the CPU form")
        return 2
    out_dirs = [Path(args.out_dir) if args.out_dir else RESULTS_DIR]
    if os.environ.get("OUT"):  # the lent machine's folder that comes back
        out_dirs.append(Path(os.environ["OUT"]))
    name = f"gpu_smoke_{device_tag()}{'_smoke' if args.cpu else ''}.json"
    report = run_stages(args, out_dirs, name)
    print(json.dumps({k: {kk: vv for kk, vv in v.items()
                          if kk in ("status", "error", "wall_s", "loss")}
                      for k, v in report["stages"].items()}, indent=2, default=str))
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
