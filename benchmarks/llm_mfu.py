"""LLM training MFU on one device: the K2-proxy (SPEC §8), ours vs ``stock+sdpa``, same run.

Both variants share one ``MLATransformerConfig`` (identical flags: bf16 params with fp32 main
params in megatron's optimizer, AdamW, dropless alltoall MoE, per-token loss) and the same token
stream: ``micro_batches`` packed sequences of ``seq_length`` per optimizer step (>= 64K tokens by
accumulation at GPU size). They differ only in the layer spec:

* ``ours``: ``models/specs.py`` on this machine (Transformer Engine when it imports; otherwise
  megatron's local modules with our packed attention kernel -- ``varlen`` flash on the lent H100
  -- SP-capable norms, duplicated MLA down-projections and the padding-free router). Documents
  attend within themselves (THD).
* ``stock+sdpa``: megatron-core's local spec with only ``core_attention`` swapped for a minimal
  padded SDPA wrapper (``harness.StockSDPAAttention``); each packed sequence is one causal
  sequence (no document masking), stock ``TopKRouter`` (padding tokens routed too), megatron's
  per-expert ``SequentialMLP``.

At GPU size two ablation rows switch one optimisation of ``ours`` off at a time (grouped expert
GEMMs -> ``SequentialMLP``; the attention kernel -> per-document SDPA), so ours/stock can be
attributed to named optimisations.

Reported per variant: step time, tokens/s, model TFLOP/s and MFU by Megatron-LM's
``num_floating_point_operations`` in its BSHD form (every token, ``seq_length^2`` causal
attention: the same count for both variants, so the MFU ratio is the tokens/s ratio) and, for
``ours``, also in Megatron-LM's THD form (real tokens, ``sum L_i^2``: the work a packed run
really needs), and peak memory. The GPU-sized run needs CUDA; ``--smoke`` runs a tiny model on
CPU (no MFU: CPUs have no peak here).
"""

from __future__ import annotations

import dataclasses
import traceback

from benchmarks import harness
from benchmarks.common import write_result

GPU = dict(seq_length=4096, micro_batches=16, warmup_steps=2, steps=5, params_dtype="bf16",
           doc_median=1024, ablations=True)
SMOKE = dict(seq_length=256, micro_batches=2, warmup_steps=1, steps=1, params_dtype="fp32",
             doc_median=96, ablations=False)


def run_variant(variant: str, llm, cfg: dict, batches, peak: float | None, kernels) -> dict:
    from megatron_vlm.config import OptimConfig
    from megatron_vlm.optim.builder import build_optimizer
    from megatron_vlm.training.flops import model_flops, packed_model_flops

    model, label = harness.build_llm_variant(variant, llm, cfg["params_dtype"], kernels)
    optimizer = build_optimizer(OptimConfig(lr=1e-4, min_lr=1e-5), [model],
                                cfg["params_dtype"], use_distributed_optimizer=False)
    forward_step = harness.stock_forward_step if variant == "stock+sdpa" else None

    def step():
        model.zero_grad_buffer()
        optimizer.zero_grad()
        harness.forward_backward(model, batches, cfg["seq_length"], forward_step)
        optimizer.step()

    harness.reset_peak_memory()
    seconds = harness.timed(step, cfg["warmup_steps"], cfg["steps"])
    mean = sum(seconds) / len(seconds)
    tokens = cfg["micro_batches"] * cfg["seq_length"]
    stats = harness.document_stats(batches)
    flops_bshd = model_flops(llm, tokens, cfg["seq_length"])
    row = {"layers": label, "step_seconds": seconds, "mean_step_seconds": mean,
           "tokens_per_s": tokens / mean, "tflops_per_s_bshd": flops_bshd / mean / 1e12,
           "peak_memory": harness.peak_memory_gib()}
    if variant == "ours":
        flops_thd = packed_model_flops(llm, stats["real_tokens"], stats["seqlen_squared_sum"])
        row["tflops_per_s_thd"] = flops_thd / mean / 1e12
    if peak:
        row["mfu_bshd"] = row["tflops_per_s_bshd"] / peak
        if "tflops_per_s_thd" in row:
            row["mfu_thd"] = row["tflops_per_s_thd"] / peak
    # Free this variant before the next: rebind (not del) the names the closure shares as cells.
    optimizer = model = None
    del step
    harness.release_memory()
    return row


