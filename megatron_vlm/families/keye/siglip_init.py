"""Initialise the Keye-VL 1.5 vision tower from a SigLIP checkpoint (HF ``SiglipVisionModel`` /
``SiglipModel`` names), as Keye's own training started from SigLIP-so400m-patch14-384.

The tower is SigLIP's layers plus things SigLIP has no weights for (2D RoPE, per-frame NaViT
segments), so every tower parameter comes from the checkpoint, unchanged: q/k/v fused per head
into megatron's ``linear_qkv`` (rows ``[q_h; k_h; v_h]``, SigLIP's order inside each), the
``[27*27, D]`` position table as is. SigLIP's attention-pooling ``head`` and, for a
``SiglipModel``, the text tower have no counterpart: they are returned as skipped names.
(MoonViT's import is ``convert/siglip.py``; the Keye-VL checkpoint's own layout is the
converter's table.)
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from megatron_vlm.convert.state_dicts import load_state
from megatron_vlm.convert.transforms import fuse_qkv
from megatron_vlm.families.keye.config import SiglipVisionConfig

SIGLIP_PREFIX = "vision_model."
"""Prefix of the vision tower's keys in a ``SiglipModel`` (the released SigLIP checkpoints) and
in transformers 4.x ``SiglipVisionModel`` files; transformers 5's ``SiglipVisionModel`` has
none (``embeddings.patch_embedding.weight`` ...)."""


def siglip_prefix(keys: Iterable[str]) -> str:
    """The tower's key prefix: ``vision_model.`` when a key carries it, else none."""
    return SIGLIP_PREFIX if any(k.startswith(SIGLIP_PREFIX) for k in keys) else ""


def siglip_vision_config(hf_config: Mapping[str, Any], **overrides: Any) -> SiglipVisionConfig:
    """Our tower config for a SigLIP ``config.json`` (``SiglipModel``'s ``vision_config`` or a
    ``SiglipVisionModel``'s own); ``overrides`` set the fields SigLIP does not define
    (``rope_theta``, merge kernel, dropouts, parallel mode ...)."""
    v = hf_config.get("vision_config", hf_config)
    act = v.get("hidden_act", "gelu_pytorch_tanh")
    if act != "gelu_pytorch_tanh":
        raise ValueError(f"SigLIP hidden_act={act!r}: the Keye tower's MLP is gelu_pytorch_tanh; "
                         "use a SigLIP checkpoint with that activation")
    image, patch = int(v["image_size"]), int(v["patch_size"])
    if image % patch:
        raise ValueError(f"SigLIP image_size={image} is not a multiple of patch_size={patch}: "
                         "its position table is not square")
    fields = dict(
        hidden_size=int(v["hidden_size"]), num_layers=int(v["num_hidden_layers"]),
        num_attention_heads=int(v["num_attention_heads"]),
        ffn_hidden_size=int(v["intermediate_size"]), patch_size=patch,
        in_channels=int(v.get("num_channels", 3)), pos_emb_side=image // patch,
        norm_epsilon=float(v.get("layer_norm_eps", 1e-6)),
    )
    fields.update(overrides)
    return SiglipVisionConfig(**fields)


def _layer_map(layer: int, te: bool) -> dict[str, str]:
    """SigLIP -> ours for one layer's single-tensor parameters (q/k/v are fused separately)."""
    hf, ours = f"encoder.layers.{layer}.", f"encoder.layers.{layer}."
    norm1 = ours + ("self_attention.linear_qkv.layer_norm_" if te else "input_layernorm.")
    norm2 = ours + ("mlp.linear_fc1.layer_norm_" if te else "pre_mlp_layernorm.")
    out = {}
    for p in ("weight", "bias"):
        out[f"{hf}layer_norm1.{p}"] = f"{norm1}{p}"
        out[f"{hf}self_attn.out_proj.{p}"] = f"{ours}self_attention.linear_proj.{p}"
        out[f"{hf}layer_norm2.{p}"] = f"{norm2}{p}"
        out[f"{hf}mlp.fc1.{p}"] = f"{ours}mlp.linear_fc1.{p}"
        out[f"{hf}mlp.fc2.{p}"] = f"{ours}mlp.linear_fc2.{p}"
    return out


