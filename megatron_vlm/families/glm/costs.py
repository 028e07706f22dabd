"""The GLM-4.1V / GLM-4.5V family's FLOPs and memory model: the Glm4v tower (attention per
temporal patch, no temporal pooling, SwiGLU blocks without biases) and its projector (2x2
downsample conv + merger). Light: config and planning imports only.

MoonViT's shared formulas (``planning/costs.vision_flops``, ``planning/activations
.vision_bytes``) assume a two-matrix GELU MLP and a ``4d -> 4d -> out`` projector; GLM's blocks
have three MLP matrices and its projector is ``4d -> out`` (conv) ``-> out -> SwiGLU(ffn) ->
out``, so the formulas here are GLM's own, counted as Megatron-Bridge counts a ViT (matmuls
only; norms, RoPE, softmax not counted; training = 3 x forward).

A media budget (``planning.costs.VisionBudget``) describes items of ``patches_per_item``
patches and ``frames_per_item`` temporal patches: GLM attends over one temporal patch
(``patches_per_item / frames_per_item`` patches) and makes one LLM token per 4 patches of every
temporal patch (no pooling).
"""

from __future__ import annotations

from megatron_vlm.planning.activations import BF16
from megatron_vlm.planning.tensors import ParamTensor

MERGER_FFN_RATIO = 13696 / 4096
"""Merger SwiGLU width / LLM width of the released GLM-4.1V (transformers' default): what
:func:`step_flops` assumes when it is not handed ``model.projector``."""


def _split(size: int, tp: int, what: str) -> int:
    if size % tp:
        raise ValueError(f"tp={tp} does not divide the GLM {what} {size}")
    return size // tp


def vision_tensors(vision, projector, dtype: str, tp: int, train_vision: bool = True,
                   train_projector: bool = True, vision_tp: int | None = None
                   ) -> list[ParamTensor]:
    """Tower (``vision_tower.``) and projector (``projector.``) parameters on one TP rank,
    named as the local spec names them (norms counted fp32, as for the other families); the
    tower's linears split over ``vision_tp`` (default ``tp``; 1 in split mode), the merger's
    SwiGLU over ``tp`` (downsample, ``proj`` and the LayerNorm are replicated)."""
    h, vtp = vision.hidden_size, tp if vision_tp is None else vision_tp
    f, ht = _split(vision.ffn_hidden_size, vtp, "vision ffn"), _split(h, vtp, "vision width")

    def v(name: str, shape: tuple[int, ...], dt: str = dtype) -> ParamTensor:
        return ParamTensor("vision_tower." + name, shape, dt, False, train_vision)

    kernel = (vision.temporal_patch_size, vision.patch_size, vision.patch_size)
    out = [v("patch_embed.proj.weight", (h, vision.in_channels, *kernel)),
           v("patch_embed.proj.bias", (h,)), v("patch_embed.norm.weight", (h,), "fp32"),
           v("pos_embed.weight", (vision.pos_emb_side ** 2, h))]
    for i in range(vision.num_layers):
        q = f"encoder.layers.{i}."
        out += [v(q + "input_layernorm.weight", (h,), "fp32"),
                v(q + "self_attention.linear_proj.weight", (h, ht)),
                v(q + "self_attention.linear_qkv.weight", (3 * ht, h))]
        if vision.attention_bias:
            out.append(v(q + "self_attention.linear_qkv.bias", (3 * ht,)))
        out += [v(q + "pre_mlp_layernorm.weight", (h,), "fp32"),
                v(q + "mlp.linear_fc1.weight", (2 * f, h)), v(q + "mlp.linear_fc2.weight", (h, f))]
    out.append(v("encoder.final_layernorm.weight", (h,), "fp32"))

    def p(name: str, shape: tuple[int, ...], dt: str = dtype) -> ParamTensor:
        return ParamTensor("projector." + name, shape, dt, False, train_projector)

    o, side = projector.output_size, projector.kernel_side
    inter = _split(projector.ffn_hidden_size, tp, "merger ffn")
    return out + [p("downsample.weight", (o, projector.vision_hidden_size, side, side)),
                  p("downsample.bias", (o,)), p("proj.weight", (o, o)),
                  p("post_projection_norm.weight", (o,), "fp32"),
                  p("post_projection_norm.bias", (o,), "fp32"),
                  p("mlp.linear_fc1.weight", (2 * inter, o)),
                  p("mlp.linear_fc2.weight", (o, inter))]


