"""The files of an HF export besides the weights and ``config.json``: tokenizer, chat template,
image / video processor configs, generation config; and file modes a group can read.

Processor configs (K2.5 export) carry the values our data pipeline used, under the names
transformers 5.25's ``Kimi_K25ImageProcessor`` / ``Kimi_K25VideoProcessor`` read: patch 14,
merge 2 (the model's vision config), per-side limit 512 patches, resize bicubic and pad, rescale
1/255, mean = std = 0.5, ``max_patches`` per image (``data.multimodal.image_max_patches``) and
per video frame (``video_chunk_max_patches``), ``temporal_patch_size`` 4, ``fps``
(``video_fps``). They are written nested in ``processor_config.json`` (transformers 5's layout,
read first) and flat in ``preprocessor_config.json`` / ``video_preprocessor_config.json`` (older
readers). Ours only, with no HF key: ``video_max_frames`` (HF samples every ``1/fps`` s),
``image_min_patches`` and the SlowFast sampler (HF never upscales; it samples uniformly); a run
that used them gets a note.

Modes: safetensors 0.8 writes its files 0600; every exported file gets 0644 and each directory
0755, less the process umask (so a default umask gives group- and world-readable files).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from megatron_vlm.config.data_mm import MultimodalDataConfig
from megatron_vlm.config.model import ModelConfig, TokenIdsConfig
from megatron_vlm.convert.rules import ConversionError

PROCESSOR_CLASS = "Kimi_K25Processor"
IMAGE_PROCESSOR_TYPE = "Kimi_K25ImageProcessor"
VIDEO_PROCESSOR_TYPE = "Kimi_K25VideoProcessor"
PIL_BICUBIC = 3
"""``PILImageResampling.BICUBIC``: our resize is antialiased bicubic, as torchvision's."""


def processor_configs(model: ModelConfig, mm: MultimodalDataConfig | None
                      ) -> tuple[dict[str, dict[str, Any]], list[str]]:
    """(file name -> JSON content, notes) for a K2.5 export; ``mm`` None = the pipeline's
    defaults (a run without multimodal data)."""
    from megatron_vlm.data.image import MAX_PATCHES_PER_SIDE

    vision = model.vision
    if vision is None:
        raise ConversionError("processor configs need a VLM checkpoint")
    if vision.merge_kernel_height != vision.merge_kernel_width:
        raise ConversionError(
            f"model.vision.merge_kernel_height={vision.merge_kernel_height} != merge_kernel_width="
            f"{vision.merge_kernel_width}: transformers' Kimi K2.5 processors take one merge_size")
    mm = mm or MultimodalDataConfig()
    notes = []
    if mm.image_min_patches is not None:
        notes.append(f"data.multimodal.image_min_patches={mm.image_min_patches}: transformers' "
                     "Kimi K2.5 image processor never upscales small images")
    if mm.video_sampler != "uniform":
        notes.append(f"data.multimodal.video_sampler={mm.video_sampler!r}: transformers' Kimi "
                     "K2.5 video processor samples uniformly at fps")
    common = {
        "processor_class": PROCESSOR_CLASS, "do_convert_rgb": True, "do_resize": True,
        "size": {"max_height": MAX_PATCHES_PER_SIDE, "max_width": MAX_PATCHES_PER_SIDE},
        "resample": PIL_BICUBIC, "do_rescale": True, "rescale_factor": 1 / 255,
        "do_normalize": True, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
        "patch_size": vision.patch_size, "merge_size": vision.merge_kernel_height,
    }
    image = {"image_processor_type": IMAGE_PROCESSOR_TYPE, **common,
             "max_patches": mm.image_max_patches}
    video = {"video_processor_type": VIDEO_PROCESSOR_TYPE, **common,
             "max_patches": mm.video_chunk_max_patches,
             "temporal_patch_size": vision.temporal_patch_size, "fps": mm.video_fps,
             "do_sample_frames": True}
    processor = {"processor_class": PROCESSOR_CLASS, "image_processor": image,
                 "video_processor": video}
    return {"processor_config.json": processor, "preprocessor_config.json": image,
            "video_preprocessor_config.json": video}, notes


def generation_config(ids: TokenIdsConfig) -> dict[str, Any] | None:
    """``generation_config.json``: the document ids where known (None when none is)."""
    out = {f"{name}_token_id": getattr(ids, name) for name in ("bos", "eos", "pad")
           if getattr(ids, name) is not None}
    return out or None


def write_json(path: Path, content: dict[str, Any]) -> Path:
    path.write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n")
    return path


def current_umask() -> int:
    """The process umask, read without changing it where Linux allows."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)  # elsewhere: set and restore (not thread-safe, but brief)
    os.umask(mask)
    return mask


def make_readable(root: Path) -> None:
    """Files 0644 and directories 0755 under (and including) ``root``, less the umask."""
    mask = current_umask()
    for path in root.rglob("*"):
        path.chmod((0o755 if path.is_dir() else 0o644) & ~mask)
    root.chmod(0o755 & ~mask)
