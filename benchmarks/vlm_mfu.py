"""VLM training MFU: the K2-proxy LLM with MoonViT on packed image + video micro-batches from the
real multimodal loader, beside the text-only LLM on the same token stream (SPEC §8: VLM MFU
counting ViT FLOPs >= 0.9x the text-only MFU, data mix stated).

Batches: ``MultimodalLoader`` (energon, the bundled synthetic multimodal corpus, stage ``joint``
mix) at ``S`` LLM tokens and ``P`` ViT patches per micro-batch. The lent GPU machine has no
energon/decord/PyAV, so ``--dump-batches FILE`` runs the loader here (CPU) and writes the packed
micro-batches to a compressed ``.npz`` (pixels as the exact uint8 they were normalised from;
``np.load(allow_pickle=False)``), and the GPU run reads them with ``--batches FILE``; without
``--batches`` the loader runs in-process.

Model: ``KimiVLM`` = MoonViT (real size at GPU size) -> Kimi projector -> K2-proxy, one kernel
choice for both (``models/specs.py``), AdamW with fp32 main params, per-token loss. FLOPs: the
LLM by Megatron-LM's formula (BSHD form, as ``llm_mfu``), the tower + projector by
Megatron-Bridge's ``vit_flops_from_patch_stats`` on each micro-batch's ``grid_thw``. The
text-only row runs the same micro-batches without media (placeholders are plain tokens).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import numpy as np

from benchmarks import harness
from benchmarks.common import write_result

GPU = dict(seq_length=4096, max_patches=16384, micro_batches=16, warmup_steps=1, steps=3,
           params_dtype="bf16", vit_recompute="none")
SMOKE = dict(seq_length=512, max_patches=2048, micro_batches=2, warmup_steps=1, steps=1,
             params_dtype="fp32", vit_recompute="none")
DEFAULT_BATCHES = Path(__file__).resolve().parent / "data" / "vlm_batches_s4096_p16384.npz"


# --------------------------------------------------------------------------- batches


def loader_batches(seq_length: int, max_patches: int, num: int, run_dir: Path) -> list:
    """``num`` micro-batches from the real multimodal loader (tiny_vlm_cpu's data at the given
    budgets, one DP rank, no workers)."""
    from megatron_vlm.config import apply_overrides
    from megatron_vlm.recipes import get_recipe
    from megatron_vlm.training.data_setup import build_data

    job = apply_overrides(get_recipe("tiny_vlm_cpu"), [
        f"data.seq_length={seq_length}", f"data.global_batch_size={num}",
        f"data.multimodal.max_patches_per_micro_batch={max_patches}",
        "data.multimodal.num_workers=0", f"model.llm.max_position_embeddings={seq_length}",
    ])
    data = build_data(job, dp_rank=0, dp_size=1, run_dir=run_dir)
    try:
        batches = data.loader.next_global_batch()
    finally:
        data.close()
    return batches[:num]


def save_batches(batches, path: Path) -> Path:
    """Packed micro-batches -> ``.npz``; pixels stored as uint8 and checked to round-trip."""
    import torch

    from megatron_vlm.data.image import normalize

    arrays = {"num": np.array(len(batches))}
    for i, b in enumerate(batches):
        for f in dataclasses.fields(b):
            value = getattr(b, f.name)
            if f.name == "vision" or value is None:  # optional fields (mrope_position_ids)
                continue
            arrays[f"{i}.{f.name}"] = np.asarray(value.numpy() if torch.is_tensor(value) else value)
        if b.vision is None:
            continue
        for f in dataclasses.fields(b.vision):
            value = getattr(b.vision, f.name)
            if value is None:
                continue
            if f.name == "pixel_values":
                raw = torch.round(value * 127.5 + 127.5).clamp(0, 255).to(torch.uint8)
                if not torch.equal(normalize(raw), value):
                    raise ValueError("pixel_values are not normalised uint8; cannot store exactly")
                value = raw
            arrays[f"{i}.vision.{f.name}"] = value.numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(path, **arrays)
    return path


def load_batches(path: Path) -> list:
    import torch

    from megatron_vlm.data.contract import PackedBatch, VisionInputs
    from megatron_vlm.data.image import normalize

    with np.load(path, allow_pickle=False) as z:
        data = {k: z[k] for k in z.files}
    out = []
    for i in range(int(data["num"])):
        kw = {f.name: data[f"{i}.{f.name}"] for f in dataclasses.fields(PackedBatch)
              if f"{i}.{f.name}" in data}
        kw = {k: (int(v) if v.ndim == 0 else torch.from_numpy(v)) for k, v in kw.items()}
        vis = {f.name: torch.from_numpy(data[f"{i}.vision.{f.name}"])
               for f in dataclasses.fields(VisionInputs) if f"{i}.vision.{f.name}" in data}
        if vis:
            vis["pixel_values"] = normalize(vis["pixel_values"])
            kw["vision"] = VisionInputs(**vis)
        out.append(PackedBatch(**kw))
    return out


def mix_stats(batches) -> dict:
    """The realised data mix of ``batches``."""
    real = sum(int(b.cu_seqlens[-1]) for b in batches)
    images = videos = img_tok = vid_tok = patches = 0
    for b in batches:
        if b.vision is None:
            continue
        tok = b.vision.num_llm_tokens
        vid = b.vision.is_video.bool()
        images, videos = images + int((~vid).sum()), videos + int(vid.sum())
        img_tok, vid_tok = img_tok + int(tok[~vid].sum()), vid_tok + int(tok[vid].sum())
        patches += int(b.vision.grid_thw.prod(dim=1).sum())
    return {"micro_batches": len(batches), "real_tokens": real,
            "vision_token_fraction": (img_tok + vid_tok) / max(real, 1),
            "image_tokens": img_tok, "video_tokens": vid_tok, "images": images,
            "video_chunks": videos, "image_to_video_items": images / max(videos, 1),
            "patches": patches, "patches_per_micro_batch": patches / max(len(batches), 1)}


# --------------------------------------------------------------------------- runs


def build_vlm(llm, vision, params_dtype: str, kernels):
    import torch

    from megatron_vlm.config import ModelConfig, ParallelConfig
    from megatron_vlm.config.vision import kimi_projector_config
    from megatron_vlm.models.vlm import KimiVLM

    projector = dataclasses.replace(kimi_projector_config(llm.hidden_size),
                                    vision_hidden_size=vision.hidden_size)
    torch.manual_seed(0)
    model = KimiVLM(ModelConfig(llm=llm, vision=vision, projector=projector,
                                params_dtype=params_dtype, kernels=kernels), ParallelConfig())
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    return harness.wrap_ddp(model)


def timed_training(model, batches, cfg) -> list[float]:
    from megatron_vlm.config import OptimConfig
    from megatron_vlm.optim.builder import build_optimizer

    optimizer = build_optimizer(OptimConfig(lr=1e-4, min_lr=1e-5), [model], cfg["params_dtype"],
                                use_distributed_optimizer=False)

    def step():
        model.zero_grad_buffer()
        optimizer.zero_grad()
        harness.forward_backward(model, batches, cfg["seq_length"])
        optimizer.step()

    harness.reset_peak_memory()
    return harness.timed(step, cfg["warmup_steps"], cfg["steps"])


def run_rows(llm, vision, batches, cfg, kernels, peak) -> dict:
    import gc

    import torch

    from megatron_vlm.training.flops import model_flops, vit_flops

    tokens = len(batches) * cfg["seq_length"]
    llm_flops = model_flops(llm, tokens, cfg["seq_length"])
    vit = sum(vit_flops(vision, llm.hidden_size, b.vision.grid_thw.tolist())
              for b in batches if b.vision is not None)
    rows = {}
    for name in ("text_only", "vlm"):
        if name == "text_only":
            model, _ = harness.build_llm_variant("ours", llm, cfg["params_dtype"], kernels)
            data = [dataclasses.replace(b, vision=None) for b in batches]
            flops = llm_flops
        else:
            model, data, flops = build_vlm(llm, vision, cfg["params_dtype"], kernels), batches, \
                llm_flops + vit
        try:
            seconds = timed_training(model, data, cfg)
        except torch.cuda.OutOfMemoryError:
            if name != "vlm" or vision.recompute == "full":
                raise
            # One retry with the tower's activations recomputed (model.vision.recompute=full):
            # model FLOPs are unchanged, the recompute costs time; recorded in the row.
            del model
            gc.collect()
            torch.cuda.empty_cache()
            vision = dataclasses.replace(vision, recompute="full")
            model = build_vlm(llm, vision, cfg["params_dtype"], kernels)
            seconds = timed_training(model, data, cfg)
            rows["vit_recompute_after_oom"] = True
        mean = sum(seconds) / len(seconds)
        rows[name] = {"step_seconds": seconds, "mean_step_seconds": mean,
                      "tokens_per_s": tokens / mean, "model_flops_per_step": flops,
                      "tflops_per_s": flops / mean / 1e12, "peak_memory": harness.peak_memory_gib()}
        if peak:
            rows[name]["mfu"] = rows[name]["tflops_per_s"] / peak
        del model
        harness.release_memory()
    rows["vit_flops_share"] = vit / (llm_flops + vit)
    if peak:
        rows["vlm_over_text_mfu"] = rows["vlm"]["mfu"] / rows["text_only"]["mfu"]
    return rows


def main(argv: list[str] | None = None):
    import argparse

    from megatron_vlm.config import KernelConfig
    from megatron_vlm.config.vision import moonvit_config
    from megatron_vlm.recipes.tiny import tiny_moonvit

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--smoke", action="store_true", help="tiny model and budgets on CPU")
    p.add_argument("--out-dir", default=None)
    p.add_argument("--batches", default=None, help="read micro-batches from this .npz")
    p.add_argument("--dump-batches", default=None,
                   help=f"write GPU-size loader micro-batches to this .npz (e.g. {DEFAULT_BATCHES})"
                        " and exit; runs on CPU")
    p.add_argument("--attention-kernel", default="auto")
    p.add_argument("--peak-tflops", type=float, default=None)
    p.add_argument("--vit-recompute", choices=["none", "full"], default=None)
    args = p.parse_args(argv)
    cfg = dict(SMOKE if args.smoke else GPU)
    if args.vit_recompute:
        cfg["vit_recompute"] = args.vit_recompute
    run_dir = Path(os.environ.get("MEGATRON_VLM_BENCH_RUN", "runs/bench_vlm"))
    if args.dump_batches:
        batches = loader_batches(cfg["seq_length"], cfg["max_patches"], cfg["micro_batches"],
                                 run_dir)
        path = save_batches(batches, Path(args.dump_batches))
        print(f"wrote {len(batches)} micro-batches to {path} ({path.stat().st_size / 2**20:.1f} "
              f"MiB); mix: {mix_stats(batches)}")
        return path
    if not harness.can_run("vlm_mfu", args.smoke):
        return None
    harness.init_single_process()
    if args.batches:
        batches, source = load_batches(Path(args.batches)), f"{args.batches} (dumped loader output)"
    else:
        batches = loader_batches(cfg["seq_length"], cfg["max_patches"], cfg["micro_batches"],
                                 run_dir)
        source = "MultimodalLoader in-process"
    llm = harness.smoke_llm(vocab_size=1152) if args.smoke else harness.k2_proxy_llm()
    vision = tiny_moonvit() if args.smoke else moonvit_config()
    vision = dataclasses.replace(vision, recompute=cfg["vit_recompute"])
    peak, peak_source = harness.peak_tflops(cfg["params_dtype"], args.peak_tflops)
    kernels = KernelConfig(attention_kernel=args.attention_kernel)
    results = run_rows(llm, vision, batches, cfg, kernels, peak)
    results["data_mix"] = mix_stats(batches)
    config = {**cfg, "batches": source, "mix": "tiny_vlm_cpu joint stage (bundled corpus)",
              "llm": harness.llm_label(args.smoke),
              "vision": "tiny_moonvit" if args.smoke else "MoonViT 1152/27/16/4304",
              "peak_tflops": peak, "peak_source": peak_source,
              "environment": harness.environment()}
    notes = ("MFU = (LLM FLOPs, Megatron-LM BSHD form + ViT/projector FLOPs, Megatron-Bridge "
             "vit_flops_from_patch_stats) / step time / peak. Text-only row: the same "
             "micro-batches without media.")
    return write_result("vlm_mfu", config, results, args.out_dir, args.smoke, notes)


if __name__ == "__main__":
    main()
