"""Pre-packed micro-batches read from one file: a data source for machines without the loader.

The lent GPU machine (SPEC §12) has torch but neither energon nor the video decoders, and what
travels to it is capped at 64 MiB per call: energon and the dependencies the machine lacks, PyAV
and decord together are larger than that. So the loader runs *here*, its packed micro-batches are
saved once (``save_prepacked``, from ``python -m benchmarks.gpu_smoke --prepare``), and a run
selects the file with ``data.prepacked=PATH``: :class:`PrepackedLoader` replays it.

File format (``torch.save``, read back with ``torch.load(weights_only=True)``: plain dicts, lists,
strings, numbers and tensors only, nothing pickled by class)::

    {"format": "megatron_vlm.prepacked", "version": 1,
     "meta": {...},                      # seq_length, tokenizer vocab/ids, where it came from
     "train": [batch, ...],              # the global stream of packed sequences
     "valid": {"<dataset>": [batch, ...]}}

where each ``batch`` is :func:`batch_to_dict` of a :class:`PackedBatch` (pixels as the exact
``uint8`` they were normalised from, a quarter of the float32 size; float32 when not exact).

Replay is deterministic and rank-independent, like ``TextLoader``: the ``N`` train sequences form
a cycle; optimizer step ``k`` takes stream sequences ``[k·G, (k+1)·G)`` modulo ``N`` and DP rank
``r`` the block ``[r·G/dp, (r+1)·G/dp)`` of them. The state is the number of sequences consumed
(plain JSON), so a resumed run continues the stream exactly, with any DP size.

This module imports neither energon nor the decoders: a machine with torch, numpy and PIL reads it.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from megatron_vlm.data.contract import PackedBatch, VisionInputs
from megatron_vlm.data.image import normalize

FORMAT = "megatron_vlm.prepacked"
"""Value of the file's ``format`` key."""
VERSION = 1
"""Value of the file's ``version`` key (and of the loader state's)."""

_BATCH_TENSORS = ("tokens", "labels", "loss_mask", "position_ids", "cu_seqlens",
                  "cu_seqlens_padded")
_VISION_TENSORS = ("grid_thw", "placeholder_starts", "is_video", "media_index", "is_fast")


def _pixels_to_uint8(pixel_values: torch.Tensor) -> torch.Tensor | None:
    """The uint8 image ``normalize`` maps to ``pixel_values`` exactly, or None if there is none."""
    raw = torch.round(pixel_values * 127.5 + 127.5).clamp(0, 255).to(torch.uint8)
    return raw if torch.equal(normalize(raw), pixel_values) else None


def batch_to_dict(batch: PackedBatch) -> dict[str, Any]:
    """A ``PackedBatch`` as plain tensors and numbers (``torch.load(weights_only=True)`` safe)."""
    out: dict[str, Any] = {name: getattr(batch, name).detach().cpu().clone()
                           for name in _BATCH_TENSORS}
    out["max_seqlen"] = int(batch.max_seqlen)
    if batch.mrope_position_ids is not None:  # an M-RoPE family's [3, S] ids
        out["mrope_position_ids"] = batch.mrope_position_ids.detach().cpu().clone()
    vision = batch.vision
    if vision is None:
        out["vision"] = None
        return out
    vis: dict[str, Any] = {name: getattr(vision, name).detach().cpu().clone()
                           for name in _VISION_TENSORS if getattr(vision, name) is not None}
    pixels = vision.pixel_values.detach().cpu()
    raw = _pixels_to_uint8(pixels)
    vis["pixel_values"] = raw if raw is not None else pixels.to(torch.float32).clone()
    vis["pixels"] = "uint8" if raw is not None else "float32"
    out["vision"] = vis
    return out


def batch_from_dict(data: dict[str, Any]) -> PackedBatch:
    """The ``PackedBatch`` that :func:`batch_to_dict` wrote (pixels normalised again).

    Raises:
        ValueError: A required field is missing.
    """
    missing = [n for n in (*_BATCH_TENSORS, "max_seqlen") if n not in data]
    if missing:
        raise ValueError(f"a pre-packed batch lacks {missing}; rewrite the file with "
                         "python -m benchmarks.gpu_smoke --prepare")
    vision = None
    vis = data.get("vision")
    if vis is not None:
        pixels = vis["pixel_values"]
        if vis.get("pixels", "float32") == "uint8":
            pixels = normalize(pixels)
        vision = VisionInputs(pixel_values=pixels,
                              **{n: vis[n] for n in _VISION_TENSORS if n in vis})
    return PackedBatch(**{n: data[n] for n in _BATCH_TENSORS},
                       max_seqlen=int(data["max_seqlen"]), vision=vision,
                       mrope_position_ids=data.get("mrope_position_ids"))


