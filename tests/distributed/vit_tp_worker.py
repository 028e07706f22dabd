"""Worker for test_vit_tensor_parallel.py: MoonViT + Kimi projector under TP (optionally SP) vs
transformers' Kimi K2.5 vision tower and projector, outputs and every gradient.

``python -m torch.distributed.run --nproc-per-node 2 vit_tp_worker.py OUT SP [MODE]``: MODE is
the tower's ``parallel_mode`` (``tp`` by default; ``split`` replicates the tower over TP and
gives each rank some of the items, ``parallel/vision_split.py``).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from transformers.models.kimi_k25 import Kimi_K25Config, Kimi_K25ForConditionalGeneration

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "reference"))
from hf_fixtures import TEXT, VISION, perturb  # noqa: E402

from megatron_vlm.config import ParallelConfig, ProjectorConfig, VisionConfig  # noqa: E402
from megatron_vlm.models.projector import build_projector  # noqa: E402
from megatron_vlm.models.vision.hf_weights import (  # noqa: E402
    load_state,
    projector_state_from_hf,
    vision_state_from_hf,
)
from megatron_vlm.models.vision.moonvit import build_moonvit  # noqa: E402
from megatron_vlm.optim.qk_clip import (  # noqa: E402
    apply_vit_qk_clip,
    vision_max_logit_group,
    vit_attentions,
)
from megatron_vlm.parallel.init import init_distributed  # noqa: E402

HEADS, WIDTH, OUT_DIM = 4, 32, 48


def _max_diff(ours: torch.nn.Module, ref_grads: dict, tp_rank: int, tp: int) -> float:
    worst = 0.0
    for name, p in ours.named_parameters():
        ref = ref_grads[name]
        if getattr(p, "tensor_model_parallel", False):
            ref = ref.chunk(tp, dim=p.partition_dim)[tp_rank]
        worst = max(worst, (p.grad - ref).abs().max().item())
    return worst


def _qk_clip(vit, tp: int, tau: float | None) -> dict:
    """QK-Clip on the tower after its one forward: full per-head maxima and full clipped
    ``linear_qkv`` weights and biases (TP mode: gathered over TP), before/after the reduction."""
    group = ps.get_tensor_model_parallel_group()
    local = torch.stack([a.core_attention.current_max_attn_logits.clone()
                         for a in vit_attentions(vit)])  # [layers, local heads]

    def full(t: torch.Tensor, dim: int) -> torch.Tensor:
        if vit.replica_group is not None:  # split mode: every rank holds all heads
            return t
        parts = [torch.empty_like(t) for _ in range(tp)]
        dist.all_gather(parts, t.contiguous(), group=group)
        return torch.cat(parts, dim=dim)

    if tau is None:  # between the middle two of layer 1's reduced maxima: half its heads clip
        reduced = local.clone()
        dist.all_reduce(reduced, op=dist.ReduceOp.MAX, group=vision_max_logit_group(vit))
        s = full(reduced, 1)[0].sort().values
        tau = float((s[len(s) // 2 - 1] + s[len(s) // 2]) / 2)
    stats = apply_vit_qk_clip(vit, threshold=tau, group=vision_max_logit_group(vit))
    maxima = full(torch.tensor([stats.max_logits[i + 1] for i in range(len(local))]), 1)
    attns = vit_attentions(vit)
    return {"tau": tau, "local": local, "maxima": maxima,
            "clipped": sum(stats.heads_clipped.values()),
            "weight": [full(a.linear_qkv.weight.detach(), 0) for a in attns],
            "bias": [full(a.linear_qkv.bias.detach(), 0) for a in attns]}


def main() -> None:
    out_file, sp = Path(sys.argv[1]), sys.argv[2] == "1"
    modes = (sys.argv[3] if len(sys.argv) > 3 else "tp").split(",")
    par = ParallelConfig(tp=2, sequence_parallel=sp)
    init_distributed(par, seed=0)
    torch.manual_seed(0)
    cfg = Kimi_K25Config(vision_config=VISION, text_config=TEXT, projection_hidden_size=WIDTH,
                         tie_word_embeddings=False)
    hf = Kimi_K25ForConditionalGeneration(cfg)
    perturb(hf.model.vision_tower, 1)
    perturb(hf.model.mm_projector, 2)
    # Images and video chunks of mixed t; 68 patches is not a multiple of 8, so SP pads.
    grid = torch.tensor([[1, 4, 6], [4, 2, 2], [1, 2, 2], [1, 2, 6], [3, 2, 2]])
    gen = torch.Generator().manual_seed(3)
    pixels = torch.rand(int(grid.prod(1).sum()), 3, 14, 14, generator=gen)
    weights = torch.randn(int((grid[:, 1] * grid[:, 2]).sum()) // 4, OUT_DIM, generator=gen)
    # transformers 5.23 cannot mix t in one call: one item at a time (attention is per item).
    ref = torch.cat([
        hf.model.mm_projector(hf.model.vision_tower(p, grid_thw=g[None]).pooler_output).squeeze(1)
        for p, g in zip(pixels.split(grid.prod(1).tolist()), grid)])
    (ref * weights).sum().backward()
    vit_ref = vision_state_from_hf(
        {k: p.grad for k, p in hf.model.vision_tower.named_parameters()}, HEADS)
    proj_ref = projector_state_from_hf(
        {k: p.grad for k, p in hf.model.mm_projector.named_parameters()})
    tp_rank = ps.get_tensor_model_parallel_rank()
    results, clips, tau = {}, {}, None
    for mode in modes:
        vit = build_moonvit(VisionConfig(hidden_size=WIDTH, num_layers=2,
                                         num_attention_heads=HEADS, ffn_hidden_size=64,
                                         pos_emb_height=8, pos_emb_width=8,
                                         parallel_mode=mode, qk_clip=True), par)
        proj = build_projector(ProjectorConfig(vision_hidden_size=WIDTH, merge_size=4,
                                               output_size=OUT_DIM), par)
        load_state(vit, vision_state_from_hf(hf.model.vision_tower.state_dict(), HEADS),
                   tp_rank, 2)
        load_state(proj, projector_state_from_hf(hf.model.mm_projector.state_dict()), tp_rank, 2)
        ours = proj(vit(pixels, grid))
        (ours * weights).sum().backward()
        # Sequence-parallel weights hold partial sums: megatron's finalize_model_grads
        # all-reduces them over TP; do the same here. Split mode flags the replicated tower the
        # same way (each rank saw only its items).
        for p in list(vit.parameters()) + list(proj.parameters()):
            if getattr(p, "sequence_parallel", False):
                dist.all_reduce(p.grad, group=ps.get_tensor_model_parallel_group())
        results[mode] = {
            "output": (ours - ref).abs().max().item(),
            "output_scale": ref.abs().max().item(),
            "vit_grad": _max_diff(vit, vit_ref, tp_rank, 2),
            "proj_grad": _max_diff(proj, proj_ref, tp_rank, 2),
            "encoded_items": vit.num_encoded_items,
        }
        clips[mode] = _qk_clip(vit, 2, tau)
        tau = clips[mode]["tau"]
        results[mode]["heads_clipped"] = clips[mode]["clipped"]
    if len(clips) == 2:  # tp vs split: same maxima, same clipped rows (split: reduced over TP)
        a, b = clips["tp"], clips["split"]
        results["qk_clip"] = {
            "maxima": (a["maxima"] - b["maxima"]).abs().max().item(),
            "weight": max((x - y).abs().max().item() for x, y in zip(a["weight"], b["weight"])),
            "bias": max((x - y).abs().max().item() for x, y in zip(a["bias"], b["bias"])),
            # this rank's split-mode maxima before the TP reduction vs after it
            "split_local_below": (b["local"] < b["maxima"] - 1e-6).any().item(),
        }
    gathered = [None, None]
    dist.all_gather_object(gathered, results)
    if dist.get_rank() == 0:
        out_file.write_text(json.dumps(gathered))
    dist.barrier()


if __name__ == "__main__":
    main()
