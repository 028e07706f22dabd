"""Worker for test_glm_llm_layouts.py: the GLM LLM options in parallel layouts against one process,
text only, on an identical padded packed batch with 3-axis M-RoPE ids that differ per axis.

Two tiny LLMs (fp32, dropout 0, AdamW): ``glm45`` -- GQA with q/k/v bias, partial rotary 0.5,
NeoX M-RoPE, a dense first layer then sigmoid-routed MoE with expert bias and a shared expert, and
one MTP layer trained with loss weight 0.3 (so the MTP path carries gradient); ``glm41`` -- dense,
sandwich norms, interleaved M-RoPE; and ``vlm_mtp``, the tiny Kimi VLM (``tiny_vlm_cpu``, 2 LLM
layers) with one MTP layer at weight 0.3 on ``vlm_cases``' media batches (its LLM receives the
whole sequence's ids under CP). Two micro-batches of :data:`SEQ` tokens, documents padded to
:data:`PAD_TO` (= 2*cp*tp); each document is text, an ``h x w`` block with GLM's ids (t = s,
h = s + row, w = s + col, the next text at s + max(h, w)) and text.

``torchrun --nproc-per-node=2 glm_llm_worker.py OUT``: rank 0 first runs each model's one-process
reference alone (in a world of one process: it also saves the initial weights the layouts load),
then both ranks run every case of :data:`CASES`. Each case records the loss and every gradient
(whole, globally named) of step 1, the grad norms of two steps and the parameters after them.
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
from megatron.core import parallel_state as ps

sys.path.insert(0, str(Path(__file__).resolve().parent))
import vlm_cases  # noqa: E402
from vlm_cases import save_results, whole  # noqa: E402
from vlm_worker import log  # noqa: E402

from megatron_vlm.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from megatron_vlm.config import apply_overrides  # noqa: E402
from megatron_vlm.config.model import LLMConfig  # noqa: E402
from megatron_vlm.data.contract import PackedBatch  # noqa: E402
from megatron_vlm.data.packing import pack_documents  # noqa: E402
from megatron_vlm.optim.builder import build_optimizer  # noqa: E402
from megatron_vlm.optim.schedules import build_scheduler  # noqa: E402
from megatron_vlm.parallel.init import destroy_distributed, init_distributed  # noqa: E402
from megatron_vlm.recipes import get_recipe  # noqa: E402
from megatron_vlm.training.model_setup import build_model_chunks  # noqa: E402
from megatron_vlm.training.trainer import run_forward_backward  # noqa: E402

SEQ = 64
PAD_TO = 8
PAD_ID = 0
VOCAB = 1024
STEPS = 2
# Documents of (text before, (h, w) block, text after).
MICRO_BATCHES = [[(5, (2, 3), 7), (3, (3, 2), 9)], [(4, (2, 2), 10), (12, (1, 1), 11)]]

COMMON = [f"data.seq_length={SEQ}", f"data.pad_to_multiple={PAD_TO}",
          f"data.global_batch_size={len(MICRO_BATCHES)}", "optim.schedule=constant",
          "optim.warmup_steps=0", "optim.optimizer=adamw", "optim.lr=3e-3", "train.steps=10",
          "train.seed=1234"]
TP2 = ["parallel.tp=2", "parallel.sequence_parallel=true"]
CASES = {
    # TP + SP with EP over the same two ranks (expert TP 1): qkv bias, sandwich / MTP norms on
    # sequence slices, column-parallel eh_proj, experts split over EP
    ("glm45", "tp2_sp_ep2"): [*TP2, "parallel.ep=2", "parallel.etp=1"],
    ("glm45", "pp2"): ["parallel.pp=2"],  # MTP on the last stage, with its own embedding copy
    ("glm45", "cp2"): ["parallel.cp=2"],  # M-RoPE and the MTP roll on CP shares
    ("glm41", "tp2_sp"): TP2,
    ("glm41", "cp2"): ["parallel.cp=2"],
    # the tiny Kimi VLM with an MTP layer: its LLM gets the whole sequence's ids under CP
    ("vlm_mtp", "cp2"): ["parallel.cp=2"],
    ("vlm_mtp", "tp2_sp"): TP2,  # ... and scatters its merged embeddings over SP itself
    ("vlm_mtp", "pp2"): ["parallel.pp=2"],  # tower on stage 0, MTP on stage 1
}
VLM_COMMON = ["model.llm.num_layers=2", f"model.llm.vocab_size={vlm_cases.VOCAB}",
              f"data.seq_length={vlm_cases.SEQ}", f"data.pad_to_multiple={vlm_cases.PAD_TO}",
              "data.global_batch_size=4", "model.llm.mtp_num_layers=1",
              "model.llm.mtp_loss_weight=0.3"]


def glm45_llm() -> LLMConfig:
    return LLMConfig(
        attention="gqa", vocab_size=VOCAB, hidden_size=64, num_layers=4, num_attention_heads=4,
        num_query_groups=2, kv_channels=32, add_qkv_bias=True, ffn_hidden_size=96,
        num_dense_layers=1, num_experts=4, moe_router_topk=2, num_shared_experts=1,
        moe_ffn_hidden_size=32, moe_router_score_function="sigmoid",
        moe_router_topk_scaling_factor=1.0, moe_router_enable_expert_bias=True,
        moe_token_dispatcher="alltoall", rope_theta=1e4, position_embedding="mrope",
        mrope_section=[2, 3, 3], rotary_fraction=0.5, norm_epsilon=1e-5,
        max_position_embeddings=256, mtp_num_layers=1, mtp_loss_weight=0.3)


def glm41_llm() -> LLMConfig:
    return LLMConfig(
        attention="gqa", vocab_size=VOCAB, hidden_size=64, num_layers=2, num_attention_heads=4,
        num_query_groups=2, kv_channels=32, add_qkv_bias=True, ffn_hidden_size=96,
        num_dense_layers=2, num_experts=None, rope_theta=1e4, position_embedding="mrope",
        mrope_section=[2, 3, 3], mrope_style="interleaved", rotary_fraction=0.5,
        sandwich_norms=True, norm_epsilon=1e-5, max_position_embeddings=256)


LLMS = {"glm45": glm45_llm, "glm41": glm41_llm}
MODELS = [*LLMS, "vlm_mtp"]


def glm_ids(before: int, block: tuple[int, int], after: int) -> np.ndarray:
    """``[3, n]`` ids of text, an ``h x w`` block and text by GLM's rule."""
    h, w = block
    rows = [np.arange(before)] * 3
    s = before
    rows = [np.concatenate([r, b]) for r, b in zip(rows, (
        np.full(h * w, s), s + np.repeat(np.arange(h), w), s + np.tile(np.arange(w), h)))]
    nxt = s + max(h, w)
    return np.stack([np.concatenate([r, np.arange(nxt, nxt + after)]) for r in rows])


