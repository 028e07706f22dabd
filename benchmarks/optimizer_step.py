"""Optimizer step as a fraction of forward+backward: Muon + QK-Clip vs AdamW (SPEC §8: <= 3% at
>= 2M tokens per step, with the analytic ratio beside it).

For each optimizer, on the same model (K2-proxy bf16 at GPU size; the tiny LLM on CPU):

1. forward+backward of ``micro_batches`` packed sequences (QK-Clip on: the attention records
   per-head max logits, which costs forward time and is counted there);
2. ``optimizer.step()`` (megatron's optimizer: fp32 main params for bf16; Muon = our
   ``torch.optim.Muon``-based step with per-HF-matrix Newton-Schulz, AdamW for the rest);
3. QK-Clip (``apply_qk_clip``) after the Muon step.

Forward+backward scales with tokens, the optimizer step does not, so the fraction at a step of
``T`` tokens is ``(optimizer + clip seconds) / (fwd_bwd seconds per token * T)``, reported at the
measured token count and at ``T = 2^21`` (2,097,152: 512 sequences of 4096 by accumulation).
The analytic ratio divides the Newton-Schulz FLOPs (per HF matrix m x n, m <= n, 5 iterations of
``X X^T``, ``A A``, ``B X``: ``5 (4 m^2 n + 2 m^3)``; SPEC's ``~20 m^2 n``) by the model's
training FLOPs for ``T`` tokens (Megatron-LM formula). ``--smoke`` runs on CPU.
"""

from __future__ import annotations

from benchmarks import harness

TOKENS_TARGET = 2**21
GPU = dict(seq_length=4096, micro_batches=4, warmup=1, iters=3, params_dtype="bf16",
           doc_median=1024)
SMOKE = dict(seq_length=256, micro_batches=2, warmup=1, iters=3, params_dtype="fp32",
             doc_median=96)


def newton_schulz_flops(model, steps: int = 5) -> tuple[int, int, int]:
    """(exact NS FLOPs, SPEC's 20 m^2 n approximation, number of matrices) of one Muon step."""
    from megatron_vlm.optim.param_groups import (
        named_parameters_with_config,
        orthogonal_blocks,
        uses_muon,
    )

    exact = approx = count = 0
    for name, param, config in named_parameters_with_config(model):
        if not param.requires_grad or not uses_muon(name, param):
            continue
        for block in orthogonal_blocks(name, param.detach(), config):
            rows, cols = block.shape[-2], block.shape[-1]
            groups = block.numel() // (rows * cols)
            m, n = min(rows, cols), max(rows, cols)
            exact += groups * steps * (4 * m * m * n + 2 * m**3)
            approx += groups * 20 * m * m * n
            count += groups
    return exact, approx, count


def run_optimizer(kind: str, llm, cfg: dict, batches) -> dict:
    import dataclasses

    import torch
    from megatron.core.models.gpt import GPTModel

    from megatron_vlm.config import OptimConfig, ParallelConfig
    from megatron_vlm.models.llm import build_llm
    from megatron_vlm.optim.builder import build_optimizer
    from megatron_vlm.optim.qk_clip import apply_qk_clip
    from megatron_vlm.training.flops import model_flops

    muon = kind == "muon+qk_clip"
    llm = dataclasses.replace(llm, qk_clip=muon)
    torch.manual_seed(0)
    inner: GPTModel = build_llm(llm, ParallelConfig(), cfg["params_dtype"])
    if torch.cuda.is_available():
        inner.cuda(torch.cuda.current_device())
    model = harness.wrap_ddp(inner)
    optim = OptimConfig(optimizer="muon" if muon else "adamw", lr=1e-4, min_lr=1e-5)
    optimizer = build_optimizer(optim, [model], cfg["params_dtype"],
                                use_distributed_optimizer=False)

    def fwd_bwd():
        model.zero_grad_buffer()
        optimizer.zero_grad()
        harness.forward_backward(model, batches, cfg["seq_length"])

    def step():
        optimizer.step()
        if muon:
            apply_qk_clip([model], threshold=100.0)

    def fwd_bwd_then_step():
        fwd_bwd()
        step()

    harness.reset_peak_memory()
    for _ in range(cfg["warmup"]):
        fwd_bwd_then_step()
    fb, st = [], []
    for _ in range(cfg["iters"]):
        fb += harness.timed(fwd_bwd, 0, 1)
        st += harness.timed(step, 0, 1)
    tokens = cfg["micro_batches"] * cfg["seq_length"]
    fb_s, st_s = min(fb), min(st)
    per_token = fb_s / tokens
    ns_exact, ns_approx, num_mats = newton_schulz_flops(inner) if muon else (0, 0, 0)
    row = {"fwd_bwd_seconds": fb, "step_seconds": st, "fwd_bwd_seconds_best": fb_s,
           "step_seconds_best": st_s, "tokens_measured": tokens,
           "fraction_at_measured_tokens": st_s / fb_s,
           "fraction_at_target_tokens": st_s / (per_token * TOKENS_TARGET),
           "peak_memory": harness.peak_memory_gib()}
    if muon:
        train = model_flops(llm, TOKENS_TARGET, cfg["seq_length"])
        row.update(newton_schulz_matrices=num_mats, newton_schulz_flops=ns_exact,
                   analytic_fraction_at_target_tokens=ns_exact / train,
                   analytic_fraction_spec_20m2n=ns_approx / train,
                   analytic_fraction_at_measured_tokens=ns_exact / model_flops(
                       llm, tokens, cfg["seq_length"]))
    # Free this variant before the next: rebind (not del) the names the closures share as cells.
    optimizer = model = None
    del inner
    harness.release_memory()
    return row


def main(argv: list[str] | None = None):
    args = harness.parse_args(__doc__.splitlines()[0], argv)
    if not harness.can_run("optimizer_step", args.smoke):
        return None
    cfg = SMOKE if args.smoke else GPU
    llm, batches = harness.text_llm_and_batches(cfg, args.smoke)
    results = {kind: run_optimizer(kind, llm, cfg, batches)
               for kind in ("adamw", "muon+qk_clip")}
    config = {**cfg, "llm": harness.llm_label(args.smoke),
              "target_tokens_per_step": TOKENS_TARGET, "newton_schulz_steps": 5,
              "muon_ns_dtype": "bf16", "environment": harness.environment()}
    notes = ("Fractions at the target token count extrapolate the measured forward+backward "
             "time per token linearly (the optimizer step does not depend on tokens). Times are "
             "the best of iters.")
    from benchmarks.common import write_result

    return write_result("optimizer_step", config, results, args.out_dir, args.smoke, notes)


if __name__ == "__main__":
    main()
