"""MoonViT alone: packed native-resolution micro-batches vs padded ones (SPEC §8: >= 1.4x).

The same media items -- native-resolution images (grids of 16..64 patches per side, LLaVA-like,
as ``data/length_mixes.py``) and 15% video chunks of 4 frames x 16x12 patches -- go through the
tower (patch conv, position tables, 27 layers at real size, temporal-pool merger), forward and
backward, laid out two ways under one patch budget ``P`` per micro-batch:

* ``packed``: items in stream order, first-fit into micro-batches of <= P patches; one THD
  sequence per micro-batch, attention block-diagonal per item (the kernel ``models/specs.py``
  picks on this machine);
* ``padded`` (baseline): items in stream order, grouped while ``B * Lmax <= P``, each padded to
  the group's longest item ``Lmax`` -> ``[Lmax, B, D]`` with a key-padding mask (one SDPA over the
  padded batch), as a ViT without packing runs.

samples/s = items / total seconds (best of ``rounds``). Timing only: in the padded layout every
row gets the 2D-RoPE angles of the group's longest item (same cost as per-item angles). CUDA for
the GPU-sized run; ``--smoke`` runs a tiny tower on CPU.
"""

from __future__ import annotations

import numpy as np

from benchmarks import harness
from benchmarks.common import write_result

GPU = dict(vision="moonvit (1152/27/16/4304)", params_dtype="bf16", max_patches=16384,
           num_items=600, side_range=(8, 33), video_fraction=0.15, video_grid=(4, 16, 12),
           warmup=1, rounds=2)
SMOKE = dict(vision="tiny (32/2/4/64)", params_dtype="fp32", max_patches=1024, num_items=24,
             side_range=(2, 9), video_fraction=0.15, video_grid=(4, 4, 4), warmup=1, rounds=3)


def media_items(num: int, side_range: tuple[int, int], video_fraction: float,
                video_grid: tuple[int, int, int], rng: np.random.Generator) -> list[tuple]:
    """(t, h, w) per item: images with even sides 2*U[lo, hi) patches, or video chunks."""
    items = []
    for _ in range(num):
        if rng.random() < video_fraction:
            items.append(tuple(video_grid))
        else:
            h, w = 2 * rng.integers(*side_range, size=2)
            items.append((1, int(h), int(w)))
    return items


def packed_groups(items, max_patches: int) -> list[list[int]]:
    groups, cur, used = [], [], 0
    for i, (t, h, w) in enumerate(items):
        n = t * h * w
        if cur and used + n > max_patches:
            groups.append(cur)
            cur, used = [], 0
        cur.append(i)
        used += n
    return groups + ([cur] if cur else [])


def padded_groups(items, max_patches: int) -> list[list[int]]:
    groups, cur, lmax = [], [], 0
    for i, (t, h, w) in enumerate(items):
        n = t * h * w
        if cur and max(lmax, n) * (len(cur) + 1) > max_patches:
            groups.append(cur)
            cur, lmax = [], 0
        cur.append(i)
        lmax = max(lmax, n)
    return groups + ([cur] if cur else [])


def padded_forward(vit, pixels, grid):
    """The tower on a padded ``[Lmax, B, D]`` batch with a key-padding mask."""
    import torch
    import torch.nn.functional as F

    from megatron_vlm.models.vision.merger import tpool_patch_merger
    from megatron_vlm.models.vision.rope2d import rope_2d_angles

    x = vit.patch_embed(pixels.to(vit.patch_embed.weight.dtype)).flatten(1)
    x = vit.pos_embed(x, grid)  # [N, D]
    lengths = grid.prod(dim=1).tolist()
    lmax, longest = max(lengths), int(np.argmax(lengths))
    xp = torch.stack([F.pad(p, (0, 0, 0, lmax - p.shape[0])) for p in torch.split(x, lengths)],
                     dim=1)  # [Lmax, B, D]
    pad = torch.arange(lmax)[None, :] >= torch.tensor(lengths)[:, None]  # [B, Lmax] True = pad
    angles = rope_2d_angles(grid[longest : longest + 1], vit.vision.head_dim,
                            vit.vision.rope_theta).to(x.device)
    out = vit.encoder(hidden_states=xp, attention_mask=pad[:, None, None, :].to(x.device),
                      rotary_pos_emb=angles)
    real = torch.cat([out[:n, b] for b, n in enumerate(lengths)])
    return tpool_patch_merger(real, grid, vit.vision.merge_kernel_height,
                              vit.vision.merge_kernel_width)


