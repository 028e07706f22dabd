"""Keye-VL 1.5 recipes: the report's stage 3 (multi-task pretraining at 8K, all parameters) and
stage 4 (annealing 8K -> 32K -> 128K with context parallelism, RoPE base 1e6 -> 8e6), laid out
for H100 80 GB, and a tiny CPU recipe of the same shape.

Sizes are FAMILIES.md §1 (released code over the paper): SigLIP-so400m-384-14 tower, the 1.5
merger (LayerNorm(4608) after the 2x2 merge, 4608 -> 4608 -> 4096), Qwen3-8B (36 layers, 4096
wide, 32 query / 8 key-value heads of 128, SwiGLU 12288, per-head q/k RMSNorm, no bias, vocab
151,936, untied head) with M-RoPE. Each real-size layout was chosen with the layout planner
(``tools/plan_parallel.py``; ``megatron_vlm/planning``) among those that fit in 80 GB at the
full ViT patch budget (why, in each docstring), and ``tests/planning/test_keye_recipes.py``
re-checks that it fits and that the quoted estimate is the planner's.

Common to the real recipes:

* AdamW (the learning rates, batches and step counts are ours: the report gives none per
  stage), bf16 params with fp32 masters, the flat DistributedOptimizer; TP with sequence
  parallelism; the tower replicated over TP (``split``: each frame encoded on one rank).
* Patch budget: 2 ViT patches per LLM token per pack (an all-image pack would need 4: Keye's
  merger makes one token of 4 patches), items of at most 4,096 patches (1,024 tokens) per image
  and 3,072 per video frame (768 tokens, ``keye-vl-utils``' per-frame ceiling).
* The mix is stated in LLM tokens (``StageMix(unit="tokens")``): video 24%, image 50%, text
  26% (the report's annealing mix) over three datasets named ``video``, ``image`` and ``text``
  under ``data.multimodal.root``; stage 3 uses the same split (the report names its stage 3
  data kinds but no ratio).
* A tokenizer and data root are required (``data.require_inputs``): Qwen3's tokenizer with
  Keye's special tokens, whose ids the run reads from it (``model.token_ids``).

Imports only ``megatron_vlm.config``, the family's ``config`` (stdlib + config) and
``megatron_vlm.recipes.stages``.
"""

from __future__ import annotations

import dataclasses

from megatron_vlm.config import (
    CheckpointConfig,
    DataConfig,
    JobConfig,
    LLMConfig,
    ModelConfig,
    MultimodalDataConfig,
    OptimConfig,
    ParallelConfig,
    StageMix,
    TrainConfig,
)
from megatron_vlm.config.data_mm import default_mixes
from megatron_vlm.families.keye.config import (
    KeyeMergerConfig,
    SiglipVisionConfig,
    keye_merger_config,
    keye_vision_config,
)
from megatron_vlm.recipes.stages import abf_long_context

#: recipe name -> number of H100 80 GB GPUs its parallel layout is for.
H100_GPUS: dict[str, int] = {
    "keye_vl_1_5_8b": 64,
    "keye_vl_1_5_8b_anneal_32k": 64,
    "keye_vl_1_5_8b_anneal_128k": 64,
}

#: The report's annealing mix in LLM tokens, video : image : text = 24 : 50 : 26.
KEYE_MIX = StageMix(weights={"video": 0.24, "image": 0.50, "text": 0.26}, unit="tokens")

#: Stage 3's checkpoints: where the 32K annealing starts from (``checkpoint.init_from``).
STAGE3_CHECKPOINTS = "runs/keye_vl_1_5_8b/checkpoints"
#: The 32K annealing's checkpoints: where the 128K annealing starts from.
ANNEAL_32K_CHECKPOINTS = "runs/keye_vl_1_5_8b_anneal_32k/checkpoints"


