"""Hugging Face safetensors I/O that streams: tensors are read one at a time and written shard by
shard, so host memory stays near one output shard plus the tensors being converted.

Reading parses each file's safetensors header ourselves (8-byte little-endian length + JSON) and
maps one tensor's byte range at a time (no copy; the mapping lives as long as the tensor).
``safetensors.safe_open`` would map the whole file: every page it touches then counts in the
process's RSS while the handle is open, so a converter holding shards open grows towards the
checkpoint size. The header check also refuses a
truncated shard before anything is converted.
"""

from __future__ import annotations

import json
import logging
import mmap
import os
import struct
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor

from megatron_vlm.convert.rules import Alias, ConversionError, ConvertContext, fill, meta_like

logger = logging.getLogger(__name__)

INDEX_NAME = "model.safetensors.index.json"
_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple[int, ...]
    dtype: torch.dtype


class TensorSource:
    """Named tensors that can be inspected without reading them."""

    def keys(self) -> list[str]:
        raise NotImplementedError

    def spec(self, key: str) -> TensorSpec:
        raise NotImplementedError

    def read(self, key: str) -> Tensor:
        raise NotImplementedError

    def origin(self, key: str) -> str:
        """Where the tensor comes from, for error messages (a file name)."""
        raise NotImplementedError


@dataclass(frozen=True)
class _Entry:
    file: Path
    start: int  # absolute byte offset of the data
    nbytes: int
    spec: TensorSpec


def _read_header(path: Path) -> tuple[dict, int]:
    size = path.stat().st_size
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) < 8:
            raise ConversionError(f"truncated shard {path}: {size} bytes, no safetensors header")
        (n,) = struct.unpack("<Q", raw)
        if 8 + n > size:
            raise ConversionError(f"truncated shard {path}: {size} bytes, its header alone "
                                  f"claims {8 + n}")
        try:
            header = json.loads(f.read(n))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ConversionError(f"corrupt safetensors header in {path}: {e}") from e
    return header, 8 + n


class SafetensorsDir(TensorSource):
    """All tensors of an HF checkpoint directory (``model.safetensors.index.json`` + shards, or
    single ``*.safetensors`` files)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        if not self.path.is_dir():
            raise ConversionError(f"HF checkpoint directory {self.path} does not exist")
        index = self.path / INDEX_NAME
        if index.is_file():
            weight_map = json.loads(index.read_text())["weight_map"]
            files = sorted(set(weight_map.values()))
        else:
            weight_map = None
            files = sorted(p.name for p in self.path.glob("*.safetensors"))
        if not files:
            raise ConversionError(f"no *.safetensors files (and no {INDEX_NAME}) in {self.path}")
        self._entries: dict[str, _Entry] = {}
        for name in files:
            file = self.path / name
            if not file.is_file():
                raise ConversionError(f"{index} lists {name}, which does not exist")
            self._scan(file)
        if weight_map is not None:
            for key, name in weight_map.items():
                if key not in self._entries or self._entries[key].file.name != name:
                    raise ConversionError(f"{INDEX_NAME} maps {key!r} to {name}, which does not "
                                          "hold it")

    def _scan(self, file: Path) -> None:
        header, data_start = _read_header(file)
        size = file.stat().st_size
        for key, info in header.items():
            if key == "__metadata__":
                continue
            begin, end = info["data_offsets"]
            if data_start + end > size:
                raise ConversionError(f"truncated shard {file}: {size} bytes, but {key!r} ends at "
                                      f"byte {data_start + end}")
            if info["dtype"] not in _DTYPES:
                raise ConversionError(f"{key!r} in {file} has unsupported dtype {info['dtype']}")
            if key in self._entries:
                raise ConversionError(f"{key!r} is in both {self._entries[key].file.name} and "
                                      f"{file.name}")
            spec = TensorSpec(tuple(info["shape"]), _DTYPES[info["dtype"]])
            self._entries[key] = _Entry(file, data_start + begin, end - begin, spec)

    def keys(self) -> list[str]:
        return list(self._entries)

    def spec(self, key: str) -> TensorSpec:
        return self._entries[key].spec

    def origin(self, key: str) -> str:
        return self._entries[key].file.name

    def read(self, key: str) -> Tensor:
        """The tensor, mapped from the file (no copy: a converter writing it as it is copies
        the page cache once, as a plain file copy does). The mapping is private (writes stay
        in this process) and covers this tensor only, for as long as the tensor lives, so the
        process's RSS holds the tensors in use, not the shards."""
        e = self._entries[key]
        if not e.nbytes:
            return torch.empty(e.spec.shape, dtype=e.spec.dtype)
        start = e.start - e.start % mmap.ALLOCATIONGRANULARITY
        with open(e.file, "rb") as f:
            if os.fstat(f.fileno()).st_size < e.start + e.nbytes:
                raise ConversionError(f"truncated shard {e.file}: short read of {key!r}")
            m = mmap.mmap(f.fileno(), e.start + e.nbytes - start, access=mmap.ACCESS_COPY,
                          offset=start)
        flat = torch.frombuffer(m, dtype=torch.uint8, count=e.nbytes, offset=e.start - start)
        return flat.view(e.spec.dtype).view(e.spec.shape)