def stream_digest(batches: list[PackedBatch]) -> str:
    """SHA-256 (first 16 hex digits) of the token ids and layouts of ``batches``: what a loader
    state records so that it is not resumed over another file."""
    h = hashlib.sha256()
    for b in batches:
        for name in ("tokens", "cu_seqlens_padded"):
            h.update(getattr(b, name).to(torch.int64).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


@dataclass
class PrepackedData:
    """The contents of a pre-packed file."""

    train: list[PackedBatch]
    """The global stream of packed training sequences (replayed as a cycle)."""
    valid: dict[str, list[PackedBatch]] = field(default_factory=dict)
    """Held-out micro-batches per dataset name (all ranks' share)."""
    meta: dict[str, Any] = field(default_factory=dict)
    """``seq_length``, ``tokenizer_vocab_size``, ``token_ids``, ``source`` and what else the
    writer recorded."""


def save_prepacked(path: str | os.PathLike, data: PrepackedData) -> Path:
    """Write ``data`` (see the module docstring for the format); returns the path.

    Raises:
        ValueError: No training batch, or batches of different sequence lengths.
    """
    if not data.train:
        raise ValueError("a pre-packed file needs at least one training micro-batch")
    lengths = {b.seq_length for b in data.train}
    lengths |= {b.seq_length for batches in data.valid.values() for b in batches}
    if len(lengths) != 1:
        raise ValueError(f"pre-packed micro-batches have different lengths {sorted(lengths)}")
    meta = {**data.meta, "seq_length": lengths.pop(), "num_train": len(data.train),
            "digest": stream_digest(data.train)}
    payload = {"format": FORMAT, "version": VERSION, "meta": meta,
               "train": [batch_to_dict(b) for b in data.train],
               "valid": {k: [batch_to_dict(b) for b in v] for k, v in data.valid.items()}}
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    torch.save(payload, tmp)
    os.replace(tmp, out)
    return out


def load_prepacked(path: str | os.PathLike) -> PrepackedData:
    """Read a file :func:`save_prepacked` wrote (``weights_only=True``: no code is unpickled).

    Raises:
        ValueError: Naming ``data.prepacked`` when the file is missing or not such a file.
    """
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"data.prepacked={str(path)!r} does not exist; write it with "
                         "python -m benchmarks.gpu_smoke --prepare (or set data.prepacked=null)")
    try:
        payload = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - any unreadable file gets the same advice
        raise ValueError(f"data.prepacked={str(path)!r} is not a readable pre-packed file "
                         f"({type(err).__name__}: {err})") from err
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise ValueError(f"data.prepacked={str(path)!r} is not a {FORMAT} file")
    if payload.get("version") != VERSION:
        raise ValueError(f"data.prepacked={str(path)!r} has format version "
                         f"{payload.get('version')}; this code reads {VERSION}: rewrite it")
    return PrepackedData(
        train=[batch_from_dict(b) for b in payload["train"]],
        valid={k: [batch_from_dict(b) for b in v] for k, v in payload["valid"].items()},
        meta=dict(payload["meta"]))


