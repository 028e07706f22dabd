"""Raw multimodal records -> verified energon WebDataset shards (one dataset per call).

Input formats are those ``megatron_vlm/data/sources.py`` reads (the project's JSONL records,
plain text, and the ecosystem's formats read in place); record shapes are described in
``megatron_vlm/data/records.py``. Examples::

    # one dataset: train + val inputs, media paths relative to --media-root
    python tools/prepare_data.py --name llava --train llava.jsonl --val llava_val.jsonl \\
        --media-root /data/images --out /data/prepared/llava
    # plain text, one document per line
    python tools/prepare_data.py --name web --train web.txt --out /data/prepared/web
    # scaled out: slice i of N (any machine, any order), then one merge
    python tools/prepare_data.py --name llava --train llava.jsonl --out /data/prepared/llava \\
        --shard 3/16
    python tools/prepare_data.py --merge /data/prepared/llava
    # the same as a SLURM array of 16 tasks plus a merge job that waits for them
    python tools/prepare_data.py --name llava --train llava.jsonl --out /data/prepared/llava \\
        --slurm-array 16 --cpus-per-task 16 --venv /shared/venv --partition cpu [--dry-run]
    # the bundled synthetic corpus (what the default config trains on)
    python tools/prepare_data.py --bundled [--cache-dir DIR]
    # re-check a prepared dataset (sizes; --deep re-reads and hashes every shard, in parallel)
    python tools/prepare_data.py --verify /data/prepared/llava --deep
    # how a recipe's budgets treat the videos (fitted by resolution/fps, or still dropped)
    python tools/prepare_data.py --verify /data/prepared/webvid --recipe kimi_k25 \
        --tokenizer /models/Kimi-K2.5
    # img2dataset output trained in place: only energon's index files are added to the folder
    python tools/prepare_data.py --index-in-place /data/laion-img2dataset

Every shard is re-read after writing; a shard that does not read back as written stops the tool
with exit code 2. Rejected records are counted per reason in the summary and listed one per line
in ``<out>/rejects.jsonl``. See docs/data_at_scale.md for Ray Data / Dask and a 1B-pair plan.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from megatron_vlm.data.shards import ShardVerificationError, verify_shards


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--name", help="dataset name (mixes and metrics use it)")
    mode.add_argument("--merge", metavar="OUT", help="join the slices prepared into OUT")
    mode.add_argument("--bundled", action="store_true", help="generate the bundled corpus")
    mode.add_argument("--verify", metavar="DIR", help="check a prepared dataset's shards")
    mode.add_argument("--index-in-place", metavar="DIR",
                      help="index img2dataset tars where they lie (energon index files only)")
    p.add_argument("--recipe", help="after preparing/merging/verifying: report how this "
                   "recipe's budgets treat the videos (fitted or dropped)")
    p.add_argument("--tokenizer", help="--recipe: tokenizer path (default: the recipe's "
                   "data.tokenizer, else bytes: an upper bound on drops)")
    p.add_argument("--train", nargs="+", default=[], help="train inputs")
    p.add_argument("--val", nargs="+", default=[], help="held-out inputs")
    p.add_argument("--out", help="dataset directory to create")
    p.add_argument("--media-root", help="base of relative media paths (default: input's dir)")
    p.add_argument("--modality", choices=["image", "video", "interleaved", "text"],
                   help="modality label (default: inferred from per-sample counts)")
    p.add_argument("--samples-per-shard", type=int, default=1000)
    p.add_argument("--check-media", choices=["structure", "full", "none"], default="structure",
                   help="reject broken media: structure (default: headers, JPEG markers to the "
                        "EOI, PNG CRCs, MP4 sample tables; no pixel decode), full "
                        "(decode as training does), none (training skips what fails)")
    p.add_argument("--no-check-media", action="store_true", help="the same as --check-media none")
    p.add_argument("--shard", metavar="I/N",
                   help="prepare only slice I of N (0-based); then --merge OUT once")
    p.add_argument("--slice-by", choices=["auto", "block", "file"], default="auto",
                   help="--shard units: blocks of --samples-per-shard records (every slice scans "
                        "every record) or whole input files (a slice opens only its own: for "
                        "many tar/parquet inputs); auto (default): files when a split has >= 16 "
                        "input files (a folder of shards counts its tars), else blocks")
    p.add_argument("--workers", type=int,
                   help="processes (default: the CPUs this process is given)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--cache-dir", help="--bundled: where to build it")
    p.add_argument("--deep", action="store_true", help="--verify/--merge: re-read every shard")
    slurm = p.add_argument_group("SLURM (--slurm-array N: N tasks --shard i/N, then a merge)")
    slurm.add_argument("--slurm-array", type=int, metavar="N", help="submit N slices + merge")
    slurm.add_argument("--cpus-per-task", type=int, default=16)
    slurm.add_argument("--mem", help="memory per task, e.g. 32G (default: the partition's)")
    slurm.add_argument("--time", default="04:00:00", help="per task, [D-]HH:MM:SS")
    slurm.add_argument("--partition")
    slurm.add_argument("--account")
    slurm.add_argument("--qos")
    slurm.add_argument("--array-parallel", type=int, help="at most this many tasks at once")
    env = slurm.add_mutually_exclusive_group()
    env.add_argument("--container-image", help="pyxis/enroot image (srun --container-image)")
    env.add_argument("--venv", help="virtual environment to activate on the nodes")
    env.add_argument("--system-python", action="store_true", help="the nodes' own python")
    slurm.add_argument("--container-mounts", nargs="+", default=[], metavar="SRC:DST")
    slurm.add_argument("--log-dir", help="SLURM output files (default <out>/.slurm)")
    slurm.add_argument("--dry-run", action="store_true", help="print the scripts, submit nothing")
    return p


def _parse_shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise ValueError(f"--shard {text!r}: use I/N, e.g. --shard 0/8") from None
    if not (n >= 1 and 0 <= i < n):
        raise ValueError(f"--shard {text}: need 0 <= I < N")
    return i, n


def _check_media(args: argparse.Namespace) -> str:
    return "none" if args.no_check_media else args.check_media


def _prepare_args(args: argparse.Namespace) -> list[str]:
    """This command line's preparation arguments, for the SLURM tasks."""
    out = ["--name", args.name, "--out", args.out, "--train", *args.train]
    if args.val:
        out += ["--val", *args.val]
    if args.media_root:
        out += ["--media-root", args.media_root]
    if args.modality:
        out += ["--modality", args.modality]
    out += ["--samples-per-shard", str(args.samples_per_shard)]
    if _check_media(args) != "structure":
        out += ["--check-media", _check_media(args)]
    if args.slice_by != "auto":
        out += ["--slice-by", args.slice_by]
    if args.overwrite:
        out.append("--overwrite")
    return out