def _forward_flops(vision, out_size: int, ffn: int, patches: float, segment_sq: float,
                   merged: float) -> dict[str, float]:
    """Forward FLOPs: ``patches`` patches, ``segment_sq`` = sum over attention segments of
    their length squared, ``merged`` LLM tokens; the merger's SwiGLU ``out -> ffn -> out``."""
    h, f = vision.hidden_size, vision.ffn_hidden_size
    return {
        "patch_embed": 2.0 * patches * vision.patch_dim * h,
        # qkv (3 h^2) + output projection (h^2) + SwiGLU gate, up, down (3 h f) MACs.
        "vit_linear": 2.0 * vision.num_layers * (4 * h * h + 3 * h * f) * patches,
        # QK^T and PV, bidirectional: 2 h L MACs each per patch.
        "vit_attention": 4.0 * vision.num_layers * h * segment_sq,
        # downsample (4 h out) + proj (out^2) + SwiGLU (3 out ffn) MACs per token.
        "projector": 2.0 * merged * (vision.merge_size * h * out_size + out_size ** 2
                                     + 3 * out_size * ffn),
    }


def vision_flops(vision, projector, budget) -> dict[str, float]:
    """Training FLOPs of the tower and projector for one micro-batch of ``budget``
    (``patch_embed``, ``vit_linear``, ``vit_attention``, ``projector``), the planner's
    interface (``planning/stages.py``)."""
    patches = budget.num_patches
    segment = budget.patches_per_item / budget.frames_per_item  # one temporal patch
    fwd = _forward_flops(vision, projector.output_size, projector.ffn_hidden_size, patches,
                         patches * segment, patches / vision.merge_size)
    return {k: 3.0 * x for k, x in fwd.items()}


def vision_bytes(vision, projector, budget, *, tp: int, cp: int, recompute: str = "none",
                 flash: bool = True) -> float:
    """Tower + projector activations of one micro-batch on one GPU (bf16; ``recompute``:
    ``none`` or ``full``, which keeps each layer's input and one layer's activations). Per
    patch and layer: norm in/out, q, k, v, attention out, residual and second norm (~10 h)
    and the SwiGLU's ``[gate, up]`` and product (3 f); projector per token: the 4 patch rows,
    4 ``out``-wide tensors and the SwiGLU's 3 ``ffn / tp``."""
    h, f = vision.hidden_size, vision.ffn_hidden_size
    local_patches = budget.num_patches / (tp * cp)
    per_layer = (10 * h + 3 * f) * BF16 + 2 * vision.num_attention_heads * 4
    if not flash:
        segment = budget.patches_per_item / budget.frames_per_item
        per_layer += vision.num_attention_heads * segment * BF16 / tp
    if recompute == "full":
        layers = vision.num_layers * h * BF16 + per_layer
    else:
        layers = vision.num_layers * per_layer
    merged = budget.num_patches / (vision.merge_size * cp)
    o = projector.output_size
    proj = merged * (vision.merge_size * h + 4 * o + 3 * projector.ffn_hidden_size / tp) * BF16
    return local_patches * (layers + tp * h * BF16) + proj


def step_flops(vision, llm_hidden_size: int, grid_thw, projector=None) -> float:
    """Training FLOPs of the tower + projector on media items ``grid_thw [M, 3]`` for MFU, as
    the packed batch holds them (the trainer's call): ``(frames, h, w)``, every
    ``temporal_patch_size`` frames one temporal patch, its own attention segment of ``h*w``
    patches and its own ``h*w/4`` tokens. ``projector``: ``model.projector`` (its SwiGLU width);
    None assumes :data:`MERGER_FFN_RATIO` x ``llm_hidden_size``."""
    ffn = (projector.ffn_hidden_size if projector is not None
           else round(MERGER_FFN_RATIO * llm_hidden_size))
    patches = segment_sq = 0
    for frames, h, w in (tuple(int(x) for x in row) for row in grid_thw.tolist()):
        t = frames // vision.temporal_patch_size
        patches += t * h * w
        segment_sq += t * (h * w) ** 2
    fwd = _forward_flops(vision, llm_hidden_size, ffn, patches, segment_sq,
                         patches / vision.merge_size)
    return 3.0 * sum(fwd.values())


__all__ = ["step_flops", "vision_bytes", "vision_flops", "vision_tensors"]
