"""Convert checkpoints between Hugging Face safetensors and megatron_vlm (megatron dist) format.

    python tools/convert_hf.py import HF_DIR OUT_ROOT [--params-dtype fp32|bf16]
    python tools/convert_hf.py export CKPT OUT_DIR [--family kimi_k25|deepseek_v3]
                                       [--dtype bf16|fp32] [--max-shard-gb 5]
                                       [--int4-experts] [--tokenizer PATH]

``import`` writes ``OUT_ROOT/step_0000000/`` (model weights only: step 0, no optimizer or data
state) and ``OUT_ROOT/job.yaml`` (the model as a job config to edit; its ``model.token_ids`` come
from config.json, and ``data.tokenizer`` is HF_DIR when it ships a tokenizer that agrees).

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
    exp.add_argument("--family", choices=["kimi_k25", "deepseek_v3"], default=None,
                     help="default: kimi_k25 for a VLM, deepseek_v3 for a text-only model")
    exp.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    exp.add_argument("--max-shard-gb", type=float, default=5.0)
    exp.add_argument("--int4-experts", action="store_true",
                     help="routed experts as the K2.5 release ships them: compressed-tensors "
                          "INT4 pack-quantized, group 32 (bf16 only; needs megatron_vlm[int4])")
    exp.add_argument("--tokenizer", type=Path, default=None,
                     help="tokenizer to ship (directory or file); default: the run's "
                          "(data.tokenizer, or the tiny run's trained SentencePiece model)")
    sig = sub.add_parser("import-siglip", help="SiglipVisionModel -> MoonViT weights")
    sig.add_argument("hf_dir", type=Path)
    sig.add_argument("out", type=Path, help="safetensors file to create")
    for p in (imp, exp, sig):
        p.add_argument("--quiet", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("megatron_vlm").setLevel(logging.INFO)

    from megatron_vlm.convert import ConversionError, export_hf, import_hf

    try:
        if args.command == "import":
            result = import_hf(args.hf_dir, args.out, params_dtype=args.params_dtype,
                               progress=not args.quiet)
            print(f"imported {result.num_tensors} tensors ({result.family}) -> "
                  f"{result.checkpoint}; skipped: {result.skipped or 'none'}; data.tokenizer: "
                  f"{result.tokenizer or 'unset'}")
        elif args.command == "export":
            result = export_hf(args.checkpoint, args.out, family=args.family, dtype=args.dtype,
                               max_shard_bytes=int(args.max_shard_gb * 2**30),
                               progress=not args.quiet, int4_experts=args.int4_experts,
                               tokenizer=args.tokenizer)
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


if __name__ == "__main__":
    sys.exit(main())
