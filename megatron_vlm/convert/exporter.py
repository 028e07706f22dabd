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
import shutil
import threading
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from tqdm import tqdm

from megatron_vlm.config.data import DataConfig
from megatron_vlm.config.model import ModelConfig, TokenIdsConfig
from megatron_vlm.convert.distcp_read import DistcpReader
from megatron_vlm.convert.hf_assets import (
    generation_config,
    make_readable,
    processor_configs,
    write_json,
)
from megatron_vlm.convert.hf_config import model_to_hf
from megatron_vlm.convert.hf_io import INDEX_NAME
from megatron_vlm.convert.importer import context_for, load_job_model, table_for
from megatron_vlm.convert.int4 import quantize_int4, release_freed_heap, require_library
from megatron_vlm.convert.rules import ConversionError, Table
from megatron_vlm.convert.tables import Family, conversion_family, export_family_for
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


@dataclass
class _Setup:
    """What every export slice and the finishing step derive from the checkpoint alone."""

    step_dir: Path
    manifest: dict
    run: _Run
    family: str
    ctx: object
    table: Table
    reader: object
    te_layout: bool
    shards: list
    carried: dict = field(default_factory=dict)
    """Pseudo name (``CARRY_PREFIX`` + HF key) -> its HF output, for carried HF tensors."""
    carry_source: object = None
    """Where the carried tensors come from (``hf_carry.safetensors``); None: zeros."""
    notes: list = field(default_factory=list)


CARRY_PREFIX = "hf_carry:"
"""Prefix of the export plan's names for carried HF tensors (no tensor of ours)."""


def _plan_carried(step_dir: Path, family: Family, model: ModelConfig,
                  dtype: torch.dtype) -> tuple[dict, object, list[str]]:
    """The carried HF tensors to write (``Family.carried``): the import's copy beside the
    checkpoint (``<root>/hf_carry.safetensors``), else zeros for ``Family.carried_defaults``."""
    from megatron_vlm.convert.export_plan import HfOut
    from megatron_vlm.convert.hf_io import SafetensorsFile
    from megatron_vlm.convert.importer import CARRY_FILE

    if not family.carried:
        return {}, None, []
    path = step_dir.parent / CARRY_FILE
    if path.is_file():
        source = SafetensorsFile(path)
        shapes = {k: source.spec(k).shape for k in source.keys()}
        notes = []
    else:
        source = None
        shapes = family.carried_defaults(model) if family.carried_defaults else {}
        notes = [f"{k} (unused by the model; the release ships it) written as zeros: no "
                 f"{CARRY_FILE} beside the checkpoint" for k in shapes]
    carried = {CARRY_PREFIX + k: HfOut(k, tuple(shape), dtype) for k, shape in shapes.items()}
    return carried, source, notes


def _setup(checkpoint: Path, family: str | None, dtype: str, int4_experts: bool,
           max_shard_bytes: int) -> _Setup:
    from megatron_vlm.checkpoint.manifest import verify_checkpoint
    from megatron_vlm.convert.export_plan import plan_shards
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
    step_dir = resolve_step_dir(checkpoint)
    manifest = verify_checkpoint(step_dir)
    run = _read_run(manifest["config_yaml"], step_dir)
    model = run.model
    family = family or export_family_for(model.family, model.is_vlm)
    fam = conversion_family(family)
    ctx = context_for(model, rope_interleave=True)
    table = table_for(fam, model, ctx)
    slots = tensor_slots(
        build_meta_model(model).sharded_state_dict(metadata=dict(SHARDED_METADATA)))
    reader = CheckpointReader(step_dir, slots)
    reader.slots, te_layout = _checkpoint_slots(slots, table, set(reader.global_shapes))
    carried, carry_source, notes = _plan_carried(step_dir, fam, model, _DTYPES[dtype])
    shards = plan_shards(table, ctx, list(slots) + list(carried), reader.saved_shape,
                         lambda n: reader.dtypes[reader.slots[n].key], _DTYPES[dtype],
                         int4_experts, max_shard_bytes, extra={k: [o] for k, o in carried.items()})
    return _Setup(step_dir, manifest, run, family, ctx, table, reader, te_layout, shards,
                  carried, carry_source, notes)


def _parts(out: Path) -> Path:
    """The staging folder of the slices of an export to ``out`` (the same for every slice)."""
    return out.parent / f".parts-{out.name}"


def export_slice(checkpoint: Path, out: Path, index: int = 0, count: int = 1, *,
                 family: str | None = None, dtype: str = "bf16",
                 max_shard_bytes: int = 5 * 2**30, read_group_bytes: int = 2**28,
                 int4_experts: bool = False, threads: int = 2, progress: bool = False,
                 setup: _Setup | None = None) -> Path:
    """Slice ``index`` of ``count`` of an export (``export_plan.py``): this process writes its
    whole shards into the staging folder beside ``out``; :func:`finish_export` completes it. A
    finished slice returns at once."""
    from megatron_vlm.convert.export_plan import slice_shards, write_shards

    out = Path(out)
    if out.exists():
        raise ConversionError(f"output {out} exists; choose a new directory")
    parts = _parts(out)
    done = parts / f"slice_{index:05d}_of_{count:05d}.done"
    if done.is_file():
        return parts
    parts.mkdir(parents=True, exist_ok=True)
    s = setup or _setup(checkpoint, family, dtype, int4_experts, max_shard_bytes)
    mine = slice_shards(s.shards, index, count)
    target = _DTYPES[dtype]

    def convert(name: str, tensor) -> list[tuple[str, torch.Tensor]]:
        if name in s.carried:
            bar.update()
            return [(s.carried[name].name, tensor.to(target))]
        rule, binding = s.table.lookup(name)
        if isinstance(tensor, list):  # row blocks (distcp_read)
            hf = _regroup(tensor, len(rule.hf_names(binding))) if rule.transform.blocks else None
            if hf is None:
                hf = rule.transform.to_hf(torch.cat(tensor), s.ctx)
        else:
            hf = rule.transform.to_hf(tensor, s.ctx)
        written = []
        for hf_name, t in zip(rule.hf_names(binding), hf):
            if int4_experts and rule.int4:
                base = hf_name.removesuffix("weight")
                written += [(base + k, p) for k, p in quantize_int4(t, hf_name).items()]
            else:
                written.append((hf_name, t if rule.keep_dtype else t.to(target)))
        bar.update()
        return written

    def nbytes(name: str) -> int:
        if name in s.carried:
            return s.carried[name].nbytes
        return (torch.Size(s.reader.saved_shape(name)).numel()
                * s.reader.dtypes[s.reader.slots[name].key].itemsize)

    direct = DistcpReader(s.step_dir, s.reader.slots)
    lock = threading.Lock()

    def read(names: list[str]) -> dict:
        """Straight from the files where the layout allows, else megatron's reader (one
        call at a time: it is not thread-safe)."""
        out, rest = {}, []
        for name in names:
            if name in s.carried:
                hf = s.carried[name]
                out[name] = (s.carry_source.read(hf.name) if s.carry_source is not None
                             else torch.zeros(hf.shape, dtype=hf.dtype))
                continue
            got = direct.read(name, s.reader.saved_shape(name))
            if got is None:
                rest.append(name)
            else:
                out[name] = got
        if rest:
            with lock:
                out.update(s.reader.read(rest))
        return out

    try:
        with tqdm(total=sum(len(x.ours) for x in mine), desc=f"export {index}/{count}",
                  unit="tensor", disable=not progress) as bar:
            write_shards(parts, mine, read, convert, threads, read_group_bytes, nbytes,
                         release_freed_heap if int4_experts else None)
    finally:
        direct.close()
    done.write_text(json.dumps({"shards": [x.file for x in mine]}))
    return parts


def _regroup(blocks: list[torch.Tensor], parts: int) -> list[torch.Tensor] | None:
    """Row blocks as ``parts`` equal row ranges (the HF tensors of a ``Transform.blocks``
    rule): a range that is one block is that block; one of several blocks is their
    concatenation (a TP save splits gate and up per rank); None if a block straddles two."""
    rows = sum(b.shape[0] for b in blocks)
    if rows % parts:
        return None
    size, out, group, filled = rows // parts, [], [], 0
    for b in blocks:
        group.append(b)
        filled += b.shape[0]
        if filled > size:
            return None
        if filled == size:
            out.append(group[0] if len(group) == 1 else torch.cat(group))
            group, filled = [], 0
    return out


def finish_export(checkpoint: Path, out: Path, count: int = 1, *, family: str | None = None,
                  dtype: str = "bf16", max_shard_bytes: int = 5 * 2**30,
                  int4_experts: bool = False, tokenizer: Path | None = None,
                  setup: _Setup | None = None) -> ExportResult:
    """The index, config.json and tokenizer / processor / generation files beside the ``count``
    finished slices' shards; the whole directory renamed into place as ``out``."""
    out = Path(out)
    parts = _parts(out)
    missing = [i for i in range(count)
               if not (parts / f"slice_{i:05d}_of_{count:05d}.done").is_file()]
    if missing:
        raise ConversionError(f"export slice {missing[0]}/{count} of {out} is not finished: run "
                              f"it (--slice {missing[0]}/{count}) before finishing")
    s = setup or _setup(checkpoint, family, dtype, int4_experts, max_shard_bytes)
    model, run = s.run.model, s.run
    from megatron_vlm.families import family_media_rules  # family modules build models: lazily

    rules = family_media_rules(model.family) if model.is_vlm else None
    tok = run_tokenizer(run.data, model.is_vlm, run.run_dirs, tokenizer, rules)
    token_ids, notes = export_token_ids(model, tok, rules)
    if s.family not in ("kimi_k25", "deepseek_v3"):  # only Kimi's config gets default media ids
        notes = [n.replace("config.json gets Kimi K2.5's defaults", "config.json leaves them "
                           "out") for n in notes]
    notes = list(s.notes) + notes
    hf_config = model_to_hf(model, s.family, dtype, int4_experts=int4_experts,
                            token_ids=token_ids)
    for p in parts.glob("*.done"):
        p.unlink()
    weight_map = {o.name: shard.file for shard in s.shards for o in shard.outs}
    total = sum(shard.nbytes for shard in s.shards)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (parts / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
    (parts / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
    notes += _write_assets(parts, run, s.family, tok, token_ids)
    make_readable(parts)
    os.replace(parts, out)
    num = len(weight_map)
    num_int4 = sum(1 for k in weight_map if k.endswith(".weight_packed"))
    count_tensors = num - 2 * num_int4
    logger.info("exported %d tensors (%.2f GB) to %s", count_tensors, total / 1e9, out)
    if tok.tokenizer is None:
        notes.append(f"no tokenizer exported: {tok.source}")
    for note in notes:
        logger.warning("export: %s", note)
    return ExportResult(out, s.family, count_tensors, total, s.te_layout, num_int4,
                        tokenizer=tok.source, token_ids=dataclasses.asdict(token_ids), notes=notes)


def export_hf(checkpoint: Path, out: Path, *, family: str | None = None, dtype: str = "bf16",
              max_shard_bytes: int = 5 * 2**30, read_group_bytes: int = 2**28,
              progress: bool = True, int4_experts: bool = False,
              tokenizer: Path | None = None, workers: int = 1,
              threads: int = 2) -> ExportResult:
    """Write ``out`` (must not exist): safetensors shards, index, ``config.json``, and the
    tokenizer / processor / generation files (module docstring).

    ``int4_experts``: routed experts as the K2.5 release ships them (INT4, see ``int4.py``);
    needs ``dtype="bf16"`` (the release's dtype for everything else).
    ``tokenizer``: the tokenizer to ship (default: the run's, ``tokenizer_export.run_tokenizer``).
    ``workers``: local processes writing disjoint shards (``export_slice``); ``threads``: writer
    threads per process. The bytes written depend on neither.
    """
    from megatron_vlm.convert.workers import run_slices

    out = Path(out)
    if out.exists():
        raise ConversionError(f"output {out} exists; choose a new directory")
    if workers < 1:
        raise ConversionError(f"--workers {workers}: give at least 1")
    opts = dict(family=family, dtype=dtype, max_shard_bytes=max_shard_bytes,
                int4_experts=int4_experts)
    setup = _setup(checkpoint, **opts)  # every error before anything is written
    if _parts(out).exists():
        shutil.rmtree(_parts(out))  # a stale attempt of a local run
    try:
        kw = dict(opts, read_group_bytes=read_group_bytes, threads=threads)
        if workers == 1:
            export_slice(checkpoint, out, 0, 1, progress=progress, setup=setup, **kw)
        else:
            run_slices("megatron_vlm.convert.exporter:export_slice",
                       [[str(checkpoint), str(out), i, workers] for i in range(workers)], kw)
        return finish_export(checkpoint, out, workers, tokenizer=tokenizer, setup=setup, **opts)
    except BaseException:
        shutil.rmtree(_parts(out), ignore_errors=True)
        raise
