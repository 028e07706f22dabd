"""Hugging Face Kimi K2.5 vision tower / projector weights -> our modules (small, reusable core
of the later conversion tool).

Two HF layouts exist (transformers 5.23; checked by saving and reloading a tiny model):

* **checkpoint** (release files and ``save_pretrained``): ``vision_tower.encoder.blocks.{i}.
  {norm0, norm1, wqkv, wo, mlp.fc0, mlp.fc1}``, ``vision_tower.encoder.patch_embed.proj`` (the
  release: ``vision_tower.patch_embed.proj``), ``vision_tower.encoder.final_layernorm``,
  ``vision_tower.patch_embed.pos_emb.weight``; ``wqkv = [q; k; v]`` with q and k rows in the
  *interleaved* 2D-RoPE layout; projector ``mm_projector.proj.{0,2}``,
  ``(model.)mm_projector.pre_norm`` (Kimi-VL: ``multi_modal_projector.{linear_1, linear_2}``).
* **module** (``Kimi_K25VisionModel.state_dict()``, or ``model.vision_tower.*`` inside
  ``Kimi_K25ForConditionalGeneration``): ``layers.{i}.{norm1, norm2, attn.{q,k,v}_proj, attn.proj,
  mlp.fc1, mlp.fc2}``, ``patch_embed.proj``, ``patch_embed.pos_emb.position_embeddings``,
  ``final_layernorm``; on load transformers permutes q/k rows of each head from interleaved
  ``(d/2, 2)`` to rotate-half ``(2, d/2)`` (``PermuteForRope``); projector ``pre_norm``,
  ``in_proj``, ``out_proj``.

Ours keeps the checkpoint's interleaved layout (what ``rope2d`` rotates), fused per head as
megatron's ``linear_qkv`` wants it: rows ``[q_h; k_h; v_h]`` for h = 0..H-1.
"""

from __future__ import annotations

import re

import torch
from torch import Tensor