def _slurm(args: argparse.Namespace) -> int:
    from megatron_vlm.cluster.prepare_array import (
        PrepareArrayJob,
        launch_prepare_array,
        slice_task_args,
    )

    name, out, task_args = slice_task_args(_prepare_args(args))
    job = PrepareArrayJob(
        name=name, prepare_args=task_args, out_dir=out,
        num_tasks=args.slurm_array, array_parallel=args.array_parallel,
        cpus_per_task=args.cpus_per_task, mem=args.mem, time=args.time,
        partition=args.partition, account=args.account, qos=args.qos,
        container_image=args.container_image, container_mounts=args.container_mounts,
        venv=str(Path(args.venv).absolute()) if args.venv else None,
        system_python=args.system_python, workdir=str(Path.cwd()),
        log_dir=str(Path(args.log_dir).absolute()) if args.log_dir else None)
    print(launch_prepare_array(job, args.dry_run), end="")
    return 0


def _video_report(dataset_dir: str, recipe: str, tokenizer: str | None) -> None:
    from megatron_vlm.data.video_fit import drop_report

    r = drop_report(dataset_dir, recipe, tokenizer=tokenizer)
    reasons = ", ".join(f"{k} {v}" for k, v in sorted(r["by_reason"].items())) or "none"
    print(f"{recipe}: {r['videos']} video samples: {r['unchanged']} unchanged, "
          f"{r['fitted_resolution']} fitted by resolution, {r['fitted_fps']} by fps, "
          f"{r['dropped']} still dropped ({100 * r['dropped_fraction']:.1f}%: {reasons}); "
          f"{r['repaired_timestamps']} with repaired timestamps")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.recipe and (args.shard or args.slurm_array is not None or args.bundled
                            or args.index_in_place):
            raise ValueError("--recipe reports on a whole dataset: use it when preparing in one "
                             "process, with --merge, or with --verify")
        if args.index_in_place:
            from megatron_vlm.data.foreign import index_in_place

            manifest = index_in_place(args.index_in_place)
            counts = {s: v["samples"] for s, v in manifest["splits"].items()}
            print(f"{args.index_in_place}: indexed in place ({counts}); train on it with "
                  f"data.multimodal.datasets={{NAME: {Path(args.index_in_place).absolute()}}}")
            return 0
        if args.verify:
            manifest = verify_shards(args.verify, deep=args.deep, workers=args.workers)
            counts = {s: v["samples"] for s, v in manifest["splits"].items()}
            print(f"{args.verify}: OK ({manifest['name']}, {counts})")
        elif args.bundled:
            from megatron_vlm.data.mm_corpus import bundled_mm_corpus

            print(bundled_mm_corpus(args.cache_dir))
        elif args.merge:
            from megatron_vlm.data.prepare import merge_slices

            merge_slices(args.merge, workers=args.workers, deep=args.deep)
        else:
            if not args.out or not args.train:
                raise ValueError("--name needs --out and at least one --train input")
            if args.slurm_array is not None:
                return _slurm(args)
            _prepare(args)
        if args.recipe:
            _video_report(args.verify or args.merge or args.out, args.recipe, args.tokenizer)
    except ShardVerificationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def _prepare(args: argparse.Namespace) -> None:
    from megatron_vlm.data.prepare import prepare_dataset, prepare_slice

    kwargs = {"name": args.name, "modality": args.modality, "media_root": args.media_root,
              "samples_per_shard": args.samples_per_shard,
              "check_media": _check_media(args), "overwrite": args.overwrite,
              "progress": not args.no_progress, "workers": args.workers,
              "slice_by": args.slice_by}
    inputs = {"train": args.train, "val": args.val}
    if args.shard is None:
        prepare_dataset(inputs, args.out, **kwargs)
        return
    i, n = _parse_shard(args.shard)
    part = prepare_slice(inputs, args.out, shard=(i, n), **kwargs)
    samples = sum(s["samples"] for s in part["shards"])
    print(f"{args.name} slice {i}/{n}: {samples} samples in {len(part['shards'])} shards "
          f"({part['seconds']:.1f} s); merge with: tools/prepare_data.py --merge {args.out}")


if __name__ == "__main__":
    sys.exit(main())
