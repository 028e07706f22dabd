"""GLM-4.5V / GLM-4.1V recipes: GLM-4.5V pretraining at 8,192 packed tokens with a global batch
of 1,536 (``../shared/FAMILIES.md`` §2's seed recipe), its long-context stage at 32,768 with
context parallelism 4 from the 8K stage's weights, GLM-4.1V-9B at 8K, laid out for H100 80 GB,
and a tiny CPU recipe of GLM-4.5V's shape.

Sizes are FAMILIES.md §2 and transformers 5.25's ``Glm4vMoeConfig`` / ``Glm4vConfig`` (code over
the paper): the Glm4v tower (24 layers, 1536 wide, 12 heads, SwiGLU 4096, 2-frame Conv3d) and
its projector (2x2 downsample conv, merger SwiGLU 13696: transformers' default for both, GLM-4.5V
(U)); GLM-4.5V's LLM is GLM-4.5-Air (46 layers, 4096 wide, 96 query / 8 key-value heads of 128
with qkv bias, layer 0 dense SwiGLU 10944, then 128 routed experts of 1408 top-8 + 1 shared,
sigmoid router with expert bias, scale 1, partial rotary 0.5 with NeoX M-RoPE [8, 12, 12], vocab
151,552, untied head, 1 MTP layer built at loss weight 0 so released weights load and export).
The RoPE base is transformers' default 1e4 (FAMILIES.md marks GLM-4.5V's own value (U): read the
checkpoint's ``config.json`` before importing released weights). Each real-size layout was chosen
with the layout planner (``tools/plan_parallel.py``; ``megatron_vlm/planning``) among those that
fit in 80 GB at the full ViT patch budget (why, in each docstring), and
``tests/planning/test_glm_recipes.py`` re-checks that it fits and that the quoted estimate is the
planner's.

Common to the real recipes:

* AdamW (learning rates, step counts ours: no GLM pretraining recipe is published), bf16 params
  with fp32 masters, the flat DistributedOptimizer; TP with sequence parallelism inside a node;
  the tower replicated over TP (``split``: each temporal patch encoded on one rank).
* Patch budget: ``data.multimodal.max_patches_per_micro_batch`` counts the packer's patches, i.e.
  both frames of every temporal patch (``(2, h, w)`` items, ``2*h*w`` each; the tower's Conv3d
  folds them to ``h*w``, which make ``h*w/4`` LLM tokens): 4 per LLM token per pack, i.e. half
  of an all-image pack (which needs 8). The planner reads the budget as tower patches
  (``planning/costs.VisionBudget``), so its vision work and memory are those of an all-image
  pack: an upper bound, twice the tower work these packs can hold.
* Items: images of at most 4,096 tower patches (1,024 tokens, ~900 x 900 px); a video at most
  6,144 LLM tokens (``slowfast.max_video_tokens``, GLM's per-video pixel bound): GLM videos are
  not fitted into a pack, so one video must fit the 8K pack with its text.
* The mix is the corpus's ``joint`` stage in LLM tokens (video 24%, image 50%, text 26%) over
  datasets under ``data.multimodal.root``; a tokenizer and data root are required
  (``data.require_inputs``): GLM's tokenizer, whose media token ids the run reads from it.

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
from megatron_vlm.config.data_mm import SlowFastConfig, default_mixes
from megatron_vlm.families.glm.config import (
    GlmMergerConfig,
    GlmVisionConfig,
    glm_merger_config,
    glm_vision_config,
)
from megatron_vlm.recipes.stages import abf_long_context

#: recipe name -> number of H100 80 GB GPUs its parallel layout is for.
H100_GPUS: dict[str, int] = {
    "glm45v": 256,
    "glm45v_long_32k": 256,
    "glm41v_9b": 64,
}

#: The 8K stage's checkpoints: where the 32K stage starts from (``checkpoint.init_from``).
GLM45V_CHECKPOINTS = "runs/glm45v/checkpoints"

#: Steps of the tiny CPU recipe (a checkpoint at its middle and end).
TINY_STEPS = 130

#: The tiny recipe's mix in LLM tokens: the bundled corpus's captioned images and videos, half
#: and half (what its vision probes measure).
TINY_MIX = StageMix(weights={"image_caption": 0.5, "video": 0.5}, unit="tokens")

#: LLM token budget of one video at 8K (GLM's videos are not fitted: one must fit a pack).
MAX_VIDEO_TOKENS_8K = 6144


def glm45_air_llm() -> LLMConfig:
    """GLM-4.5-Air as GLM-4.5V runs it (module docstring; transformers ``Glm4vMoeTextConfig``
    with vocab 151,552 and 1 MTP layer)."""
    return LLMConfig(
        attention="gqa", vocab_size=151552, hidden_size=4096, num_layers=46,
        num_attention_heads=96, num_query_groups=8, kv_channels=128, qk_layernorm=False,
        add_qkv_bias=True, ffn_hidden_size=10944, num_dense_layers=1, num_experts=128,
        moe_router_topk=8, num_shared_experts=1, moe_ffn_hidden_size=1408,
        moe_router_score_function="sigmoid", moe_router_topk_scaling_factor=1.0,
        moe_router_enable_expert_bias=True, rope_theta=10000.0, position_embedding="mrope",
        mrope_section=[8, 12, 12], mrope_style="neox", rotary_fraction=0.5, norm_epsilon=1e-5,
        untie_embeddings=True, max_position_embeddings=65536, mtp_num_layers=1,
        mtp_loss_weight=0.0,
    )


def glm4_9b_llm() -> LLMConfig:
    """GLM-4-9B as GLM-4.1V-9B runs it (transformers ``Glm4vTextConfig``): 40 layers, 4096 wide,
    32 query / 2 key-value heads of 128 with qkv bias, SwiGLU 13696, sandwich norms, partial
    rotary 0.5 with interleaved M-RoPE [8, 12, 12], vocab 151,552, untied head."""
    return LLMConfig(
        attention="gqa", vocab_size=151552, hidden_size=4096, num_layers=40,
        num_attention_heads=32, num_query_groups=2, kv_channels=128, qk_layernorm=False,
        add_qkv_bias=True, ffn_hidden_size=13696, num_dense_layers=40, num_experts=None,
        rope_theta=10000.0, position_embedding="mrope", mrope_section=[8, 12, 12],
        mrope_style="interleaved", rotary_fraction=0.5, sandwich_norms=True, norm_epsilon=1e-5,
        untie_embeddings=True, max_position_embeddings=65536,
    )


def _adamw(lr: float, warmup: int) -> OptimConfig:
    return OptimConfig(optimizer="adamw", lr=lr, min_lr=lr / 10, weight_decay=0.1,
                       warmup_steps=warmup, schedule="cosine")


def _glm(*, name: str, llm: LLMConfig, seq: int, parallel: ParallelConfig, global_batch: int,
         patches: int, steps: int) -> JobConfig:
    model = ModelConfig(family="glm", llm=llm, vision=glm_vision_config(),
                        projector=glm_merger_config(llm.hidden_size), params_dtype="bf16")
    return JobConfig(
        name=name,
        model=model,
        parallel=parallel,
        data=DataConfig(
            seq_length=seq, global_batch_size=global_batch, require_inputs=True,
            pad_to_multiple=2 * parallel.cp * parallel.tp if parallel.cp > 1 else 1,
            multimodal=MultimodalDataConfig(
                stage="joint", max_patches_per_micro_batch=patches, image_max_patches=4096,
                video_chunk_max_patches=2048, video_fps=2.0, num_workers=4,
                slowfast=SlowFastConfig(max_video_tokens=MAX_VIDEO_TOKENS_8K))),
        optim=_adamw(lr=1e-4, warmup=500),
        train=TrainConfig(steps=steps, eval_interval=1000, log_interval=10,
                          output_dir=f"runs/{name}"),
        checkpoint=CheckpointConfig(save_interval=500, async_save=True),
    )


def glm45v() -> JobConfig:
    """GLM-4.5V pretraining at 8K, global batch 1,536, all parameters, on 256 H100: tp8 pp2
    cp1 ep8 etp1 (dp16), no recompute.

    Why: 106B LLM parameters (12B active per token) + the 0.9B tower: bf16 weights and fp32
    gradients alone are ~640 GB, so every GPU must hold a small slice. EP=8 spreads each MoE
    layer's 128 experts 16 per GPU (etp1: each expert whole, the all-to-all inside a node); TP=8
    with SP cuts attention (96 heads, 8 key-value groups: one per rank), the dense layer, the
    shared expert and the 8K pack's activations; PP=2 halves the layers per GPU; the flat
    DistributedOptimizer shards AdamW's state over dp=16. Megatron splits the 46 layers evenly
    (23 | 23, the tower on stage 0): the MTP layer on the last stage rules out a custom
    ``pipeline_layout`` (megatron wants it marked ``m``, which ``config/parallel.py`` does not
    parse yet), and the planner's balanced 18 | 28 split of this layout would take 14.62 s.
    Among the 112 layouts that fit with megatron's even split, the planner ranks this 2nd, 5%
    slower than tp4 pp2 cp2 (72.8 GiB: 1.2 GiB to spare) and without CP at 8K; the 32K stage
    keeps it and adds CP=4 (the same 8K tokens per GPU). Planned: 70.8 GiB on the busiest rank,
    15.94 s per step, 40% MFU (55% math efficiency assumed); the GiB are params 13.6, fp32 grads
    27.2, optimizer 5.1, activations 24.9 (stage 0, with the tower at the full budget: an upper
    bound, module docstring). 1,536 x 8K = 12.6M tokens per step.
    """
    return _glm(name="glm45v", llm=glm45_air_llm(), seq=8192,
                parallel=ParallelConfig(tp=8, pp=2, cp=1, ep=8, etp=1, sequence_parallel=True,
                                        use_distributed_optimizer=True),
                global_batch=1536, patches=32768, steps=50_000)


def glm45v_long_32k() -> JobConfig:
    """GLM-4.5V long-context stage at 32K from the 8K stage's weights, on 256 H100: tp8 pp2
    cp4 ep8 etp1 (dp4), no recompute.

    Why: CP=4 gives each rank 8K tokens of a 32K pack (the 8K stage's load per GPU: the same
    activations, full GEMMs); TP, PP, EP as the 8K stage (the checkpoint's shards, the optimizer
    resharded over dp=4). GLM-4.5V is configured for 65,536 positions, so the RoPE base stays
    (``abf_long_context`` with the same ``rope_theta``: longer packs only). Global batch 384
    keeps 12.6M tokens per step. A video may take 4x the 8K stage's tokens (24,576). The
    planner's first of 118 layouts that fit with megatron's even split. Planned: 70.8 GiB on the
    busiest rank, 24.60 s per step, 43% MFU. 128K ViT patches per pack.
    """
    job = abf_long_context(glm45v(), GLM45V_CHECKPOINTS, seq_length=32768, rope_theta=10000.0,
                           cp=4, name="glm45v_long_32k", patches=131072)
    mm = dataclasses.replace(job.data.multimodal,
                             slowfast=SlowFastConfig(max_video_tokens=4 * MAX_VIDEO_TOKENS_8K))
    data = dataclasses.replace(job.data, global_batch_size=384, multimodal=mm)
    train = dataclasses.replace(job.train, steps=2_000, output_dir=f"runs/{job.name}")
    return dataclasses.replace(job, data=data, train=train)


def glm41v_9b() -> JobConfig:
    """GLM-4.1V-9B (dense) pretraining at 8K, global batch 1,536, all parameters, on 64 H100:
    tp2 pp1 cp2 (dp16), no recompute.

    Why: 9.4B LLM + 0.9B tower: bf16 weights and fp32 gradients (~62 GB) need two GPUs per
    replica; TP is at most 2 (2 key-value groups), so CP=2 splits the 8K pack's activations
    (4K tokens per rank); no pipeline (no bubble, no tower imbalance). The planner ranks it 2nd
    of 32 fitting layouts, 0.4% slower than tp1 pp2 cp4 (53.5 GiB). Planned: 57.2 GiB on the
    busiest rank, 31.71 s per step, 54% MFU; the GiB are params 10.3, fp32 grads 20.5,
    optimizer 1.9, activations 24.5. 1,536 x 8K = 12.6M tokens per step.
    """
    return _glm(name="glm41v_9b", llm=glm4_9b_llm(), seq=8192,
                parallel=ParallelConfig(tp=2, pp=1, cp=2, sequence_parallel=True,
                                        use_distributed_optimizer=True),
                global_batch=1536, patches=32768, steps=50_000)


def tiny_glm_cpu() -> JobConfig:
    """A tiny GLM-4.5V-shaped VLM on the bundled multimodal corpus (CPU, fp32, one process): a
    2-layer GLM-4.5-Air-style LLM (layer 0 dense SwiGLU, layer 1 MoE with 4 experts of 48 top-2
    + 1 shared, sigmoid router with expert bias; GQA 4 query / 2 key-value heads of 32 with qkv
    bias; partial rotary 0.5 with NeoX M-RoPE sections [2, 3, 3] over the 16 rotated dims; no
    sandwich norms, no MTP) with the tiny bundled vocabulary (1,024 SentencePiece ids + GLM's 6
    media tokens, padded to 1,152), a 2-layer Glm4v tower (width 32, 4 heads, SwiGLU 64, 2-frame
    Conv3d, 16x16 position table) and the projector (2x2 downsample conv into the LLM width,
    merger SwiGLU 128): 130 steps of 4 packs (512 tokens). Tuned so that the vision path carries
    what the captions need within ~100 s (the probes of ``tests/e2e/test_glm_pretrain.py``):

    - the mix ``tiny_glm``: captioned images and videos half and half in LLM tokens (with the
      corpus's ``alignment`` split, 70% images / 30% videos, a 3-layer version at 2 fps read
      video pixels only weakly in 200 steps: shuffled / true held-out loss 1.22 for videos, 1.49
      for images);
    - videos at 1 fps (GLM's default 2: 2-3 temporal patches of the 4-6 s clips instead of 4-6,
      so more clips per step), images upscaled to at least 64 tower patches (112x112 px, 16
      tokens; GLM's floor would leave the corpus's 56-px images 9 tokens), at most 256;
    - a 2-layer LLM with 4 experts (3 layers and 8 experts: ~15% slower per step, no better
      probes at 120-130 steps); Muon at lr 1e-2 (2e-2 read video pixels worse), seed 1. A
      1.5x wider tower (48) gave no better probes (1.26x images, 1.56x videos).

    Measured (Intel Xeon, one thread, 16 held-out batches; the machine shared): image captions
    0.331 true vs 0.444 shuffled (1.34x), videos 0.116 vs 0.209 (1.80x) (seed 2: 1.28x and
    1.62x); ~115 CPU-seconds for the training process and its loader worker. Images read less
    than videos at this budget (the captions name every shape's colour and cell). Frame order
    is not learnt (the direction word ~1.33 nats with the true and with reversed frames; uniform
    over 4 is 1.39).
    """
    llm = LLMConfig(
        attention="gqa", vocab_size=1152, hidden_size=64, num_layers=2, num_attention_heads=4,
        num_query_groups=2, kv_channels=32, add_qkv_bias=True, ffn_hidden_size=192,
        num_dense_layers=1, num_experts=4, moe_router_topk=2, num_shared_experts=1,
        moe_ffn_hidden_size=48, moe_router_score_function="sigmoid",
        moe_router_topk_scaling_factor=1.0, moe_router_enable_expert_bias=True,
        moe_router_bias_update_rate=1e-2, moe_token_dispatcher="alltoall", rope_theta=10000.0,
        position_embedding="mrope", mrope_section=[2, 3, 3], mrope_style="neox",
        rotary_fraction=0.5, norm_epsilon=1e-5, untie_embeddings=True,
        max_position_embeddings=1024)
    vision = GlmVisionConfig(hidden_size=32, num_layers=2, num_attention_heads=4,
                             ffn_hidden_size=64, patch_size=14, temporal_patch_size=2,
                             pos_emb_side=16)
    projector = GlmMergerConfig(vision_hidden_size=32, merge_size=4, output_size=64,
                                ffn_hidden_size=128)
    return JobConfig(
        name="tiny_glm_cpu",
        model=ModelConfig(family="glm", llm=llm, vision=vision, projector=projector,
                          params_dtype="fp32"),
        parallel=ParallelConfig(),
        data=DataConfig(
            seq_length=512, global_batch_size=4, tokenizer_vocab_size=1024,
            multimodal=MultimodalDataConfig(stage="tiny_glm",
                                            mixes={**default_mixes(), "tiny_glm": TINY_MIX},
                                            num_workers=1, max_patches_per_micro_batch=4096,
                                            image_min_patches=64, image_max_patches=256,
                                            video_chunk_max_patches=256, video_fps=1.0)),
        optim=OptimConfig(optimizer="muon", lr=1e-2, min_lr=1e-3, warmup_steps=10,
                          schedule="cosine"),
        train=TrainConfig(steps=TINY_STEPS, eval_interval=TINY_STEPS // 2, eval_batches=4,
                          log_interval=10, output_dir="runs/tiny_glm_cpu", peak_tflops=0.1,
                          seed=1),
        checkpoint=CheckpointConfig(save_interval=TINY_STEPS // 2),
    )


RECIPES = {
    "glm45v": glm45v,
    "glm45v_long_32k": glm45v_long_32k,
    "glm41v_9b": glm41v_9b,
    "tiny_glm_cpu": tiny_glm_cpu,
}
"""The GLM family's recipes (``megatron_vlm.recipes.get_recipe`` finds them by name)."""
