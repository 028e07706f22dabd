"""Model FLOPs of the LLM, the way Megatron-LM counts them (SPEC §8), and MFU.

megatron-core 0.16.1 does not ship the FLOPs formula: it lives in Megatron-LM's
``megatron/training/training.py::num_floating_point_operations`` (SPEC §6). This module
re-implements its multi-latent-attention and GQA branches (dense or MoE) as a function of our
``LLMConfig``, so that MFU numbers are comparable with Megatron-LM / Megatron-Bridge reports.

Conventions (identical to Megatron-LM):

* A GEMM of an ``[m, n]`` by ``[n, k]`` operand costs ``2 m n k`` FLOPs (one multiply, one add per
  multiply-accumulate, MAC).
* Training costs 3x the forward pass: forward, backward data-gradient, backward weight-gradient are
  one GEMM of the same size each. So every per-token MAC below is multiplied by ``3 * 2 = 6``.
* Only matrix multiplies count, plus one MAC per element for the two MLA latent RMSNorms (the
  ``+ 1`` terms Megatron-LM carries); elementwise ops, softmax, RoPE, the other norms and the
  router GEMM (``hidden x num_experts``, about 0.5% for Kimi K2) are not counted.
* Core attention uses the configured sequence length; with a causal mask only half of the
  ``seq x seq`` score matrix is computed (``/ 2``). With packed documents the real attention work is
  smaller (block-diagonal): Megatron-LM's BSHD default still counts the full sequence
  (:func:`model_flops`), and since May 2026 (``5e4fc931``) its THD path counts real tokens and
  ``sum_i L_i^2`` over the real documents instead (:func:`packed_model_flops`).
* The output layer uses the padded vocabulary the model is built with.

Checked against Megatron-LM ``megatron/training/training.py`` at ``d98e8a64`` (2026-08-22): the
MLA ``q_term`` / ``kv_lora_rank * (h + n (d_nope + d_v) + 1) + h d_rope`` / ``n d_v h`` terms,
``standard_self_attn_core_term = 6 (n (d_nope + d_rope) / 2 + n d_v / 2)`` per ``L^2``, MLP
``6 h (ffn 3 dense + moe_ffn topk 3 moe + shared 3 moe)`` and logits ``6 h V``; MoE latent
projections are not used by this model family. Multi-token prediction (``mtp_num_layers``,
GLM-4.5-Air) as the same file counts it: each MTP layer is one more layer of the last layer's
kind (attention and MLP terms), plus ``6 (3 h + 2 h^2)`` for its norms and ``eh_proj`` and one
more ``6 h V`` output layer.
The GQA form (``attention: gqa``) is the same file's "MHA or GQA" branch: per token and layer
``6 (h (n d + 2 g d) + n d h)`` for the qkv and output projections (no attention output gate
here; the qkv bias and the q/k RMSNorms are not counted) and ``6 n d`` per ``L^2`` for core
attention (``/ 2`` causal ``* 2`` for ``QK^T`` and ``PV``), ``d = kv_channels``.

The vision tower follows Megatron-Bridge's ``vit_flops_from_patch_stats``
(``training/utils/flop_utils.py`` at ``067f987d``): see :func:`vit_flops_from_patch_stats`.
"""

from __future__ import annotations

from megatron_vlm.config.model import LLMConfig
from megatron_vlm.config.vision import VisionConfig

#: SwiGLU: fc1 holds gate and up (two ``hidden x ffn`` matrices) plus fc2, i.e. 3 matrices where a
#: plain MLP has 2; Megatron-LM's formula counts 2 GEMMs per MLP and scales by this.
GATED_LINEAR_MULTIPLIER = 3.0 / 2.0

#: FLOPs per MAC (2) times passes per training step (forward + 2 backward GEMMs = 3).
TRAIN_FLOPS_PER_MAC = 3 * 2


