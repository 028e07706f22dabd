"""The InternVL3.5 family's FLOPs and memory model: the InternViT tower (one attention segment of
``1 + h*w`` tokens per 448-px tile: the CLS token included) and ``mlp1`` (``4d -> H -> H``).
Light: config and planning imports only.

MoonViT's shared formulas assume segments of ``h*w`` patches and a ``4d -> 4d -> out``
projector; InternViT adds a CLS token to every tile and its projector's first linear goes
straight to the LLM width, so the formulas here are InternVL's own, counted as Megatron-Bridge
counts a ViT (matmuls only; norms, layer scales, softmax not counted; training = 3 x forward).

A media budget (``planning.costs.VisionBudget``) describes items of ``patches_per_item``
patches and ``frames_per_item`` tiles (or frames): InternViT attends over one tile
(``patches_per_item / frames_per_item`` patches + CLS) and makes one LLM token per 4 patches.
"""

from __future__ import annotations

from megatron_vlm.planning.activations import BF16
from megatron_vlm.planning.tensors import ParamTensor


def _split(size: int, tp: int, what: str) -> int:
    if size % tp:
        raise ValueError(f"tp={tp} does not divide the InternViT {what} {size} (InternViT-6B "
                         "has 25 heads: model.vision.parallel_mode=tp needs tp in {1, 5, 25}, "
                         "else use split)")
    return size // tp


def _layer_tensors(v, vision, i: int, h: int, ht: int, f: int, dtype: str) -> list[ParamTensor]:
    """One block's parameters (local spec names) on one TP rank."""
    q = f"encoder.layers.{i}."
    norm_params = ("weight", "bias") if vision.norm_type == "layer_norm" else ("weight",)
    out = [v(q + f"input_layernorm.{p}", (h,), "fp32") for p in norm_params]
    out.append(v(q + "self_attention.linear_qkv.weight", (3 * ht, h)))
    if vision.qkv_bias:
        out.append(v(q + "self_attention.linear_qkv.bias", (3 * ht,)))
    if vision.qk_norm:
        out += [v(q + "self_attention.q_norm.weight", (ht,)),
                v(q + "self_attention.k_norm.weight", (ht,))]
    out += [v(q + "self_attention.linear_proj.weight", (h, ht)),
            v(q + "self_attention.linear_proj.bias", (h,)), v(q + "self_attn_bda.weight", (h,))]
    out += [v(q + f"pre_mlp_layernorm.{p}", (h,), "fp32") for p in norm_params]
    return out + [v(q + "mlp.linear_fc1.weight", (f, h)), v(q + "mlp.linear_fc1.bias", (f,)),
                  v(q + "mlp.linear_fc2.weight", (h, f)), v(q + "mlp.linear_fc2.bias", (h,)),
                  v(q + "mlp_bda.weight", (h,))]


def vision_tensors(vision, projector, dtype: str, tp: int, train_vision: bool = True,
                   train_projector: bool = True, vision_tp: int | None = None
                   ) -> list[ParamTensor]:
    """Tower (``vision_tower.``) and projector (``projector.``) parameters on one TP rank,
    named as the local spec names them (norms counted fp32, as for the other families); the
    tower's linears and 6B's q/k norms split over ``vision_tp`` (default ``tp``; 1 in split
    mode), ``mlp1``'s linears over ``tp`` (its LayerNorm is replicated)."""
    h, c, ps = vision.hidden_size, vision.in_channels, vision.patch_size
    vtp = tp if vision_tp is None else vision_tp
    _split(vision.num_attention_heads, vtp, "heads")
    f, ht = _split(vision.ffn_hidden_size, vtp, "vision ffn"), _split(h, vtp, "vision width")

    def v(name: str, shape: tuple[int, ...], dt: str = dtype) -> ParamTensor:
        return ParamTensor("vision_tower." + name, shape, dt, False, train_vision)

    out = [v("patch_embed.weight", (h, c, ps, ps)), v("patch_embed.bias", (h,)),
           v("pos_embed.cls_token", (1, 1, h)),
           v("pos_embed.position_embeddings", (1, 1 + vision.pos_emb_side ** 2, h))]
    for i in range(vision.num_layers):
        out += _layer_tensors(v, vision, i, h, ht, f, dtype)

    def p(name: str, shape: tuple[int, ...], dt: str = dtype) -> ParamTensor:
        return ParamTensor("projector." + name, shape, dt, False, train_projector)

    k, o = projector.input_size, projector.output_size
    inter = _split(projector.intermediate_size, tp, "projector width")
    return out + [p("pre_norm.weight", (k,), "fp32"), p("pre_norm.bias", (k,), "fp32"),
                  p("mlp.linear_fc1.weight", (inter, k)), p("mlp.linear_fc1.bias", (inter,)),
                  p("mlp.linear_fc2.weight", (o, inter)), p("mlp.linear_fc2.bias", (o,))]


