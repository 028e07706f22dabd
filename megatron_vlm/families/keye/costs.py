"""The Keye-VL 1.5 family's FLOPs and memory model: the SigLIP NaViT tower (attention per image
or video frame, no temporal pooling) and the 1.5 merger. Light: config and planning imports only.

The per-layer ViT and merger formulas are MoonViT's and Kimi's projector's (same layer shapes:
pre-LN blocks with biases, a 4d -> 4d -> out MLP on merged tokens), so ``vision_flops`` and
``vision_bytes`` are shared; what differs is the parameter list (a ``[side^2, d]`` position
table, no temporal table) and the per-frame attention and token counts of ``step_flops``.
"""

from __future__ import annotations

from megatron_vlm.planning.activations import vision_bytes
from megatron_vlm.planning.costs import vision_flops
from megatron_vlm.planning.tensors import ParamTensor, vit_encoder_tensors


def _split(size: int, tp: int, what: str) -> int:
    if size % tp:
        raise ValueError(f"tp={tp} does not divide the Keye {what} {size}")
    return size // tp


def vision_tensors(vision, projector, dtype: str, tp: int, train_vision: bool = True,
                   train_projector: bool = True, vision_tp: int | None = None
                   ) -> list[ParamTensor]:
    """Tower (``vision_tower.``) and merger (``projector.``) parameters on one TP rank; the
    tower's linears split over ``vision_tp`` (default ``tp``; 1 in split mode), the merger's
    over ``tp``."""
    h, c, ps = vision.hidden_size, vision.in_channels, vision.patch_size
    vtp = tp if vision_tp is None else vision_tp
    f, ht = _split(vision.ffn_hidden_size, vtp, "vision ffn"), _split(h, vtp, "vision width")

    def v(name: str, shape: tuple[int, ...], dt: str = dtype) -> ParamTensor:
        return ParamTensor("vision_tower." + name, shape, dt, False, train_vision)

    out = [v("patch_embed.weight", (h, c, ps, ps)), v("patch_embed.bias", (h,)),
           v("pos_embed.weight", (vision.pos_emb_side ** 2, h))]
    out += vit_encoder_tensors(v, vision.num_layers, h, ht, f)  # MoonViT's encoder layout
    k, inter = projector.input_size, _split(projector.intermediate_size, tp, "merger width")

    def p(name: str, shape: tuple[int, ...], dt: str = dtype) -> ParamTensor:
        return ParamTensor("projector." + name, shape, dt, False, train_projector)

    return out + [p("pre_norm.weight", (k,), "fp32"), p("pre_norm.bias", (k,), "fp32"),
                  p("mlp.linear_fc1.weight", (inter, k)), p("mlp.linear_fc1.bias", (inter,)),
                  p("mlp.linear_fc2.weight", (projector.output_size, inter)),
                  p("mlp.linear_fc2.bias", (projector.output_size,))]


def step_flops(vision, llm_hidden_size: int, grid_thw) -> float:
    """Training FLOPs of the tower + merger on media items ``grid_thw``: every frame is its own
    attention segment and its own ``h*w/4`` tokens (Bridge's Qwen-ViT count)."""
    from megatron_vlm.training.flops import vision_patch_stats, vit_flops_from_patch_stats

    frames = [(1, int(h), int(w)) for t, h, w in grid_thw.tolist() for _ in range(int(t))]
    return vit_flops_from_patch_stats(vision, llm_hidden_size,
                                      *vision_patch_stats(frames, vision.merge_size))


__all__ = ["step_flops", "vision_bytes", "vision_flops", "vision_tensors"]