def main(argv: list[str] | None = None):
    import torch

    from megatron_vlm.config import KernelConfig, ParallelConfig
    from megatron_vlm.config.vision import moonvit_config
    from megatron_vlm.models.vision.moonvit import build_moonvit
    from megatron_vlm.recipes.tiny import tiny_moonvit

    args = harness.parse_args(__doc__.splitlines()[0], argv)
    if not harness.can_run("vit_packing", args.smoke):
        return None
    cfg = SMOKE if args.smoke else GPU
    harness.init_single_process()
    vision = tiny_moonvit() if args.smoke else moonvit_config()
    torch.manual_seed(0)
    vit = build_moonvit(vision, ParallelConfig(), cfg["params_dtype"],
                        kernels=KernelConfig(attention_kernel=args.attention_kernel)).train()
    dev = harness.device()
    vit.to(dev)
    items = media_items(cfg["num_items"], cfg["side_range"], cfg["video_fraction"],
                        cfg["video_grid"], np.random.default_rng(0))
    layouts = {"packed": packed_groups(items, cfg["max_patches"]),
               "padded": padded_groups(items, cfg["max_patches"])}
    g = torch.Generator().manual_seed(1)
    batches = {}
    for name, groups in layouts.items():
        batches[name] = []
        for group in groups:
            grid = torch.tensor([items[i] for i in group])
            n = int(grid.prod(dim=1).sum())
            batches[name].append((torch.randn(n, 3, 14, 14, generator=g).to(dev), grid))

    def run(name: str):
        for pixels, grid in batches[name]:
            out = vit(pixels, grid) if name == "packed" else padded_forward(vit, pixels, grid)
            out.float().square().mean().backward()
        vit.zero_grad(set_to_none=True)

    results = {}
    for name in ("packed", "padded"):
        harness.reset_peak_memory()
        seconds = harness.timed(lambda n=name: run(n), cfg["warmup"], cfg["rounds"])
        real = sum(t * h * w for t, h, w in items)
        computed = (real if name == "packed" else sum(
            len(gr) * max(items[i][0] * items[i][1] * items[i][2] for i in gr)
            for gr in layouts[name]))
        results[name] = {"micro_batches": len(layouts[name]), "seconds_all_rounds": seconds,
                         "seconds": min(seconds), "samples_per_s": len(items) / min(seconds),
                         "real_patches_per_s": real / min(seconds),
                         "patches_computed": computed, "padding_fraction": 1 - real / computed,
                         "peak_memory": harness.peak_memory_gib()}
    results["speedup_samples_per_s"] = (results["packed"]["samples_per_s"]
                                        / results["padded"]["samples_per_s"])
    att = vit.encoder.layers[0].self_attention.core_attention
    config = {**cfg, "packed_attention": type(att).__name__, "num_images": sum(
        1 for t, _, _ in items if t == 1), "num_video_chunks": sum(1 for t, _, _ in items if t > 1),
        "environment": harness.environment()}
    notes = ("fwd+bwd of the whole tower (patch conv .. merger); loss = mean square of the "
             "merged features. Padded baseline: [Lmax, B, D] + key-padding mask, SDPA.")
    return write_result("vit_packing", config, results, args.out_dir, args.smoke, notes)


if __name__ == "__main__":
    main()