def qwen3_8b_llm(rope_theta: float = 1e6) -> LLMConfig:
    """Qwen3-8B with M-RoPE as Keye-VL 1.5 runs it.

    ``mrope_section`` [16, 24, 24] (t, h, w frequencies of the 64 a 128-dim head has) is
    Qwen2.5-VL's: FAMILIES.md marks Keye's own value unverified (U) -- read the checkpoint's
    ``config.json`` (``rope_scaling.mrope_section``) before importing released weights.
    """
    return LLMConfig(
        attention="gqa", vocab_size=151936, hidden_size=4096, num_layers=36,
        num_attention_heads=32, num_query_groups=8, kv_channels=128, qk_layernorm=True,
        add_qkv_bias=False, ffn_hidden_size=12288, num_experts=None, num_dense_layers=36,
        rope_theta=rope_theta, position_embedding="mrope", mrope_section=[16, 24, 24],
        norm_epsilon=1e-6, untie_embeddings=True, max_position_embeddings=40960,
    )


def _adamw(lr: float, warmup: int) -> OptimConfig:
    return OptimConfig(optimizer="adamw", lr=lr, min_lr=lr / 10, weight_decay=0.1,
                       warmup_steps=warmup, schedule="cosine")


def _keye_8b(*, name: str, seq: int, parallel: ParallelConfig, global_batch: int, patches: int,
             recompute: str, steps: int) -> JobConfig:
    llm = dataclasses.replace(qwen3_8b_llm(), recompute=recompute,
                              max_position_embeddings=max(40960, seq))
    model = ModelConfig(family="keye", llm=llm, vision=keye_vision_config(),
                        projector=keye_merger_config(llm.hidden_size), params_dtype="bf16")
    return JobConfig(
        name=name,
        model=model,
        parallel=parallel,
        data=DataConfig(
            seq_length=seq, global_batch_size=global_batch, require_inputs=True,
            pad_to_multiple=2 * parallel.cp * parallel.tp if parallel.cp > 1 else 1,
            multimodal=MultimodalDataConfig(
                stage="keye", mixes={**default_mixes(), "keye": KEYE_MIX},
                max_patches_per_micro_batch=patches, image_max_patches=4096,
                video_chunk_max_patches=3072, num_workers=4)),
        optim=_adamw(lr=2e-5, warmup=200),
        train=TrainConfig(steps=steps, eval_interval=1000, log_interval=10,
                          output_dir=f"runs/{name}"),
        checkpoint=CheckpointConfig(save_interval=500, async_save=True),
    )


def _anneal(job: JobConfig, *, global_batch: int, steps: int, recompute: str) -> JobConfig:
    """An annealing stage's batch, length, recompute and run directory (``abf_long_context``
    sets the model, pack length, CP and ``init_from``)."""
    data = dataclasses.replace(job.data, global_batch_size=global_batch)
    llm = dataclasses.replace(job.model.llm, recompute=recompute)
    train = dataclasses.replace(job.train, steps=steps, output_dir=f"runs/{job.name}")
    return dataclasses.replace(job, model=dataclasses.replace(job.model, llm=llm), data=data,
                               train=train)


def keye_vl_1_5_8b() -> JobConfig:
    """Keye-VL 1.5-8B stage 3, multi-task pretraining at 8K, all parameters, on 64 H100:
    tp2 pp1 cp1 (dp32), no LLM recompute.

    Why: 8.2B LLM + 0.4B tower + merger: bf16 weights and fp32 gradients are ~52 GiB whole, so
    one GPU holds a replica only with CP splitting its 8K pack; TP=2 with SP halves weights,
    gradients and activations instead, and the flat DistributedOptimizer shards AdamW's 12 bytes
    per parameter over dp=32. No pipeline (no bubble; the tower would unbalance stage 0). The
    planner ranks this 2nd of 152 fitting layouts, 1% slower than tp1 cp4 (66.9 GiB, 2K tokens
    per CP rank). Planned: 61.1 GiB on the busiest rank, 7.54 s per step, 53% MFU (55% math
    efficiency assumed); the GiB are params 8.4, fp32 grads 16.9, optimizer 1.6, activations
    34.2.
    512 x 8K = 4.2M tokens per step; 16K ViT patches per pack.
    """
    return _keye_8b(name="keye_vl_1_5_8b", seq=8192,
                    parallel=ParallelConfig(tp=2, pp=1, cp=1, sequence_parallel=True,
                                            use_distributed_optimizer=True),
                    global_batch=512, patches=16384, recompute="none", steps=20_000)