class SafetensorsFile(SafetensorsDir):
    """The tensors of one ``.safetensors`` file (read as :class:`SafetensorsDir` reads)."""

    def __init__(self, file: Path) -> None:  # noqa: D107 -- one file, no index
        self.path = Path(file).parent
        self._entries = {}
        self._scan(Path(file))


class DictSource(TensorSource):
    """An in-memory state dict (a module's ``state_dict()``, or tensors already loaded)."""

    def __init__(self, tensors: dict[str, Tensor], what: str = "the state dict") -> None:
        self.tensors, self.what = tensors, what

    def keys(self) -> list[str]:
        return list(self.tensors)

    def spec(self, key: str) -> TensorSpec:
        t = self.tensors[key]
        return TensorSpec(tuple(t.shape), t.dtype)

    def read(self, key: str) -> Tensor:
        return self.tensors[key]

    def origin(self, key: str) -> str:
        return self.what


@dataclass(frozen=True)
class _Virtual:
    alias: Alias
    src_keys: tuple[str, ...]
    index: int | None
    position: int


class AliasedSource(TensorSource):
    """``source`` seen through :class:`Alias` rules: other layouts' keys become canonical ones;
    keys no alias matches pass through unchanged."""

    def __init__(self, source: TensorSource, aliases: Iterable[Alias], ctx: ConvertContext) -> None:
        self.source, self.ctx = source, ctx
        aliases = list(aliases)
        present = set(source.keys())
        consumed: set[str] = set()
        self._virtual: dict[str, _Virtual] = {}
        for key in source.keys():
            if key in consumed:
                continue
            for alias in aliases:
                binding = alias.match(key)
                if binding is None:
                    continue
                src_keys = tuple(fill(p, binding) for p in alias.src)
                absent = [k for k in src_keys if k not in present]
                if absent:
                    raise ConversionError(
                        f"{key!r} (in {source.origin(key)}) needs {absent[0]!r}, which is not in "
                        "the checkpoint")
                consumed.update(src_keys)
                count = source.spec(key).shape[0] if alias.expand else None
                for index in range(count) if alias.expand else [None]:
                    b = dict(binding, **({alias.expand: str(index)} if alias.expand else {}))
                    for pos, pattern in enumerate(alias.dst):
                        self._add(fill(pattern, b), _Virtual(alias, src_keys, index, pos))
                break
        self._passthrough = [k for k in source.keys() if k not in consumed]
        for key in self._passthrough:
            if key in self._virtual:
                raise ConversionError(f"{key!r} is in the checkpoint twice: as itself (in "
                                      f"{source.origin(key)}) and in another layout")
        self._cache: tuple[tuple, list[Tensor]] | None = None
        self._lock = threading.Lock()

    def _add(self, key: str, v: _Virtual) -> None:
        if key in self._virtual:
            raise ConversionError(f"two checkpoint tensors map to {key!r}: {v.src_keys} and "
                                  f"{self._virtual[key].src_keys}")
        self._virtual[key] = v

    def keys(self) -> list[str]:
        return self._passthrough + list(self._virtual)

    def origin(self, key: str) -> str:
        v = self._virtual.get(key)
        if v is None:
            return self.source.origin(key)
        return f"{self.source.origin(v.src_keys[0])} (from {', '.join(v.src_keys)})"

    def _apply(self, v: _Virtual, inputs: list[Tensor]) -> Tensor:
        fn = v.alias.fn
        if fn is None:
            return inputs[0]
        outs = fn(inputs, self.ctx) if v.index is None else fn(inputs, self.ctx, v.index)
        return outs[v.position]

    def spec(self, key: str) -> TensorSpec:
        v = self._virtual.get(key)
        if v is None:
            return self.source.spec(key)
        inputs = []
        for k in v.src_keys:
            s = self.source.spec(k)
            # Tiny tensors (INT4 weight_shape) are read: the output shape depends on their values.
            small = 0 < len(s.shape) and torch.Size(s.shape).numel() <= 16
            inputs.append(self.source.read(k) if small else meta_like(s.shape, s.dtype))
        out = self._apply(v, inputs)
        return TensorSpec(tuple(out.shape), out.dtype)

    def read(self, key: str) -> Tensor:
        v = self._virtual.get(key)
        if v is None:
            return self.source.read(key)
        # One group is kept: the partners of a multi-output alias are read one after the other
        # (under a lock: the writer's threads read concurrently).
        with self._lock:
            if self._cache is None or self._cache[0] != v.src_keys:
                self._cache = (v.src_keys, [self.source.read(k) for k in v.src_keys])
            cache = self._cache[1]
        out = self._apply(v, cache)
        # Never hand out a view of the cached inputs: callers may free what they get.
        cached = {t.untyped_storage().data_ptr() for t in cache}
        return out.clone() if out.untyped_storage().data_ptr() in cached else out


