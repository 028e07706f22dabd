"""InternVL3.5 recipes: InternVL3.5-8B (Qwen3-8B) and InternVL3.5-30B-A3B (Qwen3-30B-A3B)
pretraining at 32,768 packed tokens with the report's 1 : 2.5 text : multimodal mix, laid out for
H100 80 GB (issue 21, item 4).

Sizes are ``../shared/FAMILIES.md`` §3 and the released ``OpenGVLab/InternVL3_5-*-HF``
``config.json`` files as transformers 5.25's ``InternVLConfig`` reads them (the mapping is
``hf_config.model_from_hf``; ``tests/planning/test_internvl_recipes.py`` holds every model field
equal to it): InternViT-300M (24 layers, 1024 wide, 16 heads, GELU 4096, LayerNorm 1e-6, qkv
bias, layer scale), pixel shuffle 0.5 and ``mlp1`` (LayerNorm(4096) -> 4096 -> H -> H); Qwen3-8B
(36 layers, 4096 wide, 32 query / 8 key-value heads of 128, per-head q/k RMSNorm, no bias, SwiGLU
12288, RoPE base 1e6, 40,960 positions, vocab 151,936, untied head) and Qwen3-30B-A3B (48 layers,
2048 wide, 32 query / 4 key-value heads of 128, every layer MoE: 128 experts of 768, top-8
softmax with ``norm_topk_prob`` (top-k then softmax), no shared expert, no expert bias). Plain
1D RoPE: 32K packs fit the released 40,960 positions, so no RoPE change. Each layout was chosen
with the layout planner (``tools/plan_parallel.py``; ``megatron_vlm/planning``) among those that
fit in 80 GB at the full ViT patch budget (why, in each docstring), and the test re-checks that
it fits and that the quoted estimate is the planner's.

Common to both recipes:

* AdamW (learning rates, batches and step counts ours: the report states none we can check),
  bf16 params with fp32 masters, the flat DistributedOptimizer; TP with sequence parallelism;
  the tower replicated over TP (``split``: each 448-px tile encoded on one rank). 128 packs of
  32K = 4.2M tokens per step.
* The mix (``INTERNVL_MIX``) in LLM tokens over the corpus's dataset names: ``text`` 1 :
  multimodal 2.5 (the InternVL3.5 report's pretraining ratio), the multimodal share split
  ``image_caption`` 1, ``image_qa`` 0.5, ``interleaved`` 0.5, ``video`` 0.5 (the split is ours),
  over datasets under ``data.multimodal.root``. A tokenizer and data root are required
  (``data.require_inputs``): the InternVL3.5 tokenizer, whose ``<img>`` / ``</img>`` /
  ``<IMG_CONTEXT>`` ids the run reads from it.
* Patch budget: 2 ViT patches per LLM token per pack (65,536 = 64 tiles = 16,384 image tokens
  of the 32K), half of an all-image pack (pixel shuffle 0.5 makes one token of 4 patches; the
  tower also attends over one CLS token per tile, which the planner counts). Images: 1..12
  tiles + thumbnail (13,312 patches, ``image_max_patches``); videos: one tile per frame at 2
  fps, at most 64 frames (16,384 tokens: videos are not fitted, so one must leave its pack
  room for its text; ``media.py``).

Not here: a tiny CPU recipe (the family does not declare one yet), InternVL3.5-20B-A4B
(GPT-OSS) and the InternViT-6B sizes.

Imports only ``megatron_vlm.config`` and the family's ``config`` (stdlib + config).
"""

from __future__ import annotations

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
from megatron_vlm.families.internvl.config import internvit_300m_config, internvl_projector_config

#: recipe name -> number of H100 80 GB GPUs its parallel layout is for.
H100_GPUS: dict[str, int] = {
    "internvl3_5_8b": 64,
    "internvl3_5_30b_a3b": 64,
}

#: Text : multimodal = 1 : 2.5 in LLM tokens (module docstring).
INTERNVL_MIX = StageMix(
    weights={"text": 1.0, "image_caption": 1.0, "image_qa": 0.5, "interleaved": 0.5,
             "video": 0.5},
    unit="tokens")

#: Pack length and ViT patch budget per pack (2 patches per LLM token).
SEQ_LENGTH = 32768
PATCHES = 2 * SEQ_LENGTH

#: Video frames per sample: 256 LLM tokens each, half a pack at most.
MAX_VIDEO_FRAMES = 64


def qwen3_8b_llm() -> LLMConfig:
    """Qwen3-8B as InternVL3.5-8B runs it (module docstring; ``Qwen3Config`` of the release)."""
    return LLMConfig(
        attention="gqa", vocab_size=151936, hidden_size=4096, num_layers=36,
        num_attention_heads=32, num_query_groups=8, kv_channels=128, qk_layernorm=True,
        add_qkv_bias=False, ffn_hidden_size=12288, num_experts=None, num_dense_layers=36,
        rope_theta=1e6, position_embedding="rope", norm_epsilon=1e-6, untie_embeddings=True,
        max_position_embeddings=40960,
    )


