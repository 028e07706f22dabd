"""Worker for test_keye_layouts.py: the tiny Keye-VL 1.5 model (``tiny_keye_cpu``: SigLIP NaViT
tower with 2D RoPE, the 1.5 merger, a Qwen3 GQA LLM with M-RoPE; fp32, dropout 0) on an identical
padded packed Keye batch, in several layouts.

The batch (two micro-batches of :data:`SEQ` tokens, documents padded to :data:`PAD_TO` = 2*cp*tp
up to cp = tp = 2): micro-batch 0 is the issue's case, one document of text + an image + text and
one of text + a 2-frame video (each frame its own item, ``t = 1``, with ``<|frame|>``-and-timestamp
text tokens before each frame) + text; micro-batch 1 holds a video as ONE item of two frames
(``t = 2``: two blocks of tokens), a document starting with an image, and a text-only document.
M-RoPE ids: ``keye_position_ids`` per document (one block per image or frame) packed with
``pack_mrope_position_ids`` (padding continues the document's ids).

``torchrun --nproc-per-node=2 keye_worker.py OUT all`` (the test's one process start): rank 0
first runs the reference alone in a world of one process (:func:`reference_before_layouts`): it
builds the model, saves its initial weights (``OUT/init``; TP init draws per-rank RNG, so a
shared seed is not enough), runs the reference case from them and, as a control, the loss of the
same weights on 1D positions (M-RoPE with t = h = w); then both ranks run every case of
:data:`LAYOUTS` (megatron's groups rebuilt per layout). ``python keye_worker.py OUT reference``
runs the reference alone. Each case loads the initial checkpoint (resharded) and records the loss
and every gradient (whole, globally named) of step 1, the grad norms of two AdamW steps, the
parameters after them and the loss of a forward pass on the batch; also which frames each rank's
tower encoded. Rank 0 writes ``OUT/<role>.pt``.
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
from vlm_cases import gather_item_logs, save_results, whole  # noqa: E402
from vlm_worker import log  # noqa: E402

from megatron_vlm.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from megatron_vlm.config import apply_overrides  # noqa: E402
from megatron_vlm.data.contract import PackedBatch, VisionInputs  # noqa: E402
from megatron_vlm.data.mrope_positions import pack_mrope_position_ids  # noqa: E402
from megatron_vlm.data.packing import pack_documents  # noqa: E402
from megatron_vlm.data.templates import PlaceholderSpan, TokenizedSample  # noqa: E402
from megatron_vlm.families.keye.positions import keye_position_ids  # noqa: E402
from megatron_vlm.optim.builder import build_optimizer  # noqa: E402
from megatron_vlm.optim.schedules import build_scheduler  # noqa: E402
from megatron_vlm.parallel.init import destroy_distributed, init_distributed  # noqa: E402
from megatron_vlm.recipes import get_recipe  # noqa: E402
from megatron_vlm.training.model_setup import build_model_chunks, unwrap  # noqa: E402
from megatron_vlm.training.trainer import run_forward_backward  # noqa: E402

SEQ = 64
PAD_TO = 8
PLACEHOLDER = 1001
PAD_ID = 0
STEPS = 2

# One micro-batch per entry, documents of ("text", n) and (kind, (t, h, w)) media items, kind
# "image" or "frame" (an item of a video; consecutive frames are one video).
MICRO_BATCHES = [
    [[("text", 5), ("image", (1, 4, 6)), ("text", 7)],
     # text, then "<|frame|>" + timestamp (2 tokens) before each frame, then text
     [("text", 4), ("text", 2), ("frame", (1, 4, 4)), ("text", 2), ("frame", (1, 4, 4)),
      ("text", 5)]],
    [[("text", 4), ("frame", (2, 2, 6)), ("text", 9)],  # a 2-frame video as one item
     [("image", (1, 6, 4)), ("text", 10)],
     [("text", 12)]],
]

COMMON = [f"data.seq_length={SEQ}", f"data.pad_to_multiple={PAD_TO}",
          f"data.global_batch_size={len(MICRO_BATCHES)}", "optim.schedule=constant",
          "optim.warmup_steps=0", "train.steps=10",
          # pinned: the cases were set with these (tiny_keye_cpu's own are tuned for its probes)
          "optim.optimizer=adamw", "optim.lr=3e-3", "train.seed=1234"]
TP2 = ["parallel.tp=2", "parallel.sequence_parallel=true"]
LAYOUTS = {
    "tp2_sp": TP2,  # tower split over TP: each frame encoded on one rank
    "tp2_sp_vit_tp": [*TP2, "model.vision.parallel_mode=tp"],
    "pp2": ["parallel.pp=2"],  # tower + merger on stage 0; M-RoPE ids on both stages
    "cp2": ["parallel.cp=2"],  # merged embeddings and their M-RoPE ids split over CP
}


@dataclasses.dataclass
class _Item:
    """What ``vision_blocks`` reads of a media item: its ViT grid."""

    grid_thw: tuple[int, int, int]


def make_batch(docs: list, seed: int) -> PackedBatch:
    """One packed micro-batch from a document description (see :data:`MICRO_BATCHES`)."""
    g = torch.Generator().manual_seed(seed)
    samples, grids, starts, is_video, media_index = [], [], [], [], []
    num_media = 0
    for doc in docs:
        ids: list[int] = []
        spans: list[PlaceholderSpan] = []
        items: list[_Item] = []
        previous = "text"
        for kind, what in doc:
            if kind == "text":
                ids += torch.randint(3, 1000, (what,), generator=g).tolist()
            else:
                t, h, w = what
                n = t * h * w // 4  # Keye: every frame its own h*w/4 tokens
                spans.append(PlaceholderSpan(len(ids), n, len(items), kind == "frame"))
                items.append(_Item(what))
                grids.append(what)
                is_video.append(kind == "frame")
                # the frames of one video (consecutive frame items, text between) share a number
                num_media += 0 if kind == "frame" and previous == "frame" else 1
                media_index.append(num_media - 1)
                ids += [PLACEHOLDER] * n
            previous = kind if kind != "text" or previous != "frame" else "frame"
        samples.append(TokenizedSample(tokens=np.asarray(ids, dtype=np.int64),
                                       target_mask=np.ones(len(ids), dtype=bool),
                                       placeholder_spans=spans, items=items))
    batch = pack_documents([s.tokens.tolist() for s in samples], SEQ, PAD_ID, PAD_TO)
    doc_starts = batch.cu_seqlens_padded.tolist()
    for sample, start in zip(samples, doc_starts):
        starts += [start + span.start for span in sample.placeholder_spans]
    media = batch.tokens == PLACEHOLDER  # no loss on placeholders, nor on predicting one
    batch.loss_mask[media] = 0.0
    batch.loss_mask[:, :-1][media[:, 1:]] = 0.0
    batch.mrope_position_ids = pack_mrope_position_ids(samples, batch.cu_seqlens_padded, SEQ,
                                                       keye_position_ids)
    grid = torch.tensor(grids, dtype=torch.long)
    pixels = torch.randn(int(grid.prod(dim=1).sum()), 3, 14, 14, generator=g)
    batch.vision = VisionInputs(pixel_values=pixels, grid_thw=grid,
                                placeholder_starts=torch.tensor(starts),
                                is_video=torch.tensor(is_video),
                                media_index=torch.tensor(media_index))
    return batch


def all_batches() -> list[PackedBatch]:
    return [make_batch(docs, seed=200 + i) for i, docs in enumerate(MICRO_BATCHES)]


def setup(overrides: list[str], out: Path):
    """(Re)build megatron's groups for this layout; the model, optimizer and scheduler."""
    job = apply_overrides(get_recipe("tiny_keye_cpu"),
                          [*COMMON, f"train.output_dir={out}", *overrides])
    if ps.model_parallel_is_initialized():
        ps.destroy_model_parallel()
    init_distributed(job.parallel, job.train.seed)
    chunks = build_model_chunks(job)
    optimizer = build_optimizer(job.optim, chunks, job.model.params_dtype,
                                job.parallel.use_distributed_optimizer)
    return job, chunks, optimizer, build_scheduler(job.optim, optimizer, job.train.steps)


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