def _default_padded_vocab(vocab_size: int, multiple: int = 128) -> int:
    """Vocab padded to ``multiple`` (megatron's convention at tp=1; see ``models/llm.py``)."""
    return ((vocab_size + multiple - 1) // multiple) * multiple


def llm_flops_breakdown_per_token(
    llm: LLMConfig,
    seq_length: int,
    causal: bool = True,
    padded_vocab_size: int | None = None,
) -> dict[str, float]:
    """Training FLOPs (forward + backward) per token, split by term, as Megatron-LM counts them.

    Per token and per layer, with ``h`` hidden, ``n`` heads, ``d_nope``/``d_rope``/``d_v`` head
    dims, ``r_q``/``r_kv`` the LoRA ranks and ``s`` the sequence length (MACs; times 6 for FLOPs):

    * ``attn_q``: with ``r_q``: q_down ``h*r_q`` + q_a_layernorm ``r_q`` + q_up
      ``r_q*n*(d_nope+d_rope)``; without: q_proj ``h*n*(d_nope+d_rope)``.
      GQA (``g`` key/value heads of dim ``d``): the query rows of ``linear_qkv``, ``h*n*d``.
    * ``attn_kv``: kv_down ``h*(r_kv+d_rope)`` + kv_a_layernorm ``r_kv`` + kv_up
      ``r_kv*n*(d_nope+d_v)``. GQA: the key and value rows of ``linear_qkv``, ``h*2*g*d``.
    * ``attn_out``: o_proj ``n*d_v*h`` (GQA: ``n*d*h``).
    * ``attn_core``: ``Q K^T`` is ``s*n*(d_nope+d_rope)`` and ``P V`` is ``s*n*d_v`` per query
      token, halved when causal (GQA: ``s*n*d`` each). A causal sliding-window layer (GPT-OSS,
      window ``w < s``) computes the band of the score matrix only: ``s/2 - (s-w)^2 / (2s)`` keys
      per query instead of ``s/2`` (the same continuous count as the causal half).
    * ``mlp_dense``: ``num_dense_layers`` SwiGLU layers, ``3*h*ffn`` each.
    * ``mlp_routed``: ``num_moe_layers * topk`` experts, ``3*h*moe_ffn`` each.
    * ``mlp_shared``: ``num_moe_layers`` shared experts, ``3*h*moe_ffn*num_shared`` each.
    * ``logits``: output layer ``h*vocab`` (padded vocab), once more per MTP layer.
    * ``mtp``: per MTP layer its three norms and ``eh_proj``, ``3*h + 2*h*h`` (its decoder layer
      is in the attention and MLP terms, as one more layer of the last layer's kind).

    Args:
        llm: the LLM config.
        seq_length: tokens per sequence the attention runs over.
        causal: halve the core-attention work (causal mask).
        padded_vocab_size: vocabulary of the output layer; default ``llm.vocab_size`` padded to a
            multiple of 128 (megatron at tp=1; pass ``models.llm.padded_vocab_size(v, tp)``).

    Returns:
        FLOPs per token for each term above (keys as listed); their sum is the total.
    """
    if seq_length <= 0:
        raise ValueError(f"seq_length={seq_length} must be > 0")
    h = llm.hidden_size
    n = llm.num_attention_heads
    mtp = llm.mtp_num_layers
    num_layers = llm.num_layers + mtp
    vocab = padded_vocab_size or _default_padded_vocab(llm.vocab_size)

    if llm.attention == "gqa":
        # Megatron-LM's "MHA or GQA" branch: qkv projection h (n d + 2 g d), out proj n d h,
        # core n d per L^2 for QK^T and again for PV (before the causal half).
        d, g = llm.head_dim, llm.query_groups
        q_macs, kv_macs, out_macs = h * n * d, h * 2 * g * d, n * d * h
        core_macs = 2 * seq_length * n * d
    else:
        d_nope, d_rope, d_v = llm.qk_nope_head_dim, llm.qk_rope_head_dim, llm.v_head_dim
        if llm.q_lora_rank is None:
            q_macs = h * n * (d_nope + d_rope)
        else:
            q_macs = llm.q_lora_rank * (h + n * (d_nope + d_rope) + 1)
        kv_macs = llm.kv_lora_rank * (h + n * (d_nope + d_v) + 1) + h * d_rope
        out_macs = n * d_v * h
        core_macs = seq_length * n * (d_nope + d_rope) + seq_length * n * d_v
    core_layers = float(num_layers)
    if causal:
        core_macs /= 2  # only the lower triangle of the score matrix is computed
        window = llm.sliding_window
        if window is not None and window < seq_length:
            # sliding layers keep the band of width w: (s^2 - (s - w)^2) / 2 of s^2 / 2 scores
            band = 1.0 - (1.0 - window / seq_length) ** 2
            sliding = sum(llm.layer_slides(i) for i in range(llm.num_layers))
            core_layers = num_layers - sliding * (1.0 - band)

    moe = llm.num_experts is not None
    # Megatron-LM: the MTP layers are of the last decoder layer's kind
    num_moe_layers = llm.num_moe_layers + (mtp if llm.moe_layer_freq[-1] == 1 else 0)
    num_dense_layers = num_layers - num_moe_layers
    # Megatron-LM: 2 GEMMs per MLP (h -> ffn, ffn -> h) scaled by 3/2 for SwiGLU = 3 h*ffn MACs.
    mlp_unit = 2 * GATED_LINEAR_MULTIPLIER * h
    dense_macs = num_dense_layers * mlp_unit * llm.ffn_hidden_size
    routed_macs = (
        num_moe_layers * mlp_unit * llm.moe_ffn_hidden_size * llm.moe_router_topk if moe else 0.0
    )
    shared_macs = (
        num_moe_layers * mlp_unit * llm.moe_ffn_hidden_size * llm.num_shared_experts
        if moe
        else 0.0
    )

    f = float(TRAIN_FLOPS_PER_MAC)
    return {
        "attn_q": f * num_layers * q_macs,
        "attn_kv": f * num_layers * kv_macs,
        "attn_out": f * num_layers * out_macs,
        "attn_core": f * core_layers * core_macs,
        "mlp_dense": f * dense_macs,
        "mlp_routed": f * routed_macs,
        "mlp_shared": f * shared_macs,
        "logits": f * h * vocab * (1 + mtp),
        "mtp": f * mtp * (3 * h + 2 * h * h),
    }


def llm_flops_per_token(
    llm: LLMConfig,
    seq_length: int,
    causal: bool = True,
    padded_vocab_size: int | None = None,
) -> float:
    """Training FLOPs (forward + backward) per token: Megatron-LM's
    ``num_floating_point_operations(args, batch_size) / (batch_size * seq_length)``.

    See :func:`llm_flops_breakdown_per_token` for the terms and arguments.
    """
    return sum(llm_flops_breakdown_per_token(llm, seq_length, causal, padded_vocab_size).values())


def model_flops(
    llm: LLMConfig,
    num_tokens: int,
    seq_length: int,
    causal: bool = True,
    padded_vocab_size: int | None = None,
) -> float:
    """Training FLOPs of ``num_tokens`` tokens in sequences of ``seq_length``.

    For a step of ``global_batch_size`` sequences, ``num_tokens = global_batch_size * seq_length``
    gives Megatron-LM's ``num_floating_point_operations(args, global_batch_size)``.
    """
    if num_tokens < 0:
        raise ValueError(f"num_tokens={num_tokens} must be >= 0")
    return num_tokens * llm_flops_per_token(llm, seq_length, causal, padded_vocab_size)


def packed_model_flops(
    llm: LLMConfig,
    total_real_tokens: int,
    seqlen_squared_sum: int,
    padded_vocab_size: int | None = None,
) -> float:
    """Training FLOPs of packed (THD) micro-batches, as Megatron-LM's THD path counts them:
    token-linear terms times the real token count ``sum_i L_i``, core attention (causal) times
    ``sum_i L_i^2`` over the real documents. Padding costs nothing here.

    With one document of length ``s`` per sequence this equals :func:`model_flops`.
    """
    if total_real_tokens < 0 or seqlen_squared_sum < 0:
        raise ValueError("total_real_tokens and seqlen_squared_sum must be >= 0")
    per_token = llm_flops_breakdown_per_token(llm, seq_length=1, causal=True,
                                              padded_vocab_size=padded_vocab_size)
    core_per_l2 = per_token.pop("attn_core")  # at s = 1 this is the coefficient of L^2
    return total_real_tokens * sum(per_token.values()) + seqlen_squared_sum * core_per_l2


def document_length_stats(cu_seqlens) -> tuple[int, int]:
    """``(sum_i L_i, sum_i L_i^2)`` of the real documents given cumulative real lengths."""
    lengths = [b - a for a, b in zip(list(cu_seqlens)[:-1], list(cu_seqlens)[1:])]
    return int(sum(lengths)), int(sum(n * n for n in lengths))


def vision_patch_stats(grid_thw, merge_size: int = 4) -> tuple[int, int, int]:
    """``(patch_sum, patch_squared_sum, merged_token_sum)`` of MoonViT items ``[t, h, w]``.

    One attention sequence per item: MoonViT-3D attends across all ``t*h*w`` patches of a video
    chunk, so an item contributes ``(t*h*w)^2`` (Bridge's Qwen ViT attends per frame and counts
    ``t*(h*w)^2``). The 2x2 merger pools frames, so an item yields ``h*w/merge_size`` LLM tokens
    (Bridge: ``t*h*w/merge``).
    """
    patch_sum = patch_sq = merged = 0
    for t, h, w in (tuple(int(x) for x in row) for row in grid_thw):
        if min(t, h, w) < 1:
            raise ValueError(f"grid_thw rows must be >= 1, got {(t, h, w)}")
        n = t * h * w
        patch_sum, patch_sq, merged = patch_sum + n, patch_sq + n * n, merged + h * w // merge_size
    return patch_sum, patch_sq, merged


def vit_flops_from_patch_stats(
    vision: VisionConfig,
    projector_output_size: int,
    patch_sum: int,
    patch_squared_sum: int,
    merged_token_sum: int,
) -> float:
    """Training FLOPs of MoonViT + Kimi projector, Megatron-Bridge's way.

    Bridge (``vit_flops_from_patch_stats``), forward, times 3 for training::

        depth * ((8 h^2 + 4 h I) * patch_sum + 4 h * patch_squared_sum)
        + merged * (2 (h m)^2 + 2 (h m) out)

    with ``h`` the ViT width, ``I`` its MLP width, ``m`` the merge unit (4) and ``out`` the LLM
    width: qkv + output projections (4 h^2 MACs), a two-matrix MLP (2 h I MACs), bidirectional
    ``QK^T`` and ``PV`` (2 h L^2 MACs per item, no causal halving) and the projector's two linears
    on the merged tokens (the Kimi projector: ``4608 -> 4608 -> out``). Like Bridge, the patch
    convolution, norms, RoPE and softmax are not counted.
    """
    h, inter = vision.hidden_size, vision.ffn_hidden_size
    merged_hidden = h * vision.merge_kernel_height * vision.merge_kernel_width
    transformer = vision.num_layers * (
        (8 * h**2 + 4 * h * inter) * patch_sum + 4 * h * patch_squared_sum)
    merger = merged_token_sum * (2 * merged_hidden**2 + 2 * merged_hidden * projector_output_size)
    return 3.0 * (transformer + merger)


def vit_flops(vision: VisionConfig, projector_output_size: int, grid_thw) -> float:
    """Training FLOPs of the tower + projector for media items ``grid_thw`` (``[M, 3]``)."""
    merge = vision.merge_kernel_height * vision.merge_kernel_width
    return vit_flops_from_patch_stats(vision, projector_output_size,
                                      *vision_patch_stats(grid_thw, merge))


def mfu(tflops_per_s_per_device: float, peak_tflops: float) -> float:
    """Model FLOPs utilisation as a fraction (0.4 = 40%).

    Args:
        tflops_per_s_per_device: achieved model TFLOP/s of one device (model FLOPs of the step
            divided by step time and device count).
        peak_tflops: the device's dense peak for the compute dtype (H100 bf16: 989).
    """
    if peak_tflops <= 0:
        raise ValueError(f"peak_tflops={peak_tflops} must be > 0 (H100 bf16 dense: 989)")
    return tflops_per_s_per_device / peak_tflops
