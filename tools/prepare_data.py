"""Raw multimodal records -> verified energon WebDataset shards (one dataset per call).

Input formats (JSONL records referencing image/video files, LLaVA conversations, interleaved
documents, plain text) are described in ``megatron_vlm/data/shards.py``. Examples::

    # one dataset: train + val inputs, media paths relative to --media-root
    python tools/prepare_data.py --name llava --train llava.jsonl --val llava_val.jsonl \\
        --media-root /data/images --out /data/prepared/llava
    # plain text, one document per line
    python tools/prepare_data.py --name web --train web.txt --out /data/prepared/web
    # the bundled synthetic corpus (what the default config trains on)
    python tools/prepare_data.py --bundled [--cache-dir DIR]
    # re-check a prepared dataset (sizes; --deep re-reads and hashes every shard)
    python tools/prepare_data.py --verify /data/prepared/llava --deep

Every shard is re-read after writing; a shard that does not read back as written stops the tool
with exit code 2. Rejected records are counted per reason in the summary.
"""

from __future__ import annotations

import argparse
import sys

from megatron_vlm.data.mm_corpus import bundled_mm_corpus
from megatron_vlm.data.shards import ShardVerificationError, prepare_dataset, verify_shards


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--name", help="dataset name (mixes and metrics use it)")
    mode.add_argument("--bundled", action="store_true", help="generate the bundled corpus")
    mode.add_argument("--verify", metavar="DIR", help="check a prepared dataset's shards")
    p.add_argument("--train", nargs="+", default=[], help="train inputs (.jsonl / .txt)")
    p.add_argument("--val", nargs="+", default=[], help="held-out inputs (.jsonl / .txt)")
    p.add_argument("--out", help="dataset directory to create")
    p.add_argument("--media-root", help="base of relative media paths (default: input's dir)")
    p.add_argument("--modality", choices=["image", "video", "interleaved", "text"],
                   help="modality label (default: inferred)")
    p.add_argument("--samples-per-shard", type=int, default=1000)
    p.add_argument("--no-check-media", action="store_true",
                   help="do not decode media while preparing (faster, bad files pass)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--cache-dir", help="--bundled: where to build it")
    p.add_argument("--deep", action="store_true", help="--verify: re-read and hash every shard")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.verify:
            manifest = verify_shards(args.verify, deep=args.deep)
            counts = {s: v["samples"] for s, v in manifest["splits"].items()}
            print(f"{args.verify}: OK ({manifest['name']}, {counts})")
        elif args.bundled:
            print(bundled_mm_corpus(args.cache_dir))
        else:
            if not args.out or not args.train:
                raise ValueError("--name needs --out and at least one --train input")
            prepare_dataset(
                {"train": args.train, "val": args.val},
                args.out,
                name=args.name,
                modality=args.modality,
                media_root=args.media_root,
                samples_per_shard=args.samples_per_shard,
                check_media=not args.no_check_media,
                overwrite=args.overwrite,
                progress=not args.no_progress,
            )
    except ShardVerificationError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