def make_batch(docs: list, seed: int) -> PackedBatch:
    g = torch.Generator().manual_seed(seed)
    ids = [glm_ids(*doc) for doc in docs]
    tokens = [torch.randint(3, VOCAB, (x.shape[1],), generator=g).tolist() for x in ids]
    batch = pack_documents(tokens, SEQ, PAD_ID, PAD_TO)
    cu = batch.cu_seqlens_padded.tolist()
    out = np.zeros((3, SEQ), dtype=np.int64)
    for x, start, end in zip(ids, cu[:-1], cu[1:]):  # padding continues from 1 + max
        out[:, start:start + x.shape[1]] = x
        first = int(x.max()) + 1
        out[:, start + x.shape[1]:end] = np.arange(first, first + end - start - x.shape[1])
    out[:, cu[-1]:] = np.arange(SEQ - cu[-1])
    batch.mrope_position_ids = torch.from_numpy(out)
    return batch


def all_batches(model: str) -> list[PackedBatch]:
    if model == "vlm_mtp":
        return vlm_cases.all_batches()
    return [make_batch(docs, seed=300 + i) for i, docs in enumerate(MICRO_BATCHES)]


def setup(model: str, overrides: list[str], out: Path):
    if model == "vlm_mtp":
        job = apply_overrides(get_recipe("tiny_vlm_cpu"), [
            *COMMON, *VLM_COMMON, f"train.output_dir={out / model}", *overrides])
    else:
        job = get_recipe("tiny_text_cpu")
        job = dataclasses.replace(job, model=dataclasses.replace(job.model, llm=LLMS[model]()))
        job = apply_overrides(job, [*COMMON, f"train.output_dir={out / model}", *overrides])
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    init_distributed(job.parallel, job.train.seed)
    chunks = build_model_chunks(job)
    optimizer = build_optimizer(job.optim, chunks, job.model.params_dtype,
                                job.parallel.use_distributed_optimizer)
    return job, chunks, optimizer, build_scheduler(job.optim, optimizer, job.train.steps)


def _swiglu_whole(grads: dict[str, torch.Tensor], tp: int, model: str) -> dict[str, torch.Tensor]:
    """``vlm_cases.whole`` regroups TP-gathered SwiGLU ``linear_fc1`` (``[gate_r; up_r]`` per
    rank) only under the VLM's ``language_model.`` prefix: do it for the bare LLMs' names."""
    if tp == 1 or model == "vlm_mtp":
        return grads
    out = {}
    for name, t in grads.items():
        if name.endswith("linear_fc1.weight") and ".local_experts." not in name:
            parts = t.chunk(2 * tp, dim=0)  # [g0; u0; g1; u1; ...]
            t = torch.cat(parts[0::2] + parts[1::2])
        out[name] = t
    return out


def step(chunks, optimizer, scheduler, batches, probe=None):
    for c in chunks:
        c.zero_grad_buffer()
    optimizer.zero_grad()
    total = run_forward_backward(chunks, batches, batches[0].seq_length, forward_only=False)
    extra = probe() if probe is not None else None
    _, grad_norm, _ = optimizer.step()
    scheduler.step(increment=1)
    return (total[0] / total[1]).item(), float(grad_norm), extra


def run_case(model: str, overrides: list[str], out: Path) -> dict:
    job, chunks, optimizer, scheduler = setup(model, overrides, out)
    load_checkpoint(out / model / "init" / "step_0000000", chunks, None, None,
                    load_optimizer=False)
    batches = all_batches(model)
    tp = job.parallel.tp
    params0 = _swiglu_whole(whole(chunks, "param"), tp, model)
    loss, norm, grads = step(chunks, optimizer, scheduler, batches,
                             probe=lambda: _swiglu_whole(whole(chunks, "grad"), tp, model))
    norms = [norm] + [step(chunks, optimizer, scheduler, batches)[1] for _ in range(STEPS - 1)]
    return {"loss": loss, "grad_norms": norms, "grads": grads, "params0": params0,
            "params_end": _swiglu_whole(whole(chunks, "param"), tp, model)}


def references(out: Path) -> dict:
    """Rank 0 alone, in a world of one process: each model's initial weights and its case."""
    if os.environ["RANK"] != "0":
        return {}
    saved = {k: os.environ.pop(k) for k in ("WORLD_SIZE", "TORCHELASTIC_USE_AGENT_STORE")
             if k in os.environ}
    try:
        results = {}
        for model in MODELS:
            job, chunks, _, _ = setup(model, [], out)
            save_checkpoint(out / model / "init", 0, chunks, None, None, {}, job.to_yaml())
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