class PrepackedLoader:
    """This DP rank's micro-batches replayed from a pre-packed file (see the module docstring).

    Same interface as ``TextLoader``: ``next_global_batch()`` returns this rank's
    ``global_batch_size / dp_size`` micro-batches of one optimizer step.

    Args:
        path: The file (``data.prepacked``).
        seq_length: ``data.seq_length``; must equal the file's.
        global_batch_size: ``G``, packed sequences per optimizer step over all DP ranks.
        dp_rank: This rank's data-parallel index.
        dp_size: Data-parallel size; must divide ``global_batch_size``.

    Raises:
        ValueError: Naming the config key: a file of another sequence length, a bad DP layout.
    """

    def __init__(self, path: str | os.PathLike, *, seq_length: int, global_batch_size: int,
                 dp_rank: int, dp_size: int) -> None:
        if dp_size < 1 or not 0 <= dp_rank < dp_size:
            raise ValueError(f"need 0 <= dp_rank < dp_size, got dp_rank={dp_rank} "
                             f"dp_size={dp_size}")
        if global_batch_size < 1 or global_batch_size % dp_size:
            raise ValueError(f"data.global_batch_size={global_batch_size} must be a positive "
                             f"multiple of the data-parallel size {dp_size}")
        self.path = Path(path)
        self.data = load_prepacked(path)
        file_len = int(self.data.meta["seq_length"])
        if file_len != seq_length:
            raise ValueError(f"data.prepacked={str(path)!r} holds sequences of {file_len} tokens "
                             f"but data.seq_length={seq_length}; set data.seq_length={file_len} "
                             "or rewrite the file")
        self.seq_length = seq_length
        self.global_batch_size = global_batch_size
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self._consumed = 0  # sequences of the global stream consumed (all ranks)

    @property
    def micro_batches_per_step(self) -> int:
        """Packed sequences this rank processes per optimizer step (``G / dp``)."""
        return self.global_batch_size // self.dp_size

    @property
    def num_sequences(self) -> int:
        """Distinct training sequences in the file (the cycle's length)."""
        return len(self.data.train)

    def describe(self) -> list[str]:
        """The source for the start-up banner."""
        meta = self.data.meta
        valid = ", ".join(f"{k} {len(v)}" for k, v in self.data.valid.items()) or "none"
        media = sum(b.vision is not None for b in self.data.train)
        return [f"data: pre-packed {self.path} ({self.num_sequences} sequences of "
                f"{self.seq_length} tokens, {media} with media, replayed as a cycle; held-out: "
                f"{valid}; written from {meta.get('source', '?')})"]

    def check_tokenizer(self, vocab_size: int, token_ids: dict[str, int | None]) -> None:
        """Refuse a tokenizer other than the one the file was packed with (its id count and
        special ids, as recorded by the writer; a file that recorded none passes).

        Raises:
            ValueError: Naming ``data.tokenizer``.
        """
        meta = self.data.meta
        wrong = []
        if meta.get("tokenizer_vocab_size") not in (None, vocab_size):
            wrong.append(f"{meta['tokenizer_vocab_size']} ids in the file, {vocab_size} now")
        for name, value in (meta.get("token_ids") or {}).items():
            if value is not None and token_ids.get(name) not in (None, value):
                wrong.append(f"{name} id {value} in the file, {token_ids.get(name)} now")
        if wrong:
            raise ValueError(f"data.prepacked={str(self.path)!r} was packed with another "
                             f"tokenizer ({'; '.join(wrong)}); set data.tokenizer to the "
                             f"tokenizer written beside it ({meta.get('tokenizer_file', '?')})")

    def next_global_batch(self) -> list[PackedBatch]:
        """This rank's micro-batches for one optimizer step (``G / dp`` packed sequences)."""
        per_rank = self.micro_batches_per_step
        first = self._consumed + self.dp_rank * per_rank
        self._consumed += self.global_batch_size
        return [self.data.train[(first + i) % self.num_sequences] for i in range(per_rank)]

    def validation_batches(self, num_batches: int) -> dict[str, list[PackedBatch]]:
        """This rank's share (every ``dp``-th, from ``dp_rank``) of the first ``num_batches``
        held-out micro-batches (at least ``dp_size``) of each dataset in the file."""
        want = max(num_batches, self.dp_size)
        return {name: batches[:want][self.dp_rank::self.dp_size]
                for name, batches in self.data.valid.items() if batches}

    def metrics(self) -> dict[str, float]:
        """Replay progress (cycles of the file completed)."""
        return {"data/prepacked_epochs": self._consumed / self.num_sequences}

    def close(self) -> None:
        """Nothing to stop (no workers)."""

    def state_dict(self) -> dict[str, Any]:
        """JSON-serialisable position in the global stream (identical on every DP rank)."""
        return {"version": VERSION, "kind": "prepacked", "consumed_sequences": self._consumed,
                "num_sequences": self.num_sequences, "digest": self.data.meta.get("digest"),
                "seq_length": self.seq_length}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue the stream from ``state`` (from ``state_dict``, possibly another DP size).

        Raises:
            ValueError: The state belongs to another loader or another file.
        """
        expected = {"version": VERSION, "kind": "prepacked", "num_sequences": self.num_sequences,
                    "digest": self.data.meta.get("digest"), "seq_length": self.seq_length}
        wrong = {k: (state.get(k), v) for k, v in expected.items() if state.get(k) != v}
        if wrong:
            detail = ", ".join(f"{k}: saved {s!r} vs now {n!r}" for k, (s, n) in wrong.items())
            raise ValueError(
                f"the checkpoint's data state does not match data.prepacked={str(self.path)!r} "
                f"({detail}); resume with the same file, or set "
                "checkpoint.load_data_state=false to start the stream afresh")
        self._consumed = int(state["consumed_sequences"])

