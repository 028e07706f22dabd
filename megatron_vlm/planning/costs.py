"""Training FLOPs per pipeline unit: each LLM layer, the ViT + projector, the output head.

Conventions are Megatron-LM's (``training/flops.py`` re-implements its whole-model formula; the
per-layer terms here sum to exactly that total, which the tests check):

* a GEMM ``[m, n] x [n, k]`` costs ``2 m n k`` FLOPs; training is 3x the forward pass
  (forward, data-gradient, weight-gradient GEMMs), so every per-token MAC counts 6 FLOPs;
* LLM core attention runs over the configured sequence length with a causal mask (half the
  ``s x s`` scores), also for packed documents, as Megatron-LM counts it;
* the router GEMM, norms other than MLA's two latent RMSNorms, RoPE, softmax and element-wise
  work are not counted.

The ViT follows Megatron-Bridge's ``vit_flops_from_patch_stats``: per layer and patch
``8 h^2 + 4 h f`` (qkv, output projection, MLP) plus ``4 h L`` for bidirectional attention over
the item's ``L`` patches (MoonViT-3D attends over all ``t*h*w`` patches of a video chunk), and
the projector ``2 (4h)^2 + 2 (4h) H`` per merged token, all times 3 for training. Added here: the
patch-embedding convolution, ``2 * 3 * 14 * 14 * h`` per patch (Bridge leaves it out; ~0.5%).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from megatron_vlm.config.job import JobConfig
from megatron_vlm.config.model import LLMConfig
from megatron_vlm.config.vision import ProjectorConfig, VisionConfig

#: FLOPs per multiply-accumulate (2) times GEMMs per weight in a training step (3).
TRAIN_FLOPS_PER_MAC = 6.0


@dataclass(frozen=True, kw_only=True)
class VisionBudget:
    """What the vision tower encodes per micro-batch (SPEC §11: the ViT patch budget P)."""

    patches_per_micro_batch: int
    """P: ViT patches of one packed micro-batch at full budget."""
    patches_per_item: int
    """Patches one image or video chunk attends over (``t*h*w``); attention is quadratic in
    it, so planning with the largest item allowed is the conservative choice."""
    frames_per_item: int = 1
    """t of an item: a chunk of t frames gives ``patches / (t * merge)`` LLM tokens (images: 1,
    the most projector work per patch)."""
    fill: float = 1.0
    """Fraction of the patch budget an average micro-batch uses (1 = plan for full packs)."""

    def __post_init__(self) -> None:
        if self.patches_per_micro_batch < 1 or self.patches_per_item < 1:
            raise ValueError("vision budget: patches_per_micro_batch and patches_per_item must "
                             "be >= 1")
        if self.patches_per_item > self.patches_per_micro_batch:
            raise ValueError(
                f"vision budget: one item of {self.patches_per_item} patches exceeds the "
                f"micro-batch budget of {self.patches_per_micro_batch}; raise "
                "data.multimodal.max_patches_per_micro_batch or lower the per-item budget")
        if self.frames_per_item < 1 or self.patches_per_item % self.frames_per_item:
            raise ValueError(
                f"vision budget: frames_per_item={self.frames_per_item} must be >= 1 and divide "
                f"patches_per_item={self.patches_per_item}")
        if not 0.0 < self.fill <= 1.0:
            raise ValueError(f"vision budget: fill={self.fill} must be in (0, 1]")

    @property
    def num_patches(self) -> float:
        """Patches encoded per micro-batch on average."""
        return self.patches_per_micro_batch * self.fill

    def merged_tokens(self, merge_size: int) -> float:
        """LLM tokens the projector makes per micro-batch."""
        return self.num_patches / (self.frames_per_item * merge_size)

    @classmethod
    def from_job(cls, job: JobConfig, fill: float = 1.0) -> VisionBudget | None:
        """The budget a job's data config allows (None for a text-only model).

        P is ``data.multimodal.max_patches_per_micro_batch`` (4 x the sequence length when the
        job has no multimodal data config: every LLM token an image token); an item is the
        larger of one image (``image_max_patches``) and one full video chunk
        (``temporal_patch_size x video_chunk_max_patches``), capped at P.
        """
        if not job.model.is_vlm:
            return None
        vision = job.model.vision
        mm = job.data.multimodal
        if mm is None:
            budget = job.data.seq_length * vision.merge_size
            item = budget
        else:
            budget = mm.max_patches_per_micro_batch
            # a tower without temporal patches (Keye's SigLIP) encodes a video frame by frame
            item = max(mm.image_max_patches,
                       getattr(vision, "temporal_patch_size", 1) * mm.video_chunk_max_patches)
        return cls(patches_per_micro_batch=budget, patches_per_item=min(item, budget), fill=fill)


def padded_vocab(vocab_size: int, tp: int = 1) -> int:
    """Our vocabulary padding: a multiple of ``lcm(128, tp)`` (``models/llm.py::padded_vocab_size``;
    kept here without importing megatron)."""
    step = math.lcm(128, tp)
    return -(-vocab_size // step) * step


def llm_layer_flops(llm: LLMConfig, layer: int, seq_length: int) -> dict[str, float]:
    """Training FLOPs of decoder layer ``layer`` (0-based) for one micro-batch of ``seq_length``
    tokens: ``attention`` (MLA projections and latent norms, or GQA's fused qkv and output
    projections; causal core attention) and
    ``mlp`` (the dense SwiGLU for the first ``num_dense_layers``, else ``topk`` routed + the
    shared experts)."""
    if not 0 <= layer < llm.num_layers:
        raise ValueError(f"layer {layer} outside 0..{llm.num_layers - 1}")
    h, n = llm.hidden_size, llm.num_attention_heads
    if llm.attention == "gqa":
        d, g = llm.head_dim, llm.query_groups
        # fused qkv (q heads + k and v per group) and output projection; q/k norms, biases and
        # RoPE are not counted (Megatron-LM's MHA/GQA branch)
        q, kv, out = h * n * d, h * 2 * g * d, n * d * h
        core = seq_length * n * 2 * d / 2  # QK^T and PV per query head, causal: half
    else:
        d_nope, d_rope, d_v = llm.qk_nope_head_dim, llm.qk_rope_head_dim, llm.v_head_dim
        if llm.q_lora_rank is None:
            q = h * n * (d_nope + d_rope)
        else:  # down, q_a_layernorm (one MAC per element, as Megatron-LM), up
            q = llm.q_lora_rank * (h + n * (d_nope + d_rope) + 1)
        kv = llm.kv_lora_rank * (h + n * (d_nope + d_v) + 1) + h * d_rope
        out = n * d_v * h
        core = seq_length * n * (d_nope + d_rope + d_v) / 2  # causal: half the scores
    if llm.moe_layer_freq[layer]:
        mlp = 3 * h * llm.moe_ffn_hidden_size * (llm.moe_router_topk + llm.num_shared_experts)
    else:
        mlp = 3 * h * llm.ffn_hidden_size
    per_token = TRAIN_FLOPS_PER_MAC * seq_length
    return {"attention": per_token * (q + kv + out + core), "mlp": per_token * mlp}


def llm_head_flops(llm: LLMConfig, seq_length: int, tp: int = 1) -> float:
    """Training FLOPs of the output layer (logits over the padded vocabulary) per micro-batch."""
    return TRAIN_FLOPS_PER_MAC * seq_length * llm.hidden_size * padded_vocab(llm.vocab_size, tp)


def vision_flops(vision: VisionConfig, projector: ProjectorConfig,
                 budget: VisionBudget) -> dict[str, float]:
    """Training FLOPs of the vision tower and projector for one micro-batch of ``budget``.

    Returns ``patch_embed``, ``vit_linear`` (qkv, proj, MLP of every layer), ``vit_attention``
    (bidirectional core attention, quadratic per item) and ``projector``.
    """
    h, f = vision.hidden_size, vision.ffn_hidden_size
    patches = budget.num_patches
    sum_sq = patches * budget.patches_per_item  # sum over items of L^2, items of equal length
    merged = budget.merged_tokens(vision.merge_size)
    mh = projector.input_size
    return {
        "patch_embed": 3.0 * 2 * patches * vision.in_channels * vision.patch_size ** 2 * h,
        "vit_linear": 3.0 * vision.num_layers * (8 * h * h + 4 * h * f) * patches,
        "vit_attention": 3.0 * vision.num_layers * 4 * h * sum_sq,
        "projector": 3.0 * merged * (2 * mh * projector.intermediate_size
                                     + 2 * projector.intermediate_size * projector.output_size),
    }