def _forward_flops(vision, out_size: int, patches: float, tiles: float, segment_sq: float
                   ) -> dict[str, float]:
    """Forward FLOPs: ``patches`` patches in ``tiles`` segments (one CLS token each),
    ``segment_sq`` = sum over segments of their token count squared; ``mlp1`` on
    ``patches / 4`` tokens."""
    h, f = vision.hidden_size, vision.ffn_hidden_size
    tokens = patches + tiles
    merged = patches / vision.merge_size
    return {
        "patch_embed": 2.0 * patches * vision.in_channels * vision.patch_size ** 2 * h,
        # qkv (3 h^2) + output projection (h^2) + MLP fc1, fc2 (2 h f) MACs per token.
        "vit_linear": 2.0 * vision.num_layers * (4 * h * h + 2 * h * f) * tokens,
        # QK^T and PV, bidirectional: 2 h L MACs each per token.
        "vit_attention": 4.0 * vision.num_layers * h * segment_sq,
        # linear_1 (4h -> H) + linear_2 (H -> H) MACs per LLM token.
        "projector": 2.0 * merged * (vision.merge_size * h * out_size + out_size ** 2),
    }


def vision_flops(vision, projector, budget) -> dict[str, float]:
    """Training FLOPs of the tower and projector for one micro-batch of ``budget``
    (``patch_embed``, ``vit_linear``, ``vit_attention``, ``projector``), the planner's
    interface (``planning/stages.py``)."""
    patches = budget.num_patches
    per_tile = budget.patches_per_item / budget.frames_per_item
    tiles = patches / per_tile
    fwd = _forward_flops(vision, projector.output_size, patches, tiles,
                         tiles * (per_tile + 1) ** 2)
    return {k: 3.0 * x for k, x in fwd.items()}


def vision_bytes(vision, projector, budget, *, tp: int, cp: int, recompute: str = "none",
                 flash: bool = True) -> float:
    """Tower + projector activations of one micro-batch on one GPU (bf16; ``recompute``:
    ``none`` or ``full``, which keeps each layer's input and one layer's activations). Per
    token and layer: norm in/out, q, k, v (and their normalised copies for 6B), attention out,
    two scaled residual branches, second norm (~12 h) and the MLP's fc1 and GELU outputs (2 f);
    projector per LLM token: the ``4d`` row twice (input, LayerNorm) and 3 ``H / tp``."""
    h, f = vision.hidden_size, vision.ffn_hidden_size
    per_tile = budget.patches_per_item / budget.frames_per_item
    local_tokens = budget.num_patches * (1 + 1 / per_tile) / (tp * cp)
    per_layer = (12 * h + 2 * f) * BF16 + 2 * vision.num_attention_heads * 4
    if not flash:
        per_layer += vision.num_attention_heads * (per_tile + 1) * BF16 / tp
    if recompute == "full":
        layers = vision.num_layers * h * BF16 + per_layer
    else:
        layers = vision.num_layers * per_layer
    merged = budget.num_patches / (vision.merge_size * cp)
    proj = merged * (2 * vision.merge_size * h + 3 * projector.output_size / tp) * BF16
    return local_tokens * (layers + tp * h * BF16) + proj


def step_flops(vision, llm_hidden_size: int, grid_thw, projector=None) -> float:
    """Training FLOPs of the tower + projector on media items ``grid_thw [M, 3]`` for MFU, as
    the packed batch holds them (the trainer's call): ``(tiles or frames, h, w)``, every tile
    its own segment of ``1 + h*w`` tokens and its own ``h*w/4`` LLM tokens. ``projector`` is
    accepted for the interface; ``mlp1``'s widths follow from ``vision`` and the LLM width."""
    del projector
    patches = tiles = segment_sq = 0
    for t, h, w in (tuple(int(x) for x in row) for row in grid_thw.tolist()):
        patches += t * h * w
        tiles += t
        segment_sq += t * (h * w + 1) ** 2
    return 3.0 * sum(_forward_flops(vision, llm_hidden_size, patches, tiles, segment_sq).values())


__all__ = ["step_flops", "vision_bytes", "vision_flops", "vision_tensors"]