def qwen3_30b_a3b_llm() -> LLMConfig:
    """Qwen3-30B-A3B as InternVL3.5-30B-A3B runs it (``Qwen3MoeConfig`` of the release): every
    layer MoE, softmax router with top-k then softmax (``norm_topk_prob``), the load-balancing
    loss at Qwen3's ``router_aux_loss_coef`` 1e-3 (no expert bias), all-to-all dispatch."""
    return LLMConfig(
        attention="gqa", vocab_size=151936, hidden_size=2048, num_layers=48,
        num_attention_heads=32, num_query_groups=4, kv_channels=128, qk_layernorm=True,
        add_qkv_bias=False, ffn_hidden_size=6144, num_dense_layers=0, num_experts=128,
        moe_router_topk=8, num_shared_experts=0, moe_ffn_hidden_size=768,
        moe_router_score_function="softmax", moe_router_pre_softmax=False,
        moe_router_topk_scaling_factor=1.0, moe_router_enable_expert_bias=False,
        moe_aux_loss_coeff=1e-3, moe_token_dispatcher="alltoall", rope_theta=1e6,
        position_embedding="rope", norm_epsilon=1e-6, untie_embeddings=True,
        max_position_embeddings=40960,
    )


def _internvl(*, name: str, llm: LLMConfig, parallel: ParallelConfig, lr: float,
              steps: int) -> JobConfig:
    vision = internvit_300m_config()
    model = ModelConfig(family="internvl", llm=llm, vision=vision,
                        projector=internvl_projector_config(vision, llm.hidden_size),
                        params_dtype="bf16")
    return JobConfig(
        name=name,
        model=model,
        parallel=parallel,
        data=DataConfig(
            seq_length=SEQ_LENGTH, global_batch_size=128, require_inputs=True,
            pad_to_multiple=2 * parallel.cp * parallel.tp if parallel.cp > 1 else 1,
            multimodal=MultimodalDataConfig(
                stage="internvl", mixes={**default_mixes(), "internvl": INTERNVL_MIX},
                max_patches_per_micro_batch=PATCHES, image_max_patches=13 * 1024,
                video_fps=2.0, video_max_frames=MAX_VIDEO_FRAMES, num_workers=4)),
        optim=OptimConfig(optimizer="adamw", lr=lr, min_lr=lr / 10, weight_decay=0.05,
                          warmup_steps=200, schedule="cosine"),
        train=TrainConfig(steps=steps, eval_interval=1000, log_interval=10,
                          output_dir=f"runs/{name}"),
        checkpoint=CheckpointConfig(save_interval=500, async_save=True),
    )


def internvl3_5_8b() -> JobConfig:
    """InternVL3.5-8B pretraining at 32K, global batch 128, all parameters, on 64 H100:
    tp2 pp1 cp4 (dp8), no recompute.

    Why: 8.2B LLM + 0.3B tower + ``mlp1``: bf16 weights and fp32 gradients alone are ~51 GB, and
    a 32K pack's activations far more, so no GPU holds a replica with its pack. CP=4 gives each
    rank 8K tokens of the pack (the CP ring carries K and V of 8 key-value heads); TP=2 with SP
    halves weights, gradients and the remaining activations inside a node; the flat
    DistributedOptimizer shards AdamW's state over dp=8. No pipeline (no bubble; the tower would
    sit on stage 0). The planner's first of 124 fitting layouts, 0.7% faster than tp1 pp2 vpp4
    cp8 (66.6 GiB) and 3% faster than tp4 cp2 (48.4 GiB). Planned: 59.7 GiB on the busiest rank,
    10.70 s per step, 53% MFU (55% math efficiency assumed); the GiB are params 8.2, fp32 grads
    16.5, optimizer 1.5 (fp32 masters 0.5, AdamW 1.0), activations 33.4 (with the tower at the
    full patch budget). 128 x 32K = 4.2M tokens per step; 64K ViT patches per pack.
    """
    return _internvl(name="internvl3_5_8b", llm=qwen3_8b_llm(),
                     parallel=ParallelConfig(tp=2, pp=1, cp=4, sequence_parallel=True,
                                             use_distributed_optimizer=True),
                     lr=2e-5, steps=20_000)


def internvl3_5_30b_a3b() -> JobConfig:
    """InternVL3.5-30B-A3B pretraining at 32K, global batch 128, all parameters, on 64 H100:
    tp2 pp1 cp4 ep8 etp1 (dp8), no recompute.

    Why: 30.5B LLM parameters (3.35B active per token), 29B of them in the experts, + the 0.3B
    tower: bf16 weights and fp32 gradients are ~185 GB, so the experts must be split. EP=8 puts
    16 of each layer's 128 experts on a GPU (etp1: each expert whole; the 8 EP ranks are the tp2
    x cp4 ranks of one node, so the all-to-all stays inside it); CP=4 and TP=2 with SP split the
    32K pack (8K tokens per CP rank) and the dense weights as for the 8B; the optimizer state is
    sharded over dp=8. The planner's first of 333 fitting layouts, 2% faster than tp1 pp2 vpp2
    cp8 ep8 (68.9 GiB). Planned: 72.2 GiB on the busiest rank (1.8 GiB of the 74 usable to
    spare), 8.98 s per step, 50% MFU (55% math efficiency assumed); the GiB are params 8.8, fp32
    grads 17.6, optimizer 5.4 (fp32 masters 1.8, AdamW 3.6), activations 40.4. 128 x 32K = 4.2M
    tokens per step; 64K ViT patches per pack.
    """
    return _internvl(name="internvl3_5_30b_a3b", llm=qwen3_30b_a3b_llm(),
                     parallel=ParallelConfig(tp=2, pp=1, cp=4, ep=8, etp=1,
                                             sequence_parallel=True,
                                             use_distributed_optimizer=True),
                     lr=2e-5, steps=20_000)


RECIPES = {
    "internvl3_5_8b": internvl3_5_8b,
    "internvl3_5_30b_a3b": internvl3_5_30b_a3b,
}
"""The InternVL family's recipes (``megatron_vlm.recipes.get_recipe`` finds them by name)."""
