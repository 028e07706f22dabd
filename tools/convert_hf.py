"""Convert checkpoints between Hugging Face safetensors and megatron_vlm (megatron dist) format.

    python tools/convert_hf.py import HF_DIR OUT_ROOT [--params-dtype fp32|bf16] [--workers N]
    python tools/convert_hf.py export CKPT OUT_DIR
                                       [--family kimi_k25|deepseek_v3|keye_vl_1_5|glm4v|internvl]
                                       [--dtype bf16|fp32] [--max-shard-gb 5]
                                       [--int4-experts] [--tokenizer PATH]

``import`` writes ``OUT_ROOT/step_0000000/`` (model weights only: step 0, no optimizer or data
state) and ``OUT_ROOT/job.yaml`` (the model as a job config to edit; its ``model.token_ids`` come
from config.json, and ``data.tokenizer`` is HF_DIR when it ships a tokenizer that agrees).

Both take ``--workers N`` (N local processes, each converting a disjoint, byte-balanced slice of
the tensors -- whole layers and experts -- into files of its own; the tensors and the HF shard
bytes do not depend on N) and ``--threads T`` (writer threads per process). On many hosts:
``--slice I/N`` writes one slice (any host, any order; a finished slice is skipped) and
``--finish N`` joins them; ``--slurm-array N`` renders and submits that as a SLURM array plus a
finishing job that runs after all tasks succeeded (``--dry-run`` prints the scripts).

``export`` takes a step directory or a checkpoint root (newest complete checkpoint) and writes a
directory transformers loads and uses offline: release-named shards,
``model.safetensors.index.json``, ``config.json`` with the special-token ids the model was trained
with (``model.token_ids``), the run's tokenizer (``data.tokenizer``, or ``--tokenizer PATH``;
Kimi's tiktoken tokenizer also as a ``tokenizer.json`` that needs no remote code) and
``chat_template.jinja``, the image/video processor configs with the run's sizing (K2.5) and
``generation_config.json``; files 0644 (less the umask). With ``--int4-experts`` the routed
experts are written as the K2.5 release ships them (compressed-tensors INT4 pack-quantized,
group 32, plus its ``quantization_config``), the rest bf16. Both stream tensor by tensor and
leave nothing behind on error.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from megatron_vlm.convert.slurm_array import add_slurm_args, slurm_array  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import", help="HF safetensors -> our checkpoint")
    imp.add_argument("hf_dir", type=Path)
    imp.add_argument("out", type=Path, help="checkpoint root to create")
    imp.add_argument("--params-dtype", choices=["fp32", "bf16"], default="fp32")
    exp = sub.add_parser("export", help="our checkpoint -> HF safetensors")
    exp.add_argument("checkpoint", type=Path, help="step directory or checkpoint root")
    exp.add_argument("out", type=Path, help="directory to create")
    exp.add_argument("--family", default=None,
                     help="HF layout to write: kimi_k25, deepseek_v3, keye_vl_1_5, glm4v or "
                          "internvl; "
                          "default: the checkpoint's model.family's (Kimi: kimi_k25 for a VLM, "
                          "deepseek_v3 for a text-only model)")
    exp.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    exp.add_argument("--max-shard-gb", type=float, default=5.0)
    exp.add_argument("--int4-experts", action="store_true",
                     help="routed experts as the K2.5 release ships them: compressed-tensors "
                          "INT4 pack-quantized, group 32 (bf16 only; needs megatron_vlm[int4])")
    exp.add_argument("--tokenizer", type=Path, default=None,
                     help="tokenizer to ship (directory or file); default: the run's "
                          "(data.tokenizer, or the tiny run's trained SentencePiece model)")
    for p in (imp, exp):
        p.add_argument("--workers", type=int, default=1,
                       help="local processes, each converting a disjoint slice of the tensors "
                            "(whole layers/experts) into files of its own; the result does not "
                            "depend on it")
        p.add_argument("--threads", type=int, default=2, help="writer threads per process")
        p.add_argument("--slice", default=None, metavar="I/N",
                       help="only write slice I of N (a SLURM array task; any host, any order; "
                            "a finished slice is skipped); then run once with --finish N")
        p.add_argument("--finish", type=int, default=None, metavar="N",
                       help="join the N finished slices into the checkpoint / HF directory")
        p.add_argument("--slurm-array", type=int, default=None, metavar="N",
                       help="write (and submit, unless --dry-run) a SLURM array of N --slice "
                            "tasks and a --finish job that runs after all of them succeeded")
        add_slurm_args(p)
    sig = sub.add_parser("import-siglip", help="SiglipVisionModel -> MoonViT weights")
    sig.add_argument("hf_dir", type=Path)
    sig.add_argument("out", type=Path, help="safetensors file to create")
    for p in (imp, exp, sig):
        p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("megatron_vlm").setLevel(logging.INFO)

    if args.command in ("import", "export"):
        if sum(x is not None for x in (args.slice, args.finish, args.slurm_array)) > 1:
            parser.error("choose one of --slice, --finish and --slurm-array")
        if args.slurm_array is not None:
            return slurm_array(args, argv if argv is not None else sys.argv[1:])
        if args.slice is not None or args.finish is not None:
            return sliced(args)

    from megatron_vlm.convert import ConversionError, export_hf, import_hf

    try:
        if args.command == "import":
            result = import_hf(args.hf_dir, args.out, params_dtype=args.params_dtype,
                               progress=not args.quiet, workers=args.workers,
                               threads=args.threads)
            print(f"imported {result.num_tensors} tensors ({result.family}) -> "
                  f"{result.checkpoint}; skipped: {result.skipped or 'none'}; data.tokenizer: "
                  f"{result.tokenizer or 'unset'}")
        elif args.command == "export":
            result = export_hf(args.checkpoint, args.out, family=args.family, dtype=args.dtype,
                               max_shard_bytes=int(args.max_shard_gb * 2**30),
                               progress=not args.quiet, int4_experts=args.int4_experts,
                               tokenizer=args.tokenizer, workers=args.workers,
                               threads=args.threads)
            int4 = f", {result.num_int4} INT4" if args.int4_experts else ""
            print(f"exported {result.num_tensors} tensors{int4} ({result.total_bytes / 1e9:.3f} "
                  f"GB, {result.family}) -> {result.out}; tokenizer: {result.tokenizer}; "
                  f"token ids: {result.token_ids}")
        else:
            from megatron_vlm.convert.siglip import import_siglip

            result = import_siglip(args.hf_dir, args.out)
            print(f"imported SigLIP -> {result}")
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def sliced(args) -> int:
    """``--slice I/N`` (write one slice) or ``--finish N`` (join them)."""
    from megatron_vlm.convert import ConversionError
    from megatron_vlm.convert.exporter import export_slice, finish_export
    from megatron_vlm.convert.importer import finish_import, import_slice
    from megatron_vlm.convert.slices import parse_slice

    try:
        if args.slice is not None:
            try:
                index, count = parse_slice(args.slice)
            except ValueError as e:
                raise ConversionError(str(e)) from None
            if args.command == "import":
                import_slice(args.hf_dir, args.out, index, count, params_dtype=args.params_dtype,
                             threads=args.threads, progress=not args.quiet)
            else:
                export_slice(args.checkpoint, args.out, index, count, family=args.family,
                             dtype=args.dtype, max_shard_bytes=int(args.max_shard_gb * 2**30),
                             int4_experts=args.int4_experts, threads=args.threads,
                             progress=not args.quiet)
            print(f"slice {index}/{count} of {args.out} written")
        elif args.command == "import":
            result = finish_import(args.hf_dir, args.out, args.finish,
                                   params_dtype=args.params_dtype)
            print(f"imported {result.num_tensors} tensors ({result.family}) -> "
                  f"{result.checkpoint} from {args.finish} slices")
        else:
            result = finish_export(args.checkpoint, args.out, args.finish, family=args.family,
                                   dtype=args.dtype,
                                   max_shard_bytes=int(args.max_shard_gb * 2**30),
                                   int4_experts=args.int4_experts, tokenizer=args.tokenizer)
            print(f"exported {result.num_tensors} tensors ({result.total_bytes / 1e9:.3f} GB) "
                  f"-> {result.out} from {args.finish} slices")
    except ConversionError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
