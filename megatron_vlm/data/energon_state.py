"""Multimodal loader state: energon's ``save_state_rank()`` as JSON, and the resume checks.

energon's per-rank state holds dataclasses, RNG states (numpy/torch arrays), tuples and bytes;
``encode_state`` turns it into tagged JSON and ``decode_state`` back, constructing only builtins and
``megatron.energon`` classes. ``pack_energon_state`` / ``unpack_energon_state`` store that JSON as
zlib + base64 text in the loader's ``state_dict``; ``check_state_compatible`` refuses a state made
by another DP layout, worker count, mix, budget or dataset, with the fix in the message.
"""

from __future__ import annotations

import base64
import dataclasses
import importlib
import json
import zlib
from typing import Any

import numpy as np
import torch

STATE_VERSION = 1


def encode_state(obj: Any) -> Any:
    """energon loader state -> JSON-serialisable structure (tagged; see ``decode_state``).

    Handles energon's state dataclasses, dicts (any keys), tuples, bytes, numpy arrays and
    scalars and torch tensors (RNG states), besides JSON scalars and lists.
    """
    if obj is None or isinstance(obj, (bool, str)):
        return obj
    if isinstance(obj, (int, float)) and not isinstance(obj, np.generic):
        return obj
    if isinstance(obj, np.generic):
        return {"__np__": obj.item(), "dtype": str(obj.dtype)}
    if isinstance(obj, list):
        return [encode_state(v) for v in obj]
    if isinstance(obj, tuple):
        return {"__tuple__": [encode_state(v) for v in obj]}
    if isinstance(obj, (bytes, bytearray)):
        return {"__bytes__": base64.b64encode(bytes(obj)).decode()}
    if isinstance(obj, torch.Tensor):
        arr = obj.detach().cpu().contiguous().numpy()
        return {"__tensor__": base64.b64encode(arr.tobytes()).decode(), "dtype": str(arr.dtype),
                "shape": list(arr.shape)}
    if isinstance(obj, np.ndarray):
        arr = np.ascontiguousarray(obj)
        return {"__ndarray__": base64.b64encode(arr.tobytes()).decode(), "dtype": str(arr.dtype),
                "shape": list(arr.shape)}
    if isinstance(obj, dict):
        cls = type(obj)
        return {"__dict__": f"{cls.__module__}:{cls.__qualname__}",
                "items": [[encode_state(k), encode_state(v)] for k, v in obj.items()]}
    if dataclasses.is_dataclass(obj):
        cls = type(obj)
        return {"__dataclass__": f"{cls.__module__}:{cls.__qualname__}",
                "fields": {f.name: encode_state(getattr(obj, f.name))
                           for f in dataclasses.fields(obj)}}
    raise TypeError(f"cannot encode {type(obj).__name__} in the loader state")


def _state_class(path: str) -> type:
    module, _, qualname = path.partition(":")
    if module != "builtins" and not module.startswith("megatron.energon"):
        raise ValueError(f"loader state names class {path!r}; only energon classes may load")
    cls: Any = importlib.import_module(module)
    for part in qualname.split("."):
        cls = getattr(cls, part)
    return cls


def decode_state(obj: Any) -> Any:
    """Inverse of ``encode_state``; constructs only builtins and ``megatron.energon`` classes."""
    if isinstance(obj, list):
        return [decode_state(v) for v in obj]
    if not isinstance(obj, dict):
        return obj
    if "__tuple__" in obj:
        return tuple(decode_state(v) for v in obj["__tuple__"])
    if "__bytes__" in obj:
        return base64.b64decode(obj["__bytes__"])
    if "__np__" in obj:
        return np.dtype(obj["dtype"]).type(obj["__np__"])
    if "__ndarray__" in obj or "__tensor__" in obj:
        raw = base64.b64decode(obj.get("__ndarray__", obj.get("__tensor__")))
        arr = np.frombuffer(raw, dtype=np.dtype(obj["dtype"])).reshape(obj["shape"]).copy()
        return torch.from_numpy(arr) if "__tensor__" in obj else arr
    if "__dict__" in obj:
        cls = _state_class(obj["__dict__"])
        return cls((decode_state(k), decode_state(v)) for k, v in obj["items"])
    if "__dataclass__" in obj:
        cls = _state_class(obj["__dataclass__"])
        if not dataclasses.is_dataclass(cls):
            raise ValueError(f"{obj['__dataclass__']} is not a dataclass")
        return cls(**{k: decode_state(v) for k, v in obj["fields"].items()})
    raise ValueError(f"untagged object in loader state: {sorted(obj)[:5]}")


def pack_energon_state(raw: Any) -> str:
    """energon's ``save_state_rank()`` -> compact text (``encode_state`` JSON, zlib, base64).

    energon's state holds RNG states and buffers of restore keys, hence the compression.
    """
    return base64.b64encode(zlib.compress(json.dumps(encode_state(raw)).encode(), 6)).decode()


def unpack_energon_state(text: str) -> Any:
    """Inverse of ``pack_energon_state``: the state for energon's ``restore_state_rank()``."""
    return decode_state(json.loads(zlib.decompress(base64.b64decode(text))))


def check_state_compatible(
    state: dict[str, Any],
    dp_rank: int,
    dp_size: int,
    num_workers: int,
    fingerprint: dict[str, Any],
) -> None:
    """Refuse a loader state this loader cannot continue.

    Raises:
        ValueError: Another state version; another DP size/rank or worker count (energon cannot
            redistribute per-worker positions); or another mix/budget/dataset (``fingerprint``).
    """
    if state.get("version") != STATE_VERSION:
        raise ValueError(f"multimodal loader state version {state.get('version')!r}, "
                         f"expected {STATE_VERSION}")
    saved = (state["dp_rank"], state["dp_size"], state["num_workers"])
    now = (dp_rank, dp_size, num_workers)
    if saved != now:
        raise ValueError(
            f"multimodal loader state was saved by DP rank {saved[0]} of {saved[1]} with "
            f"{saved[2]} workers; this is rank {now[0]} of {now[1]} with {now[2]}. energon "
            "keeps a separate position per rank and worker, so the data stream cannot be "
            f"resharded: resume with data-parallel size {saved[1]} and "
            f"data.multimodal.num_workers={saved[2]}, or start the data stream afresh with "
            "checkpoint.load_data_state=false"
        )
    mine = json.loads(json.dumps(fingerprint))
    if state["fingerprint"] != mine:
        diff = sorted(k for k in mine if state["fingerprint"].get(k) != mine[k])
        raise ValueError(
            f"multimodal loader state was made with different {', '.join(diff)}; resume "
            "with the same stage mix, datasets, budgets and seed, or start the stream afresh"
        )