def keye_vl_1_5_8b_anneal_32k() -> JobConfig:
    """Keye-VL 1.5-8B stage 4a, annealing at 32K with RoPE base 8e6 (ABF), from stage 3's
    weights, on 64 H100: tp2 pp1 cp4 (dp8), no LLM recompute.

    Why: a 4x longer pack is 4x the activations per sequence; CP=4 gives each rank 8K tokens
    (stage 3's load per GPU: the same activations, full GEMMs), TP and optimizer as stage 3
    (their shards reshard over DP). The RoPE base rises 1e6 -> 8e6 (the report's ABF); it
    changes no tensor, so ``checkpoint.init_from`` takes stage 3's checkpoint as is. The
    planner's first of 110 fitting layouts. Planned: 61.1 GiB on the busiest rank, 10.29 s per
    step, 53% MFU. 128 x 32K = 4.2M tokens per step; 64K ViT patches per pack.
    """
    job = abf_long_context(keye_vl_1_5_8b(), STAGE3_CHECKPOINTS, seq_length=32768,
                           rope_theta=8e6, cp=4, name="keye_vl_1_5_8b_anneal_32k",
                           patches=65536)
    return _anneal(job, global_batch=128, steps=2_000, recompute="none")


def keye_vl_1_5_8b_anneal_128k() -> JobConfig:
    """Keye-VL 1.5-8B stage 4b, annealing at 128K (RoPE base 8e6) from the 32K stage's
    weights, on 64 H100: tp8 pp1 cp4 (dp2), no LLM recompute.

    Why: 4K tokens per GPU (TP=8 with SP inside a node, CP=4 across 4 nodes: the CP ring
    carries K and V of the 8 key-value heads only, over the network). The planner's first of 28
    layouts that fit without recompute, and faster than every layout with full recompute (best:
    tp4 cp2, 70.9 GiB, 27.6 s). Planned: 44.6 GiB on the busiest rank, 23.05 s per step, 49% MFU.
    32 x 128K = 4.2M tokens per step; 256K ViT patches per pack.
    """
    job = abf_long_context(keye_vl_1_5_8b_anneal_32k(), ANNEAL_32K_CHECKPOINTS,
                           seq_length=131072, rope_theta=8e6, cp=4, tp=8,
                           name="keye_vl_1_5_8b_anneal_128k", patches=262144)
    return _anneal(job, global_batch=32, steps=1_000, recompute="none")


