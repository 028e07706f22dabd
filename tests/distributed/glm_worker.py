"""Worker for test_glm_layouts.py: the whole GLM VLM (``families/glm``: Glm4v tower, downsample
+ merger projector, GLM LLM) in parallel layouts against one process, on an identical padded
packed GLM batch written by the family's own data path.

Two tiny models (fp32, dropout 0, AdamW pinned): ``glm45v`` -- the GLM-4.5V shape: GQA with q/k/v
bias, partial rotary 0.5, NeoX M-RoPE, a dense first layer then sigmoid-routed MoE with expert bias
and a shared expert, one MTP layer trained at loss weight 0.3 (so the MTP path carries gradient);
``glm41v`` -- the GLM-4.1V shape: dense, sandwich norms, interleaved M-RoPE. Both share the tower
(2 layers of 32, 4x4 position table sampled bicubically) and projector sizes.

The batch (two micro-batches of :data:`SEQ` tokens, documents padded to :data:`PAD_TO` = 2*cp*tp
up to cp = tp = 2): documents of :data:`DOCUMENTS` written by GLM's template
(``families/glm/media.glm_tokenize``: begin/end-of-image wrappers, ``<|image|>`` placeholders,
video wrappers and ``str(int(ts))`` after each temporal patch) with a character tokenizer that
carries GLM's six media tokens, packed by ``data/mm_packing.pack_tokenized`` with GLM's position
rule (``families/glm/positions.glm_position_ids``). Micro-batch 0: two images of different sizes
(4x6 and 8x4 patches) in one document, a video of 2 temporal patches (4x4) in another; micro-batch
1: an image and a 2-patch video (2x8) in one document, and text only. Media items are ``(2, h,
w)`` in frames (an image duplicated to 2 frames), as the data side packs them.

``torchrun --nproc-per-node=2 glm_worker.py OUT``: rank 0 first runs each model's one-process
reference alone (in a world of one process: it also saves the initial weights the layouts load,
since TP init draws per-rank RNG), plus the controls (the same weights and batch with wrong M-RoPE
ids: 1D, and h/w swapped); then both ranks run every case of :data:`CASES` (megatron's groups
rebuilt per case). Each case records the loss and every gradient (whole, globally named) of step
1, the grad norms of two steps, the parameters after them, the loss of a forward pass after them,
and which temporal patches each rank's tower encoded. Rank 0 writes ``OUT/all.pt``.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from pathlib import Path

import torch
from megatron.core import parallel_state as ps

sys.path.insert(0, str(Path(__file__).resolve().parent))
from vlm_cases import (  # noqa: E402
    gather_dp_sharded_grads,
    gather_item_logs,
    my_batches,
    save_results,
    whole,
)
from vlm_worker import log  # noqa: E402

from megatron_vlm.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from megatron_vlm.config import apply_overrides  # noqa: E402
from megatron_vlm.config.model import LLMConfig, ModelConfig  # noqa: E402
from megatron_vlm.data.contract import PackedBatch  # noqa: E402
from megatron_vlm.data.image import ProcessedImage  # noqa: E402
from megatron_vlm.data.kimi_tokenizer import SpecialTokensTokenizer  # noqa: E402
from megatron_vlm.data.mm_packing import pack_tokenized  # noqa: E402
from megatron_vlm.data.templates import Text  # noqa: E402
from megatron_vlm.data.video import VideoChunk  # noqa: E402
from megatron_vlm.families.glm.config import GlmMergerConfig, GlmVisionConfig  # noqa: E402
from megatron_vlm.families.glm.media import (  # noqa: E402
    GLM_SPECIAL_TOKENS,
    glm_token_ids,
    glm_tokenize,
)
from megatron_vlm.families.glm.positions import glm_position_ids  # noqa: E402
from megatron_vlm.optim.builder import build_optimizer  # noqa: E402
from megatron_vlm.optim.schedules import build_scheduler  # noqa: E402
from megatron_vlm.parallel.init import destroy_distributed, init_distributed  # noqa: E402
from megatron_vlm.recipes import get_recipe  # noqa: E402
from megatron_vlm.training.model_setup import build_model_chunks, unwrap  # noqa: E402
from megatron_vlm.training.trainer import run_forward_backward  # noqa: E402

SEQ = 96
PAD_TO = 8
VOCAB = 128
STEPS = 2


class _Chars:
    """A tiny text tokenizer: one id per character below 120; GLM's six media tokens follow at
    122..127 (``SpecialTokensTokenizer``)."""

    vocab_size, eos_id, pad_id = 122, 120, 121

    def encode(self, text: str) -> list[int]:
        return [ord(c) % 120 for c in text]


TOK = SpecialTokensTokenizer(_Chars(), GLM_SPECIAL_TOKENS)
IDS = glm_token_ids(TOK)


def _pixels(frames: int, h: int, w: int, seed: int, duplicate: bool) -> torch.Tensor:
    """Raster patches ``[frames*h*w, 3, 14, 14]``; ``duplicate``: the second frame repeats the
    first (an image, as GLM's processor makes it)."""
    gen = torch.Generator().manual_seed(seed)
    if duplicate:
        one = torch.randn(h * w, 3, 14, 14, generator=gen)
        return torch.cat([one, one])
    return torch.randn(frames * h * w, 3, 14, 14, generator=gen)


def image(h: int, w: int, seed: int) -> ProcessedImage:
    """An image item ``(2, h, w)`` in frames (the duplicated frame)."""
    return ProcessedImage(_pixels(2, h, w, seed, True), (2, h, w), (h * 14, w * 14),
                          (h * 14, w * 14))


def video(h: int, w: int, seconds: list[float], seed: int) -> list[VideoChunk]:
    """A video: one ``(2, h, w)`` item per temporal patch, starting at ``seconds``."""
    return [VideoChunk(_pixels(2, h, w, seed + i, False), (2, h, w), s, (s, s + 0.5),
                       chunk_index=i) for i, s in enumerate(seconds)]


# One micro-batch per entry: documents as GLM's template takes them.
DOCUMENTS = [
    [[Text("look: "), image(4, 6, 1), Text(" and "), image(8, 4, 2), Text(" what differs?")],
     [Text("clip "), video(4, 4, [0.0, 3.0], 3), Text(" what happens?")]],
    [[image(6, 4, 5), Text("then"), video(2, 8, [0.0, 12.0], 6), Text(" same?")],
     [Text("a plain text document")]],
]

COMMON = [f"data.seq_length={SEQ}", f"data.pad_to_multiple={PAD_TO}",
          f"data.global_batch_size={len(DOCUMENTS)}", "optim.schedule=constant",
          "optim.warmup_steps=0", "optim.optimizer=adamw", "optim.lr=3e-3", "train.steps=10",
          "train.seed=1234"]
TP2 = ["parallel.tp=2", "parallel.sequence_parallel=true"]
CASES = {
    # TP + SP with EP over the same two ranks (expert TP 1): tower split over TP (each temporal
    # patch on one rank), merger SwiGLU and qkv bias TP-sharded, MTP on sequence slices (it
    # scatters its own embeddings: the VLM scatters the merged ones itself), experts over EP
    ("glm45v", "tp2_sp_ep2"): [*TP2, "parallel.ep=2", "parallel.etp=1"],
    # tower + merger on stage 0, M-RoPE ids on both stages, MTP on the last stage with its copy
    # of the embedding (synced through the VLM)
    ("glm45v", "pp2"): ["parallel.pp=2"],
    # merged embeddings and their M-RoPE ids split per document over CP; the MTP layer cuts the
    # whole sequence's ids and position ids to its CP share
    ("glm45v", "cp2"): ["parallel.cp=2"],
    # EP over the data-parallel ranks (DP = 2, one micro-batch each): experts split, the dense
    # parameters' gradients averaged over DP
    ("glm45v", "ep2_dp2"): ["parallel.ep=2"],
    ("glm41v", "tp2_sp"): TP2,  # sandwich norms on sequence slices
    # TP inside the tower: every temporal patch on both ranks, one sharded pass
    ("glm41v", "tp2_sp_vit_tp"): [*TP2, "model.vision.parallel_mode=tp"],
    ("glm41v", "cp2"): ["parallel.cp=2"],
}


def glm45v_llm() -> LLMConfig:
    return LLMConfig(
        attention="gqa", vocab_size=VOCAB, hidden_size=64, num_layers=4, num_attention_heads=4,
        num_query_groups=2, kv_channels=32, add_qkv_bias=True, ffn_hidden_size=96,
        num_dense_layers=1, num_experts=4, moe_router_topk=2, num_shared_experts=1,
        moe_ffn_hidden_size=32, moe_router_score_function="sigmoid",
        moe_router_topk_scaling_factor=1.0, moe_router_enable_expert_bias=True,
        moe_token_dispatcher="alltoall", rope_theta=1e4, position_embedding="mrope",
        mrope_section=[2, 3, 3], mrope_style="neox", rotary_fraction=0.5, norm_epsilon=1e-5,
        untie_embeddings=True, max_position_embeddings=256, mtp_num_layers=1,
        mtp_loss_weight=0.3)


def glm41v_llm() -> LLMConfig:
    return LLMConfig(
        attention="gqa", vocab_size=VOCAB, hidden_size=64, num_layers=2, num_attention_heads=4,
        num_query_groups=2, kv_channels=32, add_qkv_bias=True, ffn_hidden_size=96,
        num_dense_layers=2, num_experts=None, rope_theta=1e4, position_embedding="mrope",
        mrope_section=[2, 3, 3], mrope_style="interleaved", rotary_fraction=0.5,
        sandwich_norms=True, norm_epsilon=1e-5, untie_embeddings=True,
        max_position_embeddings=256)


LLMS = {"glm45v": glm45v_llm, "glm41v": glm41v_llm}


def glm_model(model: str) -> ModelConfig:
    """The tiny GLM VLM ``model`` (module docstring)."""
    vision = GlmVisionConfig(hidden_size=32, num_layers=2, num_attention_heads=2,
                             ffn_hidden_size=48, pos_emb_side=4)
    projector = GlmMergerConfig(vision_hidden_size=32, output_size=64, ffn_hidden_size=48)
    return ModelConfig(family="glm", llm=LLMS[model](), vision=vision, projector=projector,
                       params_dtype="fp32")


def make_batch(docs: list) -> PackedBatch:
    """One packed micro-batch of ``docs`` (GLM's template, GLM's M-RoPE ids)."""
    samples = [glm_tokenize(doc, TOK, IDS, markers_loss=True) for doc in docs]
    return pack_tokenized(samples, SEQ, TOK.pad_id, PAD_TO, position_rule=glm_position_ids)


def all_batches() -> list[PackedBatch]:
    return [make_batch(docs) for docs in DOCUMENTS]


def setup(model: str, overrides: list[str], out: Path):
    """(Re)build megatron's groups for this layout; the model, optimizer and scheduler."""
    job = get_recipe("tiny_glm_cpu")
    job = dataclasses.replace(job, model=glm_model(model),
                              data=dataclasses.replace(job.data, seq_length=SEQ))
    job = apply_overrides(job, [*COMMON, f"train.output_dir={out / model}", *overrides])
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    init_distributed(job.parallel, job.train.seed)
    chunks = build_model_chunks(job)
    optimizer = build_optimizer(job.optim, chunks, job.model.params_dtype,
                                job.parallel.use_distributed_optimizer)
    return job, chunks, optimizer, build_scheduler(job.optim, optimizer, job.train.steps)


def whole_swiglu(chunks: list, what: str, job) -> dict[str, torch.Tensor]:
    """``vlm_cases.whole``, with the TP-gathered SwiGLU ``linear_fc1`` of the projector and, in
    ``tp`` mode, of the tower (``[gate_r; up_r]`` per rank; ``whole`` regroups only the LLM's)
    regrouped into ``[gate; up]``."""
    out = whole(chunks, what)
    tp = job.parallel.tp
    sharded = ("projector.", "vision_tower.") if job.model.vision.parallel_mode == "tp" else (
        "projector.",)
    for name, t in out.items():
        if tp > 1 and name.startswith(sharded) and name.endswith("linear_fc1.weight"):
            parts = t.chunk(2 * tp, dim=0)  # [g0; u0; g1; u1; ...]
            out[name] = torch.cat(parts[0::2] + parts[1::2])
    return out


def step(chunks, optimizer, scheduler, batches, probe=None):
    """One optimizer step; ``probe()`` runs between the gradients and the update."""
    for c in chunks:
        c.zero_grad_buffer()
    optimizer.zero_grad()
    total = run_forward_backward(chunks, batches, SEQ, forward_only=False)
    extra = probe() if probe is not None else None
    _, grad_norm, _ = optimizer.step()
    scheduler.step(increment=1)
    return (total[0] / total[1]).item(), float(grad_norm), extra


@torch.no_grad()
def forward_loss(chunks, batches) -> float:
    total = run_forward_backward(chunks, batches, SEQ, forward_only=True)
    return (total[0] / total[1]).item()


def run_case(model: str, overrides: list[str], out: Path) -> dict:
    job, chunks, optimizer, scheduler = setup(model, overrides, out)
    load_checkpoint(out / model / "init" / "step_0000000", chunks, None, None,
                    load_optimizer=False)  # strict, resharded
    _, batches = my_batches(all_batches())  # this DP rank's share (both unless ep2_dp2)
    vit = unwrap(chunks[0]).vision_tower if unwrap(chunks[0]).pre_process else None
    if vit is not None:
        vit.encoded_item_log = []
    params0 = whole_swiglu(chunks, "param", job)

    def probe():
        if job.parallel.use_distributed_optimizer:
            gather_dp_sharded_grads(chunks)
        return whole_swiglu(chunks, "grad", job)

    loss, norm, grads = step(chunks, optimizer, scheduler, batches, probe)
    items = gather_item_logs(vit, batches, job.model.vision.parallel_mode)
    if vit is not None:
        vit.encoded_item_log = None
    norms = [norm] + [step(chunks, optimizer, scheduler, batches)[1] for _ in range(STEPS - 1)]
    return {"loss": loss, "grad_norms": norms, "grads": grads, "params0": params0,
            "params_end": whole_swiglu(chunks, "param", job),
            "loss_end": forward_loss(chunks, batches), "items": items}


def controls(chunks) -> dict:
    """Loss and every gradient of the reference weights on the same batch with wrong M-RoPE ids
    (no update): ``1d`` -- 1D positions (t = h = w, the text rule on every token); ``hw_swapped``
    -- GLM's ids with the h and w axes swapped."""
    flat, swapped = all_batches(), all_batches()
    for b in flat:
        b.mrope_position_ids = None
    for b in swapped:
        b.mrope_position_ids = b.mrope_position_ids[[0, 2, 1]].contiguous()
    out = {}
    for name, batches in (("1d", flat), ("hw_swapped", swapped)):
        for c in chunks:
            c.zero_grad_buffer()
        total = run_forward_backward(chunks, batches, SEQ, forward_only=False)
        out[name] = {"loss": (total[0] / total[1]).item(), "grads": whole(chunks, "grad")}
    return out


def references(out: Path) -> dict:
    """Rank 0 alone, in a world of one process (its own private store: ``init_distributed``
    without ``WORLD_SIZE``; rank 1 waits in the launcher's rendezvous meanwhile): each model's
    initial weights, its controls and its one-process case."""
    if os.environ["RANK"] != "0":
        return {}
    # Without these two, torch would join the launcher's store as a client (rendezvous.py).
    saved = {k: os.environ.pop(k) for k in ("WORLD_SIZE", "TORCHELASTIC_USE_AGENT_STORE")
             if k in os.environ}
    try:
        results = {}
        for model in LLMS:
            job, chunks, _, _ = setup(model, [], out)
            save_checkpoint(out / model / "init", 0, chunks, None, None, {}, job.to_yaml())
            results[f"{model}/controls"] = controls(chunks)
            results[f"{model}/ref"] = run_case(model, [], out)
        return results
    finally:
        destroy_distributed()
        os.environ.update(saved)


def main() -> None:
    out = Path(sys.argv[1])
    t0 = time.perf_counter()
    results = references(out)
    for (model, name), overrides in CASES.items():
        log(f"{model} {name}")
        results[f"{model}/{name}"] = run_case(model, overrides, out)
    log(f"done in {save_results(results, out / 'all.pt', t0):.1f} s")


if __name__ == "__main__":
    main()
