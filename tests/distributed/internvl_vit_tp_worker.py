"""Worker for test_internvl_vit_tensor_parallel.py: InternViT + ``mlp1`` under TP=2 vs
transformers' ``InternVLModel.get_image_features``: outputs and every gradient shard. The
6B-style tower (RMSNorm, whole-width qk-norm, no qkv bias) in ``tp`` mode without and with SP
and in ``split`` mode; the 300M-style one (LayerNorm, qkv bias) in ``tp`` mode with SP.

``python -m torch.distributed.run --nproc-per-node 2 internvl_vit_tp_worker.py OUT``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from transformers.models.internvl.configuration_internvl import InternVLConfig
from transformers.models.internvl.modeling_internvl import InternVLModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "reference"))
from hf_fixtures import perturb  # noqa: E402

from megatron_vlm.config import ParallelConfig  # noqa: E402
from megatron_vlm.convert.rules import ConvertContext, Table  # noqa: E402
from megatron_vlm.families.internvl.config import (  # noqa: E402
    InternVisionConfig,
    InternVLProjectorConfig,
)
from megatron_vlm.families.internvl.hf_vision_names import internvl_visual_rules  # noqa: E402
from megatron_vlm.families.internvl.projector import build_internvl_projector  # noqa: E402
from megatron_vlm.families.internvl.vision import build_internvit  # noqa: E402
from megatron_vlm.parallel.init import init_distributed  # noqa: E402

HIDDEN, HEADS, FFN, OUT, SIDE, PATCH = 32, 4, 64, 48, 4, 14
GRID = torch.tensor([[2, SIDE, SIDE], [1, SIDE, SIDE], [2, SIDE, SIDE]])  # 5 tiles
TILES = int(GRID[:, 0].sum())
VARIANTS = {
    "6b": dict(norm_type="rms_norm", use_qk_norm=True, attention_bias=False),
    "300m": dict(norm_type="layer_norm", use_qk_norm=False, attention_bias=True),
}
CASES = [("6b", "tp", False), ("6b", "tp", True), ("6b", "split", True), ("300m", "tp", True)]


def table() -> Table:
    return Table(internvl_visual_rules(hf_vision_prefix="vision_tower.",
                                       hf_projector_prefix="multi_modal_projector."),
                 ConvertContext(vision_num_heads=HEADS))


def ours_from_hf(hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Full (unsharded) tensors of ours, ``vision_tower.*`` / ``projector.*``, by the name map."""
    t = table()
    hf_state = {k: v for k, v in hf_state.items() if not k.startswith("language_model.")}
    return {ours: rule.transform.to_ours([hf_state[n] for n in names], t.ctx)
            for ours, (rule, names) in t.from_hf_keys(list(hf_state)).items()}


def shard(full: torch.Tensor, param: torch.Tensor, rank: int, tp: int) -> torch.Tensor:
    """This rank's part of ``full`` (megatron's TP split)."""
    if not getattr(param, "tensor_model_parallel", False):
        return full
    return full.chunk(tp, param.partition_dim)[rank]


def reference(variant: str, pixels: torch.Tensor, weights: torch.Tensor):
    torch.manual_seed(0)
    vision = dict(hidden_size=HIDDEN, num_hidden_layers=2, num_attention_heads=HEADS,
                  intermediate_size=FFN, image_size=SIDE * PATCH, patch_size=PATCH,
                  **VARIANTS[variant])
    text = dict(model_type="qwen2", vocab_size=64, hidden_size=OUT, intermediate_size=64,
                num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1)
    config = InternVLConfig(vision_config=vision, text_config=text)
    config.vision_config._attn_implementation = "eager"
    hf = InternVLModel(config)
    perturb(hf.vision_tower, 1)
    perturb(hf.multi_modal_projector, 2)
    ref = hf.get_image_features(pixels).pooler_output.reshape(-1, OUT)
    (ref * weights).sum().backward()
    state = ours_from_hf({k: v.detach() for k, v in hf.state_dict().items()})
    grads = ours_from_hf({k: p.grad for k, p in hf.named_parameters() if p.grad is not None})
    return ref.detach(), state, grads


def run_case(variant: str, mode: str, sp: bool, ref, state, grads, patches, weights) -> dict:
    par = ParallelConfig(tp=2, sequence_parallel=sp)
    rank = ps.get_tensor_model_parallel_rank()
    v = VARIANTS[variant]
    vision = InternVisionConfig(
        hidden_size=HIDDEN, num_layers=2, num_attention_heads=HEADS, ffn_hidden_size=FFN,
        pos_emb_side=SIDE, norm_type=v["norm_type"], qk_norm=v["use_qk_norm"],
        qkv_bias=v["attention_bias"], parallel_mode=mode)
    projector = InternVLProjectorConfig(vision_hidden_size=HIDDEN, output_size=OUT)
    modules = {"vision_tower.": build_internvit(vision, par),
               "projector.": build_internvl_projector(projector, par)}
    with torch.no_grad():
        for prefix, module in modules.items():
            for name, p in module.named_parameters():
                p.copy_(shard(state[prefix + name], p, rank, 2))
    tower, proj = modules.values()
    ours = proj(tower(patches, GRID))
    (ours * weights).sum().backward()
    worst = {}
    for prefix, module in modules.items():
        diff = 0.0
        for name, p in module.named_parameters():
            if getattr(p, "sequence_parallel", False):  # finalize_model_grads' TP all-reduce
                dist.all_reduce(p.grad, group=ps.get_tensor_model_parallel_group())
            diff = max(diff, (p.grad - shard(grads[prefix + name], p, rank, 2)).abs().max().item())
        worst[prefix] = diff
    sharded = tower.sharded_state_dict(prefix="vision_tower.")
    qnorm = sharded.get("vision_tower.encoder.layers.0.self_attention.q_norm.weight")
    return {"output": (ours - ref).abs().max().item(), "vit_grad": worst["vision_tower."],
            "proj_grad": worst["projector."], "encoded": tower.num_encoded_items,
            "scale": ref.abs().max().item(),
            # checkpoint sharding of the whole-width q norm: (layers, TP) fragments
            "qnorm_fragments": list(qnorm.axis_fragmentations) if qnorm is not None else None}


def main() -> None:
    out_file = Path(sys.argv[1])
    init_distributed(ParallelConfig(tp=2, sequence_parallel=True), seed=0)
    gen = torch.Generator().manual_seed(3)
    tiles = torch.rand(TILES, 3, SIDE * PATCH, SIDE * PATCH, generator=gen) * 2 - 1
    patches = tiles.view(TILES, 3, SIDE, PATCH, SIDE, PATCH).permute(0, 2, 4, 1, 3, 5)
    patches = patches.reshape(-1, 3, PATCH, PATCH)
    weights = torch.randn(TILES * SIDE * SIDE // 4, OUT, generator=gen)
    refs = {variant: reference(variant, tiles, weights) for variant in VARIANTS}
    results = {f"{variant}_{mode}_sp{int(sp)}": run_case(variant, mode, sp, *refs[variant],
                                                          patches, weights)
               for variant, mode, sp in CASES}
    gathered = [None, None]
    dist.all_gather_object(gathered, results)
    if dist.get_rank() == 0:
        out_file.write_text(json.dumps(gathered))
    dist.barrier()


if __name__ == "__main__":
    main()