def _options(p) -> None:
    p.add_argument("--no-ablations", action="store_true",
                   help="at GPU size, ours and stock+sdpa only (the GPU smoke's form)")


def main(argv: list[str] | None = None):
    from megatron_vlm.config import KernelConfig

    args = harness.parse_args(__doc__.splitlines()[0], argv, _options)
    if not harness.can_run("llm_mfu", args.smoke):
        return None
    cfg = SMOKE if args.smoke else GPU
    if args.no_ablations:
        cfg = {**cfg, "ablations": False}
    llm, batches = harness.text_llm_and_batches(cfg, args.smoke)
    peak, peak_source = harness.peak_tflops(cfg["params_dtype"], args.peak_tflops)
    kernels = KernelConfig(attention_kernel=args.attention_kernel)
    runs = [("ours", "ours", kernels), ("stock+sdpa", "stock+sdpa", kernels)]
    if cfg["ablations"]:
        # One optimisation off at a time, to attribute ours/stock to named optimisations.
        runs += [("ours[experts=sequential]", "ours",
                  dataclasses.replace(kernels, moe_grouped_gemm="off")),
                 ("ours[attention=sdpa_doc]", "ours",
                  dataclasses.replace(kernels, attention_kernel="sdpa_doc"))]
    results: dict = {"data": harness.document_stats(batches)}
    for name, variant, k in runs:
        try:
            results[name] = run_variant(variant, llm, cfg, batches, peak, k)
        except Exception as err:  # noqa: BLE001 - recorded (an OOM, say); the others still run
            results[name] = {"error": f"{type(err).__name__}: {err}",
                             "traceback": traceback.format_exc()}
            harness.release_memory()
        if name != runs[-1][0]:  # a run cut off later still leaves the finished variants
            write_result("llm_mfu", _config(cfg, args, llm, peak, peak_source),
                         {**results, "complete": False}, args.out_dir, args.smoke, NOTES)
    ok = [name for name, _, _ in runs if "error" not in results[name]]
    if "stock+sdpa" in ok:
        stock = results["stock+sdpa"]["tokens_per_s"]
        results["tokens_per_s_over_stock"] = {n: results[n]["tokens_per_s"] / stock for n in ok}
        if "ours" in ok:
            results["ours_over_stock_tokens_per_s"] = results["tokens_per_s_over_stock"]["ours"]
    results["complete"] = len(ok) == len(runs)
    return write_result("llm_mfu", _config(cfg, args, llm, peak, peak_source), results,
                        args.out_dir, args.smoke, NOTES)


NOTES = ("MFU by Megatron-LM num_floating_point_operations: _bshd counts every token and "
         "seq_length^2 causal attention (identical for both variants); _thd (ours) counts real "
         "tokens and sum L_i^2 over documents (Megatron-LM's THD path). Documents: log-normal "
         "lengths, random tokens, first-fit packed.")


def _config(cfg: dict, args, llm, peak, peak_source) -> dict:
    return {**cfg, "llm": harness.llm_label(args.smoke),
            "llm_config": llm.__dict__ | {"yarn": llm.yarn.__dict__},
            "tokens_per_step": cfg["micro_batches"] * cfg["seq_length"],
            "optimizer": "AdamW (megatron, fp32 main params for bf16)",
            "peak_tflops": peak, "peak_source": peak_source,
            "environment": harness.environment()}


if __name__ == "__main__":
    main()