class ShardedSafetensorsWriter:
    """Writes tensors in the order given into ``model-0000i-of-0000N.safetensors`` files of at
    most ``max_shard_bytes`` (one tensor larger than that gets a shard of its own), then
    ``model.safetensors.index.json``. Only the current shard is held in memory."""

    def __init__(self, out_dir: Path, max_shard_bytes: int,
                 on_shard: Callable[[int], None] | None = None) -> None:
        self.out_dir = Path(out_dir)
        self.max_shard_bytes = max_shard_bytes
        self.on_shard = on_shard
        self._pending: dict[str, Tensor] = {}
        self._pending_bytes = 0
        self._parts: list[tuple[Path, list[str]]] = []
        self.total_bytes = 0

    def add(self, name: str, tensor: Tensor) -> None:
        if name in self._pending or any(name in keys for _, keys in self._parts):
            raise ConversionError(f"tensor {name!r} written twice")
        nbytes = tensor.numel() * tensor.element_size()
        if self._pending and self._pending_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        self._pending[name] = tensor.contiguous()
        self._pending_bytes += nbytes

    def _flush(self) -> None:
        part = self.out_dir / f"part-{len(self._parts):05d}.safetensors"
        save_file(self._pending, str(part), metadata={"format": "pt"})
        self._parts.append((part, list(self._pending)))
        self.total_bytes += self._pending_bytes
        if self.on_shard is not None:
            self.on_shard(self._pending_bytes)
        self._pending, self._pending_bytes = {}, 0

    def close(self) -> dict[str, str]:
        """Flush, name the shards ``-of-N``, write the index; returns the weight map."""
        if self._pending:
            self._flush()
        n = len(self._parts)
        weight_map = {}
        for i, (part, keys) in enumerate(self._parts):
            name = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            os.replace(part, self.out_dir / name)
            weight_map.update({k: name for k in keys})
        index = {"metadata": {"total_size": self.total_bytes},
                 "weight_map": dict(sorted(weight_map.items()))}
        (self.out_dir / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        return weight_map


_CODES = {v: k for k, v in _DTYPES.items()}


class PlannedShardWriter:
    """One safetensors file whose tensors (names, shapes, dtypes, order) are known up front: the
    header is written first, then each tensor's bytes straight from its memory as it arrives
    (no copy, nothing held), and the file is fsynced on :meth:`close`. The layout is the
    safetensors library's (8-byte header length, JSON header padded with spaces to 8 bytes,
    data in order), so any reader of the format reads it."""

    def __init__(self, path: Path, specs: list[tuple[str, tuple[int, ...], torch.dtype]],
                 metadata: dict[str, str] | None = None) -> None:
        self.path = Path(path)
        self.specs = specs
        header: dict = {"__metadata__": metadata or {"format": "pt"}}
        offset = 0
        for name, shape, dtype in specs:
            n = torch.Size(shape).numel() * dtype.itemsize
            header[name] = {"dtype": _CODES[dtype], "shape": list(shape),
                            "data_offsets": [offset, offset + n]}
            offset += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.nbytes = offset
        self._f = open(self.path, "wb")  # noqa: SIM115 (closed in close)
        self._f.write(struct.pack("<Q", len(raw)) + raw)
        self._next = 0

    def add(self, name: str, tensor: Tensor) -> None:
        if self._next >= len(self.specs) or self.specs[self._next][0] != name:
            want = self.specs[self._next][0] if self._next < len(self.specs) else "nothing"
            raise ConversionError(f"{self.path.name}: got {name!r}, planned {want!r}")
        _, shape, dtype = self.specs[self._next]
        if tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
            raise ConversionError(f"{name!r}: planned {list(shape)} {dtype}, got "
                                  f"{list(tensor.shape)} {tensor.dtype}")
        if tensor.numel():
            flat = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
            self._f.write(memoryview(flat.numpy()))
        self._next += 1

    def close(self) -> None:
        if self._next != len(self.specs):
            self._f.close()
            raise ConversionError(f"{self.path.name}: {len(self.specs) - self._next} planned "
                                  "tensor(s) never written")
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()

    def abort(self) -> None:
        self._f.close()
