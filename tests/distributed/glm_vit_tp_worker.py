"""Worker for test_glm_vit_tensor_parallel.py: the GLM tower + projector under TP=2 (``tp`` mode
without and with SP, ``split`` mode) vs transformers' ``Glm4vVisionModel``: outputs and every
gradient shard.

``python -m torch.distributed.run --nproc-per-node 2 glm_vit_tp_worker.py OUT``.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from megatron.core import parallel_state as ps
from transformers.models.glm4v.configuration_glm4v import Glm4vVisionConfig
from transformers.models.glm4v.modeling_glm4v import Glm4vVisionModel

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "reference"))
from hf_fixtures import perturb  # noqa: E402

from megatron_vlm.config import ParallelConfig  # noqa: E402
from megatron_vlm.convert.rules import ConvertContext, Table  # noqa: E402
from megatron_vlm.families.glm.config import GlmMergerConfig, GlmVisionConfig  # noqa: E402
from megatron_vlm.families.glm.hf_vision_names import glm_visual_rules  # noqa: E402
from megatron_vlm.families.glm.merger import build_glm_merger  # noqa: E402
from megatron_vlm.families.glm.vision import build_glm_vision  # noqa: E402
from megatron_vlm.parallel.init import init_distributed  # noqa: E402

HIDDEN, HEADS, OUT, INTER, SIDE = 32, 4, 48, 64, 4
GRID = torch.tensor([[1, 4, 6], [1, 8, 4], [2, 6, 4], [1, 2, 2]])  # images + 2-patch video
MODES = [("tp", False), ("tp", True), ("split", True)]


def ours_from_hf(hf_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Full (unsharded) tensors of ours, ``vision_tower.*`` / ``projector.*``, by the name map."""
    table = Table(glm_visual_rules(hf_prefix=""), ConvertContext(vision_num_heads=HEADS))
    out = {}
    for ours, (rule, names) in table.from_hf_keys(list(hf_state)).items():
        out[ours] = rule.transform.to_ours([hf_state[n] for n in names], table.ctx)
    return out


def shard(name: str, full: torch.Tensor, param: torch.Tensor, rank: int, tp: int) -> torch.Tensor:
    """This rank's part of ``full``: megatron's TP split; a gated ``linear_fc1`` holds its share
    of the gate rows then its share of the up rows."""
    if not getattr(param, "tensor_model_parallel", False):
        return full
    dim = param.partition_dim
    if name.endswith("mlp.linear_fc1.weight"):
        gate, up = full.chunk(2, dim=0)
        return torch.cat([gate.chunk(tp, dim)[rank], up.chunk(tp, dim)[rank]], dim=0)
    return full.chunk(tp, dim)[rank]


def run_mode(mode: str, sp: bool, state: dict, grads: dict, pixels, weights, ref) -> dict:
    par = ParallelConfig(tp=2, sequence_parallel=sp)
    rank = ps.get_tensor_model_parallel_rank()
    vision = GlmVisionConfig(hidden_size=HIDDEN, num_layers=2, num_attention_heads=HEADS,
                             ffn_hidden_size=OUT, pos_emb_side=SIDE, attention_bias=True,
                             parallel_mode=mode)
    merger_config = GlmMergerConfig(vision_hidden_size=HIDDEN, output_size=OUT,
                                    ffn_hidden_size=INTER)
    modules = {"vision_tower.": build_glm_vision(vision, par),
               "projector.": build_glm_merger(merger_config, par)}
    with torch.no_grad():
        for prefix, module in modules.items():
            for name, p in module.named_parameters():
                p.copy_(shard(name, state[prefix + name], p, rank, 2))
    tower, merger = modules.values()
    ours = merger(tower(pixels, GRID))
    (ours * weights).sum().backward()
    worst = {}
    for prefix, module in modules.items():
        diff = 0.0
        for name, p in module.named_parameters():
            if getattr(p, "sequence_parallel", False):  # finalize_model_grads' TP all-reduce
                dist.all_reduce(p.grad, group=ps.get_tensor_model_parallel_group())
            ref_grad = shard(name, grads[prefix + name], p, rank, 2)
            diff = max(diff, (p.grad - ref_grad).abs().max().item())
        worst[prefix] = diff
    return {"output": (ours - ref).abs().max().item(), "vit_grad": worst["vision_tower."],
            "proj_grad": worst["projector."], "encoded": tower.num_encoded_items}


def main() -> None:
    out_file = Path(sys.argv[1])
    init_distributed(ParallelConfig(tp=2, sequence_parallel=True), seed=0)
    torch.manual_seed(0)
    config = Glm4vVisionConfig(depth=2, hidden_size=HIDDEN, num_heads=HEADS,
                               out_hidden_size=OUT, intermediate_size=INTER,
                               image_size=14 * SIDE, attention_bias=True)
    config._attn_implementation = "eager"
    hf = Glm4vVisionModel(config)
    perturb(hf, 1)
    gen = torch.Generator().manual_seed(3)
    pixels = torch.rand(int(GRID.prod(1).sum()), 3 * 2 * 14 * 14, generator=gen) * 2 - 1
    weights = torch.randn(int(GRID.prod(1).sum()) // 4, OUT, generator=gen)
    split = torch.cat([torch.tensor([[1, h, w]] * t) for t, h, w in GRID.tolist()])
    ref = hf(pixels, grid_thw=split).pooler_output
    (ref * weights).sum().backward()
    state = ours_from_hf({k: v.detach() for k, v in hf.state_dict().items()})
    grads = ours_from_hf({k: p.grad for k, p in hf.named_parameters()})
    results = {f"{mode}_sp{int(sp)}": run_mode(mode, sp, state, grads, pixels, weights,
                                               ref.detach())
               for mode, sp in MODES}
    results["scale"] = ref.abs().max().item()
    gathered = [None, None]
    dist.all_gather_object(gathered, results)
    if dist.get_rank() == 0:
        out_file.write_text(json.dumps(gathered))
    dist.barrier()


if __name__ == "__main__":
    main()