def rope_rows_half_to_interleaved(w: Tensor, num_heads: int) -> Tensor:
    """Undo transformers' ``PermuteForRope`` on q or k rows (weight ``[H*d, in]`` or bias)."""
    half = w.shape[0] // num_heads // 2
    return w.reshape(num_heads, 2, half, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def rope_rows_interleaved_to_half(w: Tensor, num_heads: int) -> Tensor:
    """transformers' ``PermuteForRope``: interleaved pairs -> rotate-half, per head."""
    half = w.shape[0] // num_heads // 2
    return w.reshape(num_heads, half, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def fuse_qkv(q: Tensor, k: Tensor, v: Tensor, num_heads: int) -> Tensor:
    """``[H*d, ...]`` q, k, v -> megatron's per-head ``[H*3*d, ...]`` (q_h, k_h, v_h)."""
    parts = [x.reshape(num_heads, -1, *x.shape[1:]) for x in (q, k, v)]
    fused = torch.stack(parts, dim=1)  # [H, 3, d, ...]
    return fused.reshape(-1, *q.shape[1:])


def split_qkv(qkv: Tensor, num_heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """Inverse of :func:`fuse_qkv`."""
    per_head = qkv.reshape(num_heads, 3, -1, *qkv.shape[1:])
    q, k, v = (per_head[:, i].reshape(-1, *qkv.shape[1:]) for i in range(3))
    return q, k, v


_LAYER = "encoder.layers.{}."
# (HF suffix regex, our name template) per layout; group 1 = layer index, last group = param.
_MODULE_RULES = [
    (r"patch_embed\.proj\.(weight|bias)", "patch_embed.{}"),
    (r"patch_embed\.pos_emb\.position_embeddings()", "pos_embed.weight{}"),
    (r"layers\.(\d+)\.norm1\.(weight|bias)", _LAYER + "input_layernorm.{}"),
    (r"layers\.(\d+)\.norm2\.(weight|bias)", _LAYER + "pre_mlp_layernorm.{}"),
    (r"layers\.(\d+)\.attn\.proj\.(weight|bias)", _LAYER + "self_attention.linear_proj.{}"),
    (r"layers\.(\d+)\.mlp\.fc1\.(weight|bias)", _LAYER + "mlp.linear_fc1.{}"),
    (r"layers\.(\d+)\.mlp\.fc2\.(weight|bias)", _LAYER + "mlp.linear_fc2.{}"),
    (r"final_layernorm\.(weight|bias)", "encoder.final_layernorm.{}"),
]
_CHECKPOINT_RULES = [
    (r"patch_embed\.proj\.(weight|bias)", "patch_embed.{}"),
    (r"patch_embed\.pos_emb\.weight()", "pos_embed.weight{}"),
    (r"blocks\.(\d+)\.norm0\.(weight|bias)", _LAYER + "input_layernorm.{}"),
    (r"blocks\.(\d+)\.norm1\.(weight|bias)", _LAYER + "pre_mlp_layernorm.{}"),
    (r"blocks\.(\d+)\.wo\.(weight|bias)", _LAYER + "self_attention.linear_proj.{}"),
    (r"blocks\.(\d+)\.mlp\.fc0\.(weight|bias)", _LAYER + "mlp.linear_fc1.{}"),
    (r"blocks\.(\d+)\.mlp\.fc1\.(weight|bias)", _LAYER + "mlp.linear_fc2.{}"),
    (r"final_layernorm\.(weight|bias)", "encoder.final_layernorm.{}"),
]
_PROJECTOR_RULES = [
    (r"pre_norm\.(weight|bias)", "pre_norm.{}"),
    (r"(?:in_proj|proj\.0|linear_1)\.(weight|bias)", "mlp.linear_fc1.{}"),
    (r"(?:out_proj|proj\.2|linear_2)\.(weight|bias)", "mlp.linear_fc2.{}"),
]


def _vision_prefix(hf_state: dict[str, Tensor]) -> str:
    """Everything before ``patch_embed.pos_emb`` ('', 'vision_tower.', 'model.vision_tower.')."""
    found = {k[: k.index("patch_embed.pos_emb.")] for k in hf_state if "patch_embed.pos_emb." in k}
    if len(found) != 1:
        raise ValueError(
            f"expected exactly one vision position table (...patch_embed.pos_emb.*) in the HF "
            f"state dict, found prefixes {sorted(found)}"
        )
    return found.pop()


def _rename(
    hf_state: dict[str, Tensor], rules: list[tuple[str, str]], keys: list[str]
) -> dict[str, Tensor]:
    out: dict[str, Tensor] = {}
    for key in keys:
        for pattern, template in rules:
            m = re.search(r"(?:^|\.)" + pattern + "$", key)
            if m:
                name = template.format(*m.groups())
                if name in out:
                    raise ValueError(f"two HF tensors map to {name!r} (second: {key!r})")
                out[name] = hf_state[key]
                break
    return out


def vision_state_from_hf(hf_state: dict[str, Tensor], num_heads: int) -> dict[str, Tensor]:
    """Our full (unsharded) MoonViT state dict from an HF state dict of either layout (a whole
    ``Kimi_K25ForConditionalGeneration`` state dict is fine: only vision keys are read)."""
    prefix = _vision_prefix(hf_state)
    keys = [k for k in hf_state if k.startswith(prefix)]
    checkpoint = any(".wqkv." in k for k in keys)
    out = _rename(hf_state, _CHECKPOINT_RULES if checkpoint else _MODULE_RULES, keys)
    layer_ids = sorted({int(n.split(".")[2]) for n in out if n.startswith("encoder.layers.")})
    for i in layer_ids:
        for param in ("weight", "bias"):
            if checkpoint:
                (key,) = [k for k in keys if k.endswith(f"blocks.{i}.wqkv.{param}")]
                q, k, v = hf_state[key].chunk(3, dim=0)  # q, k already interleaved
            else:
                q, k, v = (
                    hf_state[f"{prefix}layers.{i}.attn.{n}_proj.{param}"] for n in ("q", "k", "v")
                )
                q = rope_rows_half_to_interleaved(q, num_heads)
                k = rope_rows_half_to_interleaved(k, num_heads)
            out[f"encoder.layers.{i}.self_attention.linear_qkv.{param}"] = fuse_qkv(
                q, k, v, num_heads
            )
    return out


def projector_state_from_hf(hf_state: dict[str, Tensor]) -> dict[str, Tensor]:
    """Our projector state dict from ``Kimi_K25MultimodalProjection.state_dict()``, a whole-model
    state dict, or checkpoint names (``mm_projector.proj.{0,2}``, Kimi-VL ``linear_{1,2}``)."""
    keys = [k for k in hf_state if "vision_tower" not in k and "language_model" not in k]
    return _rename(hf_state, _PROJECTOR_RULES, keys)


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
