"""K2.5's INT4 routed experts (SPEC §4): exported through the compressed-tensors library.

The release ships every routed expert's ``gate/up/down_proj`` as compressed-tensors
``pack-quantized``: ``weight_packed`` int32 ``[out, in/8]`` (eight 4-bit values per word, stored
with an offset of 8), ``weight_scale`` bf16 ``[out, in/32]`` (one scale per group of 32 inputs,
symmetric, no zero point) and ``weight_shape`` ``[out, in]``; ``config.json`` says so in
``quantization_config`` (:data:`RELEASE_QUANTIZATION_CONFIG`). Everything else (attention, dense
and shared-expert MLPs, router, embeddings, ``lm_head``, vision tower, projector) stays bf16.

Export calls compressed-tensors' own functions, so the format is the library's, not a copy of it
(:func:`quantize_int4`): the bf16 weight's per-group scale by the library's min-max rule
(``calculate_qparams``: ``scale = max|w| / 7.5`` for 4 bits, computed in the weight's dtype, bf16
as in the release), then ``quantize`` (``round(w / scale)`` clamped to [-8, 7]) and
``pack_to_int32``: what ``PackedQuantizationCompressor.compress`` writes for that scale.

Import (:func:`dequantize_int4`) unpacks by hand (eight shifts and a multiply): exact in fp32,
and free of the dependency. compressed-tensors 0.20 needs torch >= 2.10.0 (final), which the GPU
container's torch (NGC 25.10: 2.9.0a0) does not satisfy, so the library is an optional extra
(``megatron_vlm[int4]``) and importing the release must not need it; the library's own
``dequantize`` would also round ``q * scale`` to bf16. tests/reference/test_export_int4.py checks
the import against the library's unpacking, bit for bit.

Error bound: ``|w - q * scale| <= (1/2 + 2**-5) * scale`` per element. ``1/2`` is rounding to the
nearest step; the rest is bf16 arithmetic: ``w / scale`` is rounded to bf16 (half an ulp of a
value below 8: ``2**-6``), and the scale's own bf16 rounding (relative ``2**-8``) lets a group's
largest weight land up to ``7.5 / (1 - 2**-8) = 7.529`` steps out, so the clamp at 7 can leave
0.529 of a step.

Re-exporting an imported INT4 checkpoint is not bit-identical in general: the min-max scale of
already-quantised values is ``max|q| * scale / 7.5``, not ``scale`` (``max|q|`` is 7 or 8), so the
second export re-rounds on a new grid. Quantising with the *same* scales is exact
(``quantize(q * scale, scale) == q``); tests/reference/test_export_int4.py checks both.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor

from megatron_vlm.convert.rules import ConversionError, ConvertContext

GROUP_SIZE = 32
NUM_BITS = 4

# The release's ``quantization_config`` (Kimi K2 Thinking / K2.5: minmax observer, symmetric
# int4, group 32, ``Linear`` targets minus everything that stays bf16). K2.5 nests it in
# ``text_config``; transformers 5.23 reads it there (``quantizers/auto.py``, decoder text config).
# The ignore list keeps the vision tower and projector out of the ``Linear`` targets, which
# transformers needs to load a K2.5 checkpoint (their ``nn.Linear`` s would otherwise expect packed
# weights).
RELEASE_QUANTIZATION_CONFIG: dict[str, Any] = {
    "config_groups": {
        "group_0": {
            "input_activations": None,
            "output_activations": None,
            "targets": ["Linear"],
            "weights": {
                "actorder": None,
                "block_structure": None,
                "dynamic": False,
                "group_size": GROUP_SIZE,
                "num_bits": NUM_BITS,
                "observer": "minmax",
                "observer_kwargs": {},
                "strategy": "group",
                "symmetric": True,
                "type": "int",
            },
        }
    },
    "format": "pack-quantized",
    "ignore": [
        "lm_head",
        r"re:.*self_attn.*",
        r"re:.*shared_experts.*",
        r"re:.*mlp\.(gate|up|gate_up|down)_proj.*",
    ],
    "kv_cache_scheme": None,
    "quant_method": "compressed-tensors",
    "quantization_status": "compressed",
}
VISION_IGNORE = [r"re:.*vision_tower.*", r"re:.*mm_projector.*"]

PACKED_SUFFIXES = ("weight_packed", "weight_scale", "weight_shape")


def quantization_config(vlm: bool) -> dict[str, Any]:
    """The ``quantization_config`` an INT4 export writes (a fresh copy)."""
    cfg = copy.deepcopy(RELEASE_QUANTIZATION_CONFIG)
    if vlm:
        cfg["ignore"] += VISION_IGNORE
    return cfg


def _library():
    try:
        from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
        from compressed_tensors.quantization import QuantizationArgs
        from compressed_tensors.quantization.lifecycle.forward import quantize
        from compressed_tensors.quantization.utils import calculate_qparams
    except ImportError as e:
        raise ConversionError(
            "--int4-experts needs the compressed-tensors package: pip install "
            "'megatron_vlm[int4]' (compressed-tensors==0.20.0; Python >= 3.11, torch >= 2.10)"
        ) from e
    return pack_to_int32, QuantizationArgs, quantize, calculate_qparams


def require_library() -> None:
    """Fail before any work when compressed-tensors is missing."""
    _library()


def weight_args():
    """The release's weight ``QuantizationArgs`` (parsed by the library from the config)."""
    args = _library()[1]
    return args.model_validate(RELEASE_QUANTIZATION_CONFIG["config_groups"]["group_0"]["weights"])


