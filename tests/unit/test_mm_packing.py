"""Two-budget packing into the packed-batch contract: budgets, coverage, attention boundaries
(through the block-causal mask that cu_seqlens_padded implies, with document ids tracked from the
token ids), loss masks, placeholder spans and the padding on a LLaVA-like length mix."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from megatron_vlm.data.image import ProcessedImage
from megatron_vlm.data.length_mixes import llava_like_mix
from megatron_vlm.data.mm_packing import (
    document_cost,
    pack_tokenized,
    packing_efficiency,
    select_packs,
)
from megatron_vlm.data.templates import MediaTokenIds, Text, tokenize_interleaved
from megatron_vlm.data.video import VideoChunk

PAD, MARK, BASE = 0, 7, 10_000
IDS = MediaTokenIds(media_begin=2, media_content=3, media_end=4, image_placeholder=5,
                    video_placeholder=6)


class WordTokenizer:
    """``d:k`` -> BASE + 1000 d + k (trainable), ``d:pk`` -> BASE + 1000 d + 500 + k (prompt);
    anything else (timestamps, "image", "video") -> MARK. Ids say which document they are from."""

    def encode(self, text: str) -> list[int]:
        out = []
        for word in text.split():
            m = re.fullmatch(r"(\d+):(p?)(\d+)", word)
            if m is None:
                out.append(MARK)
            else:
                out.append(BASE + 1000 * int(m[1]) + (500 if m[2] else 0) + int(m[3]))
        return out


def owner(token: int) -> int | None:
    return (token - BASE) // 1000 if token >= BASE else None


def is_prompt(token: int) -> bool:
    return token >= BASE and (token - BASE) % 1000 >= 500


def make_doc(d: int, rng: np.random.Generator, item_value: list[float]):
    """A random interleaved document; media items get constant pixels (their global number)."""
    segments = []
    for _ in range(int(rng.integers(1, 5))):
        r = rng.random()
        if r < 0.3:
            n = int(rng.integers(1, 6))
            segments.append(Text(" ".join(f"{d}:p{k}" for k in range(n)), loss=False))
        elif r < 0.55:
            h, w = 2 * rng.integers(1, 5, size=2)
            item_value.append(float(len(item_value) + 1))
            px = torch.full((int(h * w), 3, 14, 14), item_value[-1])
            segments.append(ProcessedImage(px, (1, int(h), int(w)), (h * 14, w * 14),
                                           (h * 14, w * 14)))
        elif r < 0.7:
            t, h, w = int(rng.integers(1, 5)), 2, 4
            item_value.append(float(len(item_value) + 1))
            segments.append(VideoChunk(torch.full((t * h * w, 3, 14, 14), item_value[-1]),
                                       (t, h, w), 1.5))
        else:
            n = int(rng.integers(1, 40))
            segments.append(Text(" ".join(f"{d}:{k}" for k in range(n))))
    segments.append(Text(f"{d}:499"))  # every document ends with trainable text
    return tokenize_interleaved(segments, WordTokenizer(), IDS, markers_loss=False)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_select_packs_respects_both_budgets_and_covers_every_document(seed):
    rng = np.random.default_rng(seed)
    seq, patches = 512, 1024
    costs = [(int(rng.integers(1, seq + 1)), int(rng.integers(0, patches + 1)))
             for _ in range(int(rng.integers(1, 300)))]
    packs = select_packs(costs, seq, patches)
    assert sorted(i for p in packs for i in p) == list(range(len(costs)))
    for pack in packs:
        assert pack == sorted(pack) and pack
        assert sum(costs[i][0] for i in pack) <= seq
        assert sum(costs[i][1] for i in pack) <= patches
    assert [p[0] for p in packs] == sorted(p[0] for p in packs)
    assert select_packs([], seq, patches) == []
    with pytest.raises(ValueError, match="over the budgets"):
        select_packs([(1, patches + 1)], seq, patches)


@pytest.mark.parametrize("pad_to_multiple", [1, 4])
def test_packed_batches_keep_documents_apart_and_mask_what_they_must(pad_to_multiple):
    rng = np.random.default_rng(7)
    values: list[float] = []
    docs = [make_doc(d, rng, values) for d in range(60)]
    seq, max_patches = 256, 160
    keep = [d for d in range(len(docs))
            if document_cost(docs[d], pad_to_multiple)[0] <= seq
            and docs[d].num_patches <= max_patches]
    costs = [document_cost(docs[d], pad_to_multiple) for d in keep]
    packs = select_packs(costs, seq, max_patches)
    for pack in packs:
        pack_docs = [keep[i] for i in pack]
        b = pack_tokenized([docs[d] for d in pack_docs], seq, PAD, pad_to_multiple)
        tokens, labels = b.tokens[0].tolist(), b.labels[0].tolist()
        loss, pos = b.loss_mask[0].tolist(), b.position_ids[0].tolist()
        cu, cu_pad = b.cu_seqlens.tolist(), b.cu_seqlens_padded.tolist()
        assert cu_pad[-1] <= seq and all((y - x) % pad_to_multiple == 0
                                         for x, y in zip(cu_pad, cu_pad[1:]))
        assert b.vision is None or int(b.vision.grid_thw.prod(1).sum()) <= max_patches
        segment = np.searchsorted(np.asarray(cu_pad), np.arange(seq), side="right") - 1
        real = np.zeros(seq, dtype=bool)
        for i in range(len(pack_docs)):
            real[cu_pad[i]: cu_pad[i] + cu[i + 1] - cu[i]] = True
            assert pos[cu_pad[i]] == 0
        # Attention: query p sees keys k <= p of its own cu_seqlens_padded segment. Every real
        # key it sees must carry the same document id, and every earlier token of its document
        # must be visible (the document is one segment).
        for p in np.nonzero(real)[0]:
            keys = [k for k in range(p + 1) if segment[k] == segment[p]]
            assert all(real[k] for k in keys), "padding visible to a real token"
            mine = owner(tokens[p])
            if mine is not None:
                seen = {owner(tokens[k]) for k in keys} - {None}
                assert seen == {mine}
                assert sum(owner(t) == mine for t in tokens[: p + 1]) == sum(
                    owner(tokens[k]) == mine for k in keys)
        # Loss: only real text targets of the same document; never placeholders, prompts,
        # padding, or past a document's last token.
        placeholders = {IDS.image_placeholder, IDS.video_placeholder}
        for p in range(seq):
            if loss[p]:
                assert real[p] and real[p + 1] and segment[p + 1] == segment[p]
                assert labels[p] == tokens[p + 1] and tokens[p] not in placeholders
                assert owner(labels[p]) == owner(tokens[p]) or owner(tokens[p]) is None
                assert labels[p] not in placeholders and not is_prompt(labels[p])
                assert labels[p] != MARK  # markers_loss=False
            else:
                assert labels[p] == PAD
        expected = sum(
            1 for d in pack_docs for j, t in enumerate(docs[d].tokens.tolist())
            if j > 0 and t >= BASE and not is_prompt(t)
        )
        assert sum(loss) == expected
        assert not any(loss[p] for p in range(seq) if not real[p])
        # Vision: one span of h*w/4 placeholders per item, in sequence order, pixels in order.
        want_items = [it for d in pack_docs for it in docs[d].items]
        if not want_items:
            assert b.vision is None and not placeholders & set(tokens)
            continue
        v = b.vision
        starts = v.placeholder_starts.tolist()
        assert starts == sorted(starts) and len(starts) == len(want_items)
        for m, (start, item) in enumerate(zip(starts, want_items)):
            t, h, w = v.grid_thw[m].tolist()
            assert (t, h, w) == tuple(item.grid_thw)
            want_id = IDS.video_placeholder if isinstance(item, VideoChunk) else (
                IDS.image_placeholder)
            assert bool(v.is_video[m]) == isinstance(item, VideoChunk)
            assert tokens[start - 1] == IDS.media_content
            assert tokens[start: start + h * w // 4] == [want_id] * (h * w // 4)
            assert tokens[start + h * w // 4] == IDS.media_end
            lo, hi = v.cu_seqlens[m].item(), v.cu_seqlens[m + 1].item()
            assert hi - lo == t * h * w
            assert torch.equal(v.pixel_values[lo:hi], item.pixel_values)
        assert sum(tok in placeholders for tok in tokens) == int(v.num_llm_tokens.sum())
        assert v.pixel_values.shape[0] == int(v.cu_seqlens[-1])


def test_media_must_be_decoded_before_packing():
    doc = tokenize_interleaved(
        [ProcessedImage(torch.empty(0, 3, 14, 14), (1, 2, 2), (28, 28), (28, 28)), Text("0:1")],
        WordTokenizer(), IDS)
    with pytest.raises(ValueError, match="decode media before packing"):
        pack_tokenized([doc], 64, PAD)


def test_padding_below_five_percent_on_a_llava_like_mix():
    # S = 4096 tokens and P = 4S patches: both budgets bind on this mix (3.6 patches per token).
    docs = llava_like_mix(4000, 4096, np.random.default_rng(0))
    eff = packing_efficiency(docs, 4096, 16384, buffer_size=256, pad_to_multiple=8)
    assert eff["padding_fraction"] <= 0.05, eff
    lower = 1 - sum(t for t, _ in docs) / (4096 * max(sum(t for t, _ in docs) / 4096,
                                                      sum(p for _, p in docs) / 16384))
    assert eff["padding_fraction"] >= lower - 1e-9
