"""Whole tensors read straight from a torch_dist checkpoint's ``.distcp`` files (export).

Each saved chunk is a ``torch.save`` record at a known byte range (DCP's ``.metadata``). A tensor
saved as one chunk, or as row blocks (megatron's gated ``linear_fc1``: gate and up; a TP save
split along dim 0), is loaded chunk by chunk from its byte range with ``torch.load`` on a window
of the file: one read per byte, no staging buffer, no copy into a preallocated tensor. Row
blocks come back as a list (the table's ``Transform.blocks`` turns them into the HF tensors
without concatenating them). Any other layout (a chunk split along another dimension) returns
None, and the caller uses megatron's general reader (``mcore.CheckpointReader``).
"""

from __future__ import annotations

import io
import os
import threading
from pathlib import Path

import torch
from torch import Tensor

from megatron_vlm.convert.mcore import TensorSlot


class _Window(io.RawIOBase):
    """Bytes ``[start, start + length)`` of an open file, as a seekable file of their own."""

    def __init__(self, f, start: int, length: int) -> None:
        self._f, self._start, self._len, self._pos = f, start, length, 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def seek(self, pos: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._pos, 2: self._len}[whence]
        self._pos = max(0, min(self._len, base + pos))
        return self._pos

    def tell(self) -> int:
        return self._pos

    def readinto(self, b) -> int:
        mv = memoryview(b).cast("B")
        n = min(len(mv), self._len - self._pos)
        if n <= 0:
            return 0
        got = os.preadv(self._f.fileno(), [mv[:n]], self._start + self._pos)
        self._pos += got
        return got


class DistcpReader:
    """Chunks of our checkpoint at ``step_dir`` by tensor, from its ``.metadata``."""

    def __init__(self, step_dir: Path, slots: dict[str, TensorSlot]) -> None:
        from megatron_vlm.checkpoint.megatron_io import MetadataUnpickler

        self.step_dir = Path(step_dir)
        self.slots = slots
        with open(self.step_dir / ".metadata", "rb") as f:
            md = MetadataUnpickler(f).load()
        self._chunks: dict[str, list[tuple[tuple, tuple, object]]] = {}
        for index, info in md.storage_data.items():
            meta = md.state_dict_metadata.get(index.fqn)
            chunk = None if meta is None or not hasattr(meta, "chunks") else next(
                (c for c in meta.chunks if tuple(c.offsets) == tuple(index.offset)), None)
            if chunk is not None:
                self._chunks.setdefault(index.fqn, []).append(
                    (tuple(chunk.offsets), tuple(chunk.sizes), info))
        self._files: dict[str, object] = {}
        self._lock = threading.Lock()

    def _file(self, rel: str):
        with self._lock:  # reads themselves are positional (pread): threads share a handle
            if rel not in self._files:
                self._files[rel] = open(self.step_dir / rel, "rb")  # noqa: SIM115 (close())
            return self._files[rel]

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files = {}

    def read(self, name: str, shape: tuple[int, ...]) -> Tensor | list[Tensor] | None:
        """Our tensor ``name`` (saved ``shape``, prepended axes removed): one tensor, row blocks
        in order, or None when its chunks are not whole rows."""
        slot = self.slots[name]
        p = len(slot.prepend)
        mine = [(o[p:], s[p:], info) for o, s, info in self._chunks.get(slot.key, [])
                if o[:p] == slot.prepend and all(x == 1 for x in s[:p])]
        if not mine or any(o[1:] != (0,) * (len(shape) - 1) or s[1:] != tuple(shape[1:])
                           for o, s, _ in mine if shape):
            return None
        mine.sort(key=lambda c: c[0])
        row = 0
        for o, s, _ in mine:
            if shape and o[0] != row:
                return None
            row += s[0] if shape else 1
        if shape and row != shape[0]:
            return None
        blocks = [self._load(info).reshape(s) for _, s, info in mine]
        return blocks[0] if len(blocks) == 1 else blocks

    def _load(self, info) -> Tensor:
        window = _Window(self._file(info.relative_path), info.offset, info.length)
        return torch.load(window, map_location="cpu", weights_only=True)