def run_case(overrides: list[str], out: Path, init: Path) -> dict:
    job, chunks, optimizer, scheduler = setup(overrides, out)
    load_checkpoint(init, chunks, None, None, load_optimizer=False)  # strict, resharded
    batches = all_batches()  # dp = 1 in every case: each rank holds both micro-batches
    vit = unwrap(chunks[0]).vision_tower if unwrap(chunks[0]).pre_process else None
    if vit is not None:
        vit.encoded_item_log = []
    params0 = whole(chunks, "param")
    loss, norm, grads = step(chunks, optimizer, scheduler, batches,
                             probe=lambda: whole(chunks, "grad"))
    logs = gather_item_logs(vit, batches, job.model.vision.parallel_mode)
    if vit is not None:
        vit.encoded_item_log = None
    norms = [norm] + [step(chunks, optimizer, scheduler, batches)[1] for _ in range(STEPS - 1)]
    return {"loss": loss, "grad_norms": norms, "grads": grads, "params0": params0,
            "params_end": whole(chunks, "param"), "loss_end": forward_loss(chunks, batches),
            "items": logs}


def reference(out: Path, init: Path) -> dict:
    """The one-process case: saves the initial weights, then runs them (and the 1D control)."""
    job, chunks, _, _ = setup([], out)
    save_checkpoint(init.parent, 0, chunks, None, None, {}, job.to_yaml())
    flat = all_batches()
    for b in flat:  # control: the same batch with 1D positions (t = h = w)
        b.mrope_position_ids = None
    return {"loss_1d": forward_loss(chunks, flat), "ref": run_case([], out, init)}


def reference_before_layouts(out: Path, init: Path) -> dict:
    """Rank 0 of the 2-rank start runs :func:`reference` alone, in a world of one process (its
    own private store: ``init_distributed`` without ``WORLD_SIZE``), then leaves it; rank 1 waits
    in the launcher's rendezvous meanwhile. One process start less than a separate reference."""
    if os.environ["RANK"] != "0":
        return {}
    # Without these two, torch would join the launcher's store as a client (rendezvous.py).
    saved = {k: os.environ.pop(k) for k in ("WORLD_SIZE", "TORCHELASTIC_USE_AGENT_STORE")
             if k in os.environ}
    try:
        return reference(out, init)
    finally:
        destroy_distributed()
        os.environ.update(saved)


def main() -> None:
    out, role = Path(sys.argv[1]), sys.argv[2]
    init = out / "init" / "step_0000000"
    t0 = time.perf_counter()
    if role == "reference":  # a separate one-process start (the same numbers as below)
        results = reference(out, init)
    else:  # "all": the reference on rank 0, then every layout on both ranks
        results = reference_before_layouts(out, init)
        for name, overrides in LAYOUTS.items():
            log(f"layout {name}")
            results[name] = run_case(overrides, out, init)
    log(f"done in {save_results(results, out / f'{role}.pt', t0):.1f} s")


if __name__ == "__main__":
    main()