def keye_vision_state_from_siglip(
    siglip_state: Mapping[str, Tensor], vision: SiglipVisionConfig, *, te: bool = False,
    prefix: str | None = None,
) -> tuple[dict[str, Tensor], list[str]]:
    """Our tower's full (unsharded) state dict from a SigLIP state dict.

    Args:
        siglip_state: HF keys (``embeddings.patch_embedding.weight`` or
            ``vision_model.embeddings.patch_embedding.weight`` ...).
        vision: the tower config (its layer count, heads and table side must match).
        te: name the LayerNorms as the Transformer Engine spec fuses them
            (``linear_qkv.layer_norm_*``, ``linear_fc1.layer_norm_*``).
        prefix: the tower's key prefix in ``siglip_state``; None: :func:`siglip_prefix`.

    Returns:
        ``(state, skipped)``: ``skipped`` lists the keys with no counterpart (the pooling
        head, a text tower, logit scale/bias), sorted.

    Raises:
        ValueError: a tower key is missing, or the checkpoint's table or layer count does not
        match ``vision`` (naming the config field to change).
    """
    if prefix is None:
        prefix = siglip_prefix(siglip_state)
    table = {"embeddings.patch_embedding.weight": "patch_embed.weight",
             "embeddings.patch_embedding.bias": "patch_embed.bias",
             "embeddings.position_embedding.weight": "pos_embed.weight",
             "post_layernorm.weight": "encoder.final_layernorm.weight",
             "post_layernorm.bias": "encoder.final_layernorm.bias"}
    for layer in range(vision.num_layers):
        table.update(_layer_map(layer, te))
    qkv = {tuple(f"encoder.layers.{layer}.self_attn.{n}_proj.{p}" for n in "qkv"):
           f"encoder.layers.{layer}.self_attention.linear_qkv.{p}"
           for layer in range(vision.num_layers) for p in ("weight", "bias")}
    used = set(table) | {k for names in qkv for k in names}
    missing = sorted(prefix + k for k in used if prefix + k not in siglip_state)
    if missing:
        raise ValueError(f"SigLIP state lacks {len(missing)} tower keys, e.g. {missing[:4]}; "
                         f"check model.vision.num_layers={vision.num_layers} and the key prefix "
                         f"{prefix!r}")
    extra_layers = [k for k in siglip_state if k.startswith(prefix + "encoder.layers.")
                    and k[len(prefix):] not in used]
    if extra_layers:
        raise ValueError(f"SigLIP has more layers than model.vision.num_layers="
                         f"{vision.num_layers} ({extra_layers[0]}); set num_layers to its depth")
    pos = siglip_state[prefix + "embeddings.position_embedding.weight"]
    if pos.shape[0] != vision.pos_emb_side ** 2:
        raise ValueError(f"SigLIP position table has {pos.shape[0]} rows but "
                         f"model.vision.pos_emb_side={vision.pos_emb_side} needs "
                         f"{vision.pos_emb_side ** 2}; set pos_emb_side to its image_size / "
                         "patch_size")
    state = {ours: siglip_state[prefix + hf] for hf, ours in table.items()}
    for names, ours in qkv.items():
        state[ours] = fuse_qkv(*(siglip_state[prefix + n] for n in names),
                               vision.num_attention_heads)
    skipped = sorted(k for k in siglip_state if not k.startswith(prefix)
                     or k[len(prefix):] not in used)
    return state, skipped


def init_from_siglip(tower: torch.nn.Module, siglip_state: Mapping[str, Tensor],
                     prefix: str | None = None) -> list[str]:
    """Copy a SigLIP state dict into ``tower`` (a ``KeyeSiglipViT``, local or TE spec, this
    rank's TP shard in ``tp`` mode); returns the skipped SigLIP keys."""
    te = any(n.endswith("linear_qkv.layer_norm_weight") for n, _ in tower.named_parameters())
    state, skipped = keye_vision_state_from_siglip(siglip_state, tower.vision, te=te,
                                                   prefix=prefix)
    group = tower.tp_group
    size = group.size() if group is not None else 1
    rank = group.rank() if group is not None else 0
    with torch.no_grad():
        load_state(tower, state, tp_rank=rank, tp_size=size)
    return skipped


def read_siglip_checkpoint(hf_dir: Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    """``(config.json, state dict)`` of a SigLIP checkpoint directory (``*.safetensors``)."""
    from safetensors.torch import load_file

    hf_dir = Path(hf_dir)
    files = sorted(hf_dir.glob("*.safetensors"))
    if not (hf_dir / "config.json").is_file() or not files:
        raise ValueError(f"{hf_dir} is not a SigLIP checkpoint: it needs config.json and "
                         "*.safetensors (save_pretrained's layout)")
    state: dict[str, Tensor] = {}
    for f in files:
        state.update(load_file(str(f)))
    return json.loads((hf_dir / "config.json").read_text()), state
