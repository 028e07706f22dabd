"""In-memory HF state dicts -> ours, through the same tables as the file converters: the K2.5
vision tower and projector (tests and tools that hold a transformers module), any layout.

Accepted vision layouts (transformers 5.23): the checkpoint's (release / ``save_pretrained``:
``vision_tower.encoder.blocks.{i}.{norm0, norm1, wqkv, wo, mlp.fc0, mlp.fc1}``, fused ``wqkv`` with
q/k rows in the interleaved 2D-RoPE layout) and the module's (``Kimi_K25VisionModel.state_dict()``
or ``model.vision_tower.*`` of the whole model: ``layers.{i}.{norm1, norm2, attn.{q,k,v}_proj,
attn.proj, mlp.fc1, mlp.fc2}``, q/k rows rotate-half after transformers' load-time
``PermuteForRope``, which the ``K25_RENAMES`` alias undoes). Projector: ``pre_norm`` /
``in_proj`` / ``out_proj`` (module), ``mm_projector.proj.{0,2}`` (K2.5 checkpoint),
``multi_modal_projector.linear_{1,2}`` (Kimi-VL).
"""

from __future__ import annotations

import torch
from torch import Tensor

from megatron_vlm.convert.hf_io import AliasedSource, DictSource
from megatron_vlm.convert.rules import ConversionError, ConvertContext, Table, prefixed
from megatron_vlm.convert.tables import (
    K25_PROJECTOR,
    K25_RENAMES,
    KIMI_VL_PROJECTOR,
    moonvit_rules,
    projector_rules,
)


def _convert(table: Table, source) -> dict[str, Tensor]:
    return {name: rule.transform.to_ours([source.read(k) for k in hf_names], table.ctx)
            for name, (rule, hf_names) in table.from_hf_keys(source.keys()).items()}


def vision_state_from_hf(hf_state: dict[str, Tensor], num_heads: int) -> dict[str, Tensor]:
    """Our full (unsharded) MoonViT state dict from an HF state dict of either layout (a whole
    ``Kimi_K25ForConditionalGeneration`` state dict is fine: only vision keys are read)."""
    found = {k[: k.index("patch_embed.pos_emb.")] for k in hf_state if "patch_embed.pos_emb." in k}
    if len(found) != 1:
        raise ConversionError(
            f"expected exactly one vision position table (...patch_embed.pos_emb.*) in the HF "
            f"state dict, found prefixes {sorted(found)}")
    prefix = found.pop()
    if prefix == "":  # the vision module's own state dict: name it as inside the whole model
        hf_state = {"model.vision_tower." + k: v for k, v in hf_state.items()}
    ctx = ConvertContext(vision_num_heads=num_heads)
    source = AliasedSource(DictSource(hf_state), K25_RENAMES, ctx)
    return _convert(Table(prefixed(moonvit_rules(), "vision_tower.", ""), ctx), source)


def projector_state_from_hf(hf_state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Our projector state dict from ``Kimi_K25MultimodalProjection.state_dict()``, a whole-model
    state dict, or checkpoint names (K2.5 ``mm_projector.proj.{0,2}``, Kimi-VL ``linear_{1,2}``)."""
    if "pre_norm.weight" in hf_state:  # the projection module's own state dict
        hf_state = {"model.mm_projector." + k: v for k, v in hf_state.items()}
    ctx = ConvertContext()
    source = AliasedSource(DictSource(hf_state), K25_RENAMES, ctx)
    rules = projector_rules(K25_PROJECTOR) + projector_rules(KIMI_VL_PROJECTOR)
    return _convert(Table(rules, ctx), source)


@torch.no_grad()
def load_state(
    module: torch.nn.Module, state: dict[str, Tensor], tp_rank: int = 0, tp_size: int = 1
) -> None:
    """Copy a full state dict into ``module``, slicing tensor-parallel parameters (megatron's
    ``tensor_model_parallel`` / ``partition_dim`` attributes) to this rank's shard.

    Raises ``ValueError`` on missing, unexpected or mis-shaped tensors.
    """
    params = dict(module.named_parameters())
    missing, unexpected = sorted(params.keys() - state.keys()), sorted(state.keys() - params.keys())
    if missing or unexpected:
        raise ValueError(f"state does not fit the module: missing {missing}, "
                         f"unexpected {unexpected}")
    for name, param in params.items():
        src = state[name]
        if tp_size > 1 and getattr(param, "tensor_model_parallel", False):
            src = src.chunk(tp_size, dim=param.partition_dim)[tp_rank]
        if src.shape != param.shape:
            raise ValueError(f"{name}: HF shape {tuple(src.shape)} != ours {tuple(param.shape)}")
        param.copy_(src)