def quantize_int4(weight: Tensor, name: str = "weight") -> dict[str, Tensor]:
    """``weight [out, in]`` -> ``{weight_packed, weight_scale, weight_shape}`` (release format).

    The weight is rounded to bf16 first (the release's dtype; a bf16 export writes the same
    values), and the library computes the scale and the quantised values from it.
    """
    pack_to_int32, _, quantize, calculate_qparams = _library()
    if weight.ndim != 2 or weight.shape[1] % GROUP_SIZE:
        raise ConversionError(f"{name}: INT4 export needs a 2-D weight whose input size is a "
                              f"multiple of {GROUP_SIZE}, found shape {tuple(weight.shape)}")
    args = weight_args()
    w = weight.detach().to(torch.bfloat16)
    groups = w.unflatten(-1, (w.shape[1] // GROUP_SIZE, GROUP_SIZE))
    scale, zero_point = calculate_qparams(groups.amin(-1), groups.amax(-1), args)
    q = quantize(w, scale, zero_point, args, dtype=torch.int8)
    return {"weight_packed": pack_to_int32(q, NUM_BITS), "weight_scale": scale.contiguous(),
            "weight_shape": torch.tensor(w.shape)}


def dequantize_int4(ts: list[Tensor], ctx: ConvertContext) -> list[Tensor]:
    """compressed-tensors ``pack-quantized`` INT4 (K2.5's routed experts) -> fp32 weight.

    ``weight_packed [out, ceil(in/8)]`` int32: 8 values per word, value ``j`` of a word in bits
    ``4j..4j+3``, stored with an offset of 8 (unsigned 0..15 = signed -8..7); ``weight_scale
    [out, in/32]``: one scale per group of 32 inputs (symmetric, no zero point);
    ``weight_shape = [out, in]``. w = q * scale, exact in fp32 (a 4-bit integer times a bf16
    scale needs at most 12 significant bits).
    """
    packed, scale, shape = ts
    if packed.dtype != torch.int32:
        raise ConversionError(f"weight_packed must be int32, found {packed.dtype}")
    rows, cols = (int(v) for v in shape.tolist())
    if packed.shape[0] != rows or packed.shape[1] * 8 < cols or scale.shape != (
            rows, -(-cols // GROUP_SIZE)):
        raise ConversionError(
            f"INT4 shapes disagree: weight_packed {tuple(packed.shape)}, weight_scale "
            f"{tuple(scale.shape)}, weight_shape [{rows}, {cols}] (group size {GROUP_SIZE})")
    shifts = torch.arange(0, 32, 4, dtype=torch.int32, device=packed.device)
    nibbles = (packed.unsqueeze(-1) >> shifts) & 0xF  # [out, words, 8]
    q = nibbles.reshape(rows, -1)[:, :cols].to(torch.float32) - 8.0
    group_scale = scale.to(torch.float32).repeat_interleave(GROUP_SIZE, dim=1)[:, :cols]
    return [q * group_scale]


def check_quantization_config(cfg: dict[str, Any]) -> None:
    """Refuse a ``quantization_config`` (top level or ``text_config``) that is not the release's
    INT4 scheme: its packed tensors would otherwise be misread."""
    for where, holder in (("", cfg), ("text_config.", cfg.get("text_config") or {})):
        q = holder.get("quantization_config")
        if q is None:
            continue
        groups = q.get("config_groups") or {}
        weights = [g.get("weights") or {} for g in groups.values()]
        want = RELEASE_QUANTIZATION_CONFIG["config_groups"]["group_0"]["weights"]
        keys = ("num_bits", "type", "symmetric", "strategy", "group_size")
        found = {"quant_method": q.get("quant_method"), "format": q.get("format"),
                 "weights": [{k: w.get(k) for k in keys} for w in weights]}
        if (q.get("quant_method") != "compressed-tensors" or q.get("format") != "pack-quantized"
                or len(weights) != 1 or any(weights[0].get(k) != want[k] for k in keys)):
            raise ConversionError(
                f"config.json {where}quantization_config {found}: only the K2.5 release's "
                f"compressed-tensors pack-quantized INT4 (symmetric, group {GROUP_SIZE}) is "
                f"supported")


def release_freed_heap() -> None:
    """Hand freed heap memory back to the OS (glibc ``malloc_trim``; a no-op elsewhere).

    Quantising leaves ~50 MB of temporaries per expert weight (the library packs through int32
    copies) interleaved with the small packed tensors waiting for their shard; after the first
    large free, glibc's dynamic mmap threshold puts such temporaries on the heap, which then
    cannot shrink. Measured on the 2.9 GB benchmark checkpoint (benchmarks/convert_hf.py):
    2.3 GB above the baseline without this, 1.2 GB with it called once per read group (the bf16
    export: 1.1 GB; after every weight: 0.8 GB but ~40% slower, freed pages fault back in).
    """
    try:
        import ctypes

        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass
