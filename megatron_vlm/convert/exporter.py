"""Our megatron checkpoint -> HF safetensors with the release key names (``convert_hf.py export``).

The checkpoint may have been saved in any parallel layout (megatron's sharded tensors are
global; TP only changes the vocabulary padding) and with the local or the Transformer Engine spec
(the table carries both names). Tensors are read a group at a time (``read_group_bytes``) and
written shard by shard, into a temporary directory renamed into place at the end.

Beside the weights: ``config.json`` with the special-token ids the model was trained with, the
run's tokenizer (loadable by ``AutoTokenizer`` offline, without remote code) and chat template,
the image/video processor configs and ``generation_config.json`` (``tokenizer_export.py``,
``hf_assets.py``); every file readable by the group (0644, directories 0755, less the umask).

``int4_experts=True`` writes the release's format: routed experts (the rules marked ``int4``) as
compressed-tensors ``pack-quantized`` INT4, quantised one tensor at a time as they stream through
(``int4.py``), everything else bf16, and the release's ``quantization_config`` in config.json.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import secrets
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from tqdm import tqdm

from megatron_vlm.config.data import DataConfig
from megatron_vlm.config.model import ModelConfig, TokenIdsConfig
from megatron_vlm.convert.hf_assets import (
    generation_config,
    make_readable,
    processor_configs,
    write_json,
)
from megatron_vlm.convert.hf_config import model_to_hf
from megatron_vlm.convert.hf_io import ShardedSafetensorsWriter
from megatron_vlm.convert.importer import context_for, load_job_model, table_for
from megatron_vlm.convert.int4 import quantize_int4, release_freed_heap, require_library
from megatron_vlm.convert.rules import ConversionError, Table
from megatron_vlm.convert.tables import FAMILIES
from megatron_vlm.convert.tokenizer_export import (
    RunTokenizer,
    check_with_transformers,
    export_token_ids,
    run_tokenizer,
    write_tokenizer,
)

logger = logging.getLogger(__name__)

_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


def resolve_step_dir(path: Path) -> Path:
    """A step directory as given, or the newest complete checkpoint under a root."""
    from megatron_vlm.checkpoint import find_latest_checkpoint
    from megatron_vlm.checkpoint.manifest import MANIFEST_NAME

    path = Path(path)
    if (path / MANIFEST_NAME).is_file():
        return path
    latest = find_latest_checkpoint(path)
    if latest is None:
        raise ConversionError(f"no complete megatron_vlm checkpoint at or under {path}")
    return latest


def _te_slot(slot, local: str, te: str):
    """The slot of the same tensor under its Transformer Engine name (the sharded key differs
    from the local one in the same tail as the parameter name)."""
    import dataclasses

    common = os.path.commonprefix([local, te])
    common = common[: common.rfind(".") + 1]
    tail_local, tail_te = local[len(common):], te[len(common):]
    assert slot.key.endswith(tail_local), (slot.key, local)
    return dataclasses.replace(slot, key=slot.key[: -len(tail_local)] + tail_te)


def _checkpoint_slots(slots: dict, table: Table, saved_keys: set[str]) -> tuple[dict, bool]:
    """Slots of the names the checkpoint holds: the local spec's, else the TE spec's."""
    if all(s.key in saved_keys for s in slots.values()):
        return slots, False
    te = {}
    for name, slot in slots.items():
        te_name = table.to_te_name(name)
        te[name] = _te_slot(slot, name, te_name) if te_name != name else slot
    missing = sorted({s.key for s in te.values()} - saved_keys)
    if missing:
        local_missing = sorted({s.key for s in slots.values()} - saved_keys)
        raise ConversionError(f"the checkpoint lacks {local_missing[0]!r} (local spec names) and "
                              f"{missing[0]!r} (Transformer Engine names)")
    return te, True


@dataclass
class ExportResult:
    out: Path
    family: str
    num_tensors: int
    total_bytes: int
    te_layout: bool
    num_int4: int = 0
    """HF weights written as INT4 (``weight_packed``/``weight_scale``/``weight_shape``)."""
    tokenizer: str = ""
    """Where the exported tokenizer came from, or why there is none."""
    token_ids: dict[str, int | None] = field(default_factory=dict)
    """The special-token ids written (``TokenIdsConfig`` names)."""
    notes: list[str] = field(default_factory=list)
    """What the export could not carry over exactly (also logged as warnings)."""


@dataclass
class _Run:
    """What the checkpoint's job config says about its run beyond the model."""

    model: ModelConfig
    data: DataConfig | None
    run_dirs: list[Path]


def _read_run(config_yaml: str, step_dir: Path) -> _Run:
    """The model (required) and, leniently, the data section and run directory candidates."""
    model = load_job_model(config_yaml)
    raw = yaml.safe_load(config_yaml) or {}
    data = None
    if isinstance(raw.get("data"), dict):
        from megatron_vlm.config.job import from_dict

        try:
            data = from_dict(DataConfig, raw["data"])
        except (TypeError, ValueError) as e:  # a config this version cannot read: no tokenizer
            logger.warning("the checkpoint's data config cannot be read (%s)", e)
    output_dir = (raw.get("train") or {}).get("output_dir")
    # The run directory is train.output_dir, relative to wherever the run started (so only an
    # absolute one is trusted); checkpoints default to <output_dir>/checkpoints/step_N.
    dirs = [Path(output_dir)] if output_dir and Path(output_dir).is_absolute() else []
    dirs.append(step_dir.resolve().parent.parent)
    return _Run(model, data, list(dict.fromkeys(dirs)))


def _write_assets(out: Path, run: _Run, family: str, tok: RunTokenizer,
                  ids: TokenIdsConfig) -> list[str]:
    """Tokenizer, chat template, processor and generation configs into ``out``; returns notes."""
    notes = []
    if tok.tokenizer is not None:
        write_tokenizer(tok.tokenizer, out)
    if family == "kimi_k25":
        files, mm_notes = processor_configs(
            run.model, run.data.multimodal if run.data is not None else None)
        for name, content in files.items():
            write_json(out / name, content)
        notes += mm_notes
    gen = generation_config(ids)
    if gen is not None:
        write_json(out / "generation_config.json", gen)
    if tok.tokenizer is not None:
        problem = check_with_transformers(out, tok.tokenizer)
        if problem is not None:
            notes.append(f"exported tokenizer: {problem}")
    return notes


def export_hf(checkpoint: Path, out: Path, *, family: str | None = None, dtype: str = "bf16",
              max_shard_bytes: int = 5 * 2**30, read_group_bytes: int = 2**28,
              progress: bool = True, int4_experts: bool = False,
              tokenizer: Path | None = None) -> ExportResult:
    """Write ``out`` (must not exist): safetensors shards, index, ``config.json``, and the
    tokenizer / processor / generation files (module docstring).

    ``int4_experts``: routed experts as the K2.5 release ships them (INT4, see ``int4.py``);
    needs ``dtype="bf16"`` (the release's dtype for everything else).
    ``tokenizer``: the tokenizer to ship (default: the run's, ``tokenizer_export.run_tokenizer``).
    """
    from megatron_vlm.checkpoint.manifest import verify_checkpoint
    from megatron_vlm.convert.mcore import (
        SHARDED_METADATA,
        CheckpointReader,
        build_meta_model,
        tensor_slots,
    )

    if dtype not in _DTYPES:
        raise ConversionError(f"--dtype {dtype!r}: choose bf16 or fp32")
    if int4_experts and dtype != "bf16":
        raise ConversionError(f"--int4-experts writes the release's format (INT4 routed experts, "
                              f"bf16 elsewhere): drop --dtype {dtype}")
    if int4_experts:
        require_library()
    out = Path(out)
    if out.exists():
        raise ConversionError(f"output {out} exists; choose a new directory")
    step_dir = resolve_step_dir(checkpoint)
    manifest = verify_checkpoint(step_dir)
    run = _read_run(manifest["config_yaml"], step_dir)
    model = run.model
    family = family or ("kimi_k25" if model.is_vlm else "deepseek_v3")
    tok = run_tokenizer(run.data, model.is_vlm, run.run_dirs, tokenizer)
    token_ids, notes = export_token_ids(model, tok)
    hf_config = model_to_hf(model, family, dtype, int4_experts=int4_experts, token_ids=token_ids)
    ctx = context_for(model, rope_interleave=True)
    table = table_for(FAMILIES[family], model, ctx)
    slots = tensor_slots(
        build_meta_model(model).sharded_state_dict(metadata=dict(SHARDED_METADATA)))
    reader = CheckpointReader(step_dir, slots)
    reader.slots, te_layout = _checkpoint_slots(slots, table, set(reader.global_shapes))

    groups, group, size = [], [], 0
    for name, slot in slots.items():
        nbytes = torch.Size(slot.shape).numel() * slot.dtype.itemsize
        if group and size + nbytes > read_group_bytes:
            groups.append(group)
            group, size = [], 0
        group.append(name)
        size += nbytes
    groups.append(group)

    tmp = out.parent / f".tmp-{out.name}-{secrets.token_hex(4)}"
    tmp.mkdir(parents=True)
    try:
        writer = ShardedSafetensorsWriter(tmp, max_shard_bytes)
        count = num_int4 = 0
        with tqdm(total=len(slots), desc="export", unit="tensor", disable=not progress) as bar:
            for names in groups:
                for name, tensor in reader.read(names).items():
                    rule, binding = table.lookup(name)
                    for hf_name, t in zip(rule.hf_names(binding),
                                          rule.transform.to_hf(tensor, ctx)):
                        if int4_experts and rule.int4:
                            base = hf_name.removesuffix("weight")
                            for suffix, p in quantize_int4(t, hf_name).items():
                                writer.add(base + suffix, p)
                            num_int4 += 1
                        else:
                            writer.add(hf_name, t if rule.keep_dtype else t.to(_DTYPES[dtype]))
                        count += 1
                    bar.update()
                if int4_experts:
                    release_freed_heap()
        writer.close()
        (tmp / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        notes += _write_assets(tmp, run, family, tok, token_ids)
        make_readable(tmp)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("exported %d tensors (%.2f GB) to %s", count, writer.total_bytes / 1e9, out)
    if tok.tokenizer is None:
        notes.append(f"no tokenizer exported: {tok.source}")
    for note in notes:
        logger.warning("export: %s", note)
    return ExportResult(out, family, count, writer.total_bytes, te_layout, num_int4,
                        tokenizer=tok.source, token_ids=dataclasses.asdict(token_ids), notes=notes)