def tiny_keye_cpu() -> JobConfig:
    """A tiny Keye-shaped VLM on the bundled multimodal corpus (CPU, fp32, one process): a
    2-layer Qwen3-style LLM (GQA 4 query / 2 key-value heads of 16, q/k RMSNorm, M-RoPE
    sections [2, 3, 3]) with the tiny bundled vocabulary (1,024 SentencePiece ids + the media
    special tokens, padded to 1,152), a 2-layer SigLIP tower (width 32, 4 heads, 16x16 position
    table) and the 1.5 merger: 300 steps of 3 packs (512 tokens, <= 2048 ViT patches each),
    ~2 minutes on 2 CPU cores. Tuned so that the vision path carries what the captions need
    within that budget (issue 19's probes, ``tests/e2e/test_keye_pretrain.py``), frame order
    included:

    - video frames of 2x2 LLM tokens (56x56 px: ``video_frame_min_patches=16`` lowers Keye's
      floor of 48 tokens, which would upscale the corpus's 112 px frames to 196 px = 49 tokens;
      a real Keye run keeps the floor) at 1 fps (4-6 frames of the 4-6 s clips): the moving
      shape fills the token it is in, so where it is in the first frame (the caption's "moves
      from the <left>") is one token's content. With 49-token frames the direction word stayed
      at ~1.2 nats (uniform over 4 is 1.39) true and reversed alike, also at 400 steps.
    - the corpus's ``alignment`` datasets at 60% video, 40% image captions (LLM tokens): the
      two datasets the probes measure, weighted towards the order-dependent one.
    - 300 steps of 3 packs rather than 200 of 4 (~10% more tokens): Keye encodes each frame on
      its own, so the order reaches the model only through each frame's timestamp text and the
      M-RoPE start of its block, and the LLM has to learn to compare blocks; that is learnt
      abruptly at some step, later for some seeds. Measured (Intel Xeon, one thread, direction
      word in nats, true vs reversed frames): seed 1 0.14 vs 3.68, seed 2 0.10 vs 5.14; at 250
      steps seed 1 0.38 vs 2.62 but seed 2 not yet (0.70 vs 0.74, the axis only: ln 2 = 0.69);
      200 x 4 at 30% video: axis only (0.73 vs 0.80); 400 x 4 at 30% video: 0.20 vs 3.29.
    - Muon at lr 1e-2 (as ``tiny_cpu``; AdamW for embeddings, head, norms, biases), seed 1.

    Pixels (16 held-out batches, true vs media shuffled between samples): image captions 0.290
    vs 0.510, videos 0.053 vs 0.313 (seed 2: 0.283 vs 0.501, 0.052 vs 0.335).
    """
    llm = LLMConfig(
        attention="gqa", vocab_size=1152, hidden_size=64, num_layers=2, num_attention_heads=4,
        num_query_groups=2, kv_channels=16, qk_layernorm=True, ffn_hidden_size=192,
        num_experts=None, num_dense_layers=2, rope_theta=1e6, position_embedding="mrope",
        mrope_section=[2, 3, 3], untie_embeddings=True, max_position_embeddings=1024)
    vision = SiglipVisionConfig(hidden_size=32, num_layers=2, num_attention_heads=4,
                                ffn_hidden_size=64, patch_size=14, pos_emb_side=16)
    projector = KeyeMergerConfig(vision_hidden_size=32, merge_size=4, output_size=64)
    return JobConfig(
        name="tiny_keye_cpu",
        model=ModelConfig(family="keye", llm=llm, vision=vision, projector=projector,
                          params_dtype="fp32"),
        parallel=ParallelConfig(),
        data=DataConfig(
            seq_length=512, global_batch_size=3, tokenizer_vocab_size=1024,
            multimodal=MultimodalDataConfig(
                stage="alignment", num_workers=1,
                mixes={**default_mixes(),
                       "alignment": StageMix(weights={"image_caption": 0.4, "video": 0.6})},
                max_patches_per_micro_batch=2048, image_max_patches=256,
                video_chunk_max_patches=16, video_frame_min_patches=16, video_fps=1.0)),
        optim=OptimConfig(optimizer="muon", lr=1e-2, min_lr=1e-3, warmup_steps=10,
                          schedule="cosine"),
        train=TrainConfig(steps=300, eval_interval=150, eval_batches=4, log_interval=10,
                          output_dir="runs/tiny_keye_cpu", peak_tflops=0.1, seed=1),
        checkpoint=CheckpointConfig(save_interval=150),
    )


RECIPES = {
    "keye_vl_1_5_8b": keye_vl_1_5_8b,
    "keye_vl_1_5_8b_anneal_32k": keye_vl_1_5_8b_anneal_32k,
    "keye_vl_1_5_8b_anneal_128k": keye_vl_1_5_8b_anneal_128k,
    "tiny_keye_cpu": tiny_keye_cpu,
}
"""The Keye family's recipes (``megatron_vlm.recipes.get_recipe`` finds them by name)."""
