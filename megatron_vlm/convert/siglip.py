"""SigLIP (``SiglipVisionModel`` / ``SiglipModel``) weights -> MoonViT, to initialise the tower.

MoonViT has SigLIP-SO400M's shape (SPEC §2): patch conv, learned position table, pre-LN blocks
with biases, GELU-tanh MLP, final LayerNorm. The import keeps SigLIP's own grid (its
``[H*W, D]`` table becomes our ``[H, W, D]`` at native size), its LayerNorm eps and no RoPE, so
the imported tower computes exactly what ``SiglipVisionModel`` computes (tested); resizing the
table to MoonViT's 64x64, eps 1e-5 and switching RoPE on are the training recipe's choice.
SigLIP's attention-pooling ``head`` has no counterpart and is skipped (counted).

Output: one safetensors file with our MoonViT parameter names and the ``VisionConfig`` as JSON
in its metadata (``load_siglip_import`` reads both).
"""

from __future__ import annotations

import dataclasses
import json
import os
import secrets
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from megatron_vlm.config.vision import VisionConfig
from megatron_vlm.convert.hf_config import architecture_of, read_config, siglip_vision_from_hf
from megatron_vlm.convert.importer import open_source, plan_import
from megatron_vlm.convert.rules import ConversionError, ConvertContext, Table


def import_siglip(hf_dir: Path, out_file: Path, params_dtype: str = "fp32") -> Path:
    """Write our MoonViT state dict for the SigLIP checkpoint in ``hf_dir`` to ``out_file``."""
    from megatron_vlm.config.parallel import ParallelConfig
    from megatron_vlm.convert.mcore import ensure_single_process_groups
    from megatron_vlm.models.vision.moonvit import build_moonvit

    hf_dir, out_file = Path(hf_dir), Path(out_file)
    if out_file.exists():
        raise ConversionError(f"output {out_file} exists")
    cfg = read_config(hf_dir)
    family = architecture_of(cfg)
    if family.name != "siglip":
        raise ConversionError(f"{hf_dir} holds a {family.name} model, not SigLIP")
    vision = siglip_vision_from_hf(cfg)
    ctx = ConvertContext(vision_num_heads=vision.num_attention_heads,
                         vision_pos_emb_shape=(vision.pos_emb_height, vision.pos_emb_width,
                                               vision.hidden_size))
    table = Table(family.rules(q_lora=False, tied=False), ctx)
    source = open_source(hf_dir, family, ctx)
    groups = ensure_single_process_groups().pg_collection
    with torch.device("meta"):
        meta = build_moonvit(vision, ParallelConfig(), params_dtype, pg_collection=groups)
    expected = {n: (tuple(p.shape), p.dtype) for n, p in meta.named_parameters()}
    plan = plan_import(table, source, expected, family, num_layers=vision.num_layers,
                       where=str(hf_dir))
    state = {}
    for name, (rule, hf_names) in plan.sources.items():
        out = rule.transform.to_ours([source.read(k) for k in hf_names], ctx)
        state[name] = out.to(expected[name][1]).contiguous()
    tmp = out_file.with_name(f".tmp-{out_file.name}-{secrets.token_hex(4)}")
    try:
        save_file(state, str(tmp), metadata={
            "format": "pt", "vision_config": json.dumps(dataclasses.asdict(vision)),
            "skipped": json.dumps(dict(plan.skipped))})
        os.replace(tmp, out_file)
    finally:
        tmp.unlink(missing_ok=True)
    return out_file


def load_siglip_import(path: Path) -> tuple[VisionConfig, dict[str, torch.Tensor]]:
    """The ``VisionConfig`` and state dict written by :func:`import_siglip`."""
    state = {}
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        for k in f.keys():
            state[k] = f.get_tensor(k)
    return VisionConfig(**json.loads(meta["vision_config"])), state
