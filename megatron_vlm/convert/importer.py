"""HF safetensors -> our megatron checkpoint (``tools/convert_hf.py import``).

1. ``config.json`` -> our ``ModelConfig`` (``hf_config``), the family's table and key layouts.
2. The whole plan is checked before anything is written: every tensor of ours has its HF
   sources, every HF tensor is used (or knowingly skipped, and counted), and every shape and
   dtype fits -- shapes by running the transforms on ``meta`` tensors.
3. The checkpoint is written tensor by tensor (``mcore.write_checkpoint``) into a temporary
   directory renamed into place at the end.
"""

from __future__ import annotations

import logging
import os
import re
import secrets
import shutil
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from torch import Tensor
from tqdm import tqdm

from megatron_vlm.config.data import DataConfig
from megatron_vlm.config.job import JobConfig
from megatron_vlm.config.model import ModelConfig
from megatron_vlm.convert.hf_config import architecture_of, model_from_hf, read_config
from megatron_vlm.convert.hf_io import AliasedSource, SafetensorsDir, TensorSource
from megatron_vlm.convert.rules import ConversionError, ConvertContext, Rule, Table, meta_like
from megatron_vlm.convert.tables import Family

logger = logging.getLogger(__name__)

_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def context_for(model: ModelConfig, rope_interleave: bool = True) -> ConvertContext:
    from megatron_vlm.models.llm import padded_vocab_size

    llm = model.llm
    vision = model.vision
    # MoonViT's table is [H, W, D] (SigLIP's flat one is reshaped); other towers keep theirs.
    pos_shape = ((vision.pos_emb_height, vision.pos_emb_width, vision.hidden_size)
                 if vision is not None and hasattr(vision, "pos_emb_height") else ())
    return ConvertContext(
        num_heads=llm.num_attention_heads,
        num_query_groups=llm.query_groups if llm.attention == "gqa" else 0,
        qk_nope_head_dim=llm.qk_nope_head_dim,
        qk_rope_head_dim=llm.qk_rope_head_dim, kv_lora_rank=llm.kv_lora_rank,
        vocab_size=llm.vocab_size, padded_vocab_size=padded_vocab_size(llm.vocab_size, 1),
        rope_interleave=rope_interleave, num_dense_layers=llm.num_dense_layers,
        vision_num_heads=vision.num_attention_heads if vision else 0,
        vision_pos_emb_shape=pos_shape)


def table_for(family: Family, model: ModelConfig, ctx: ConvertContext) -> Table:
    if family.model_rules is not None:
        return Table(family.model_rules(model), ctx)
    return Table(family.rules(q_lora=model.llm.q_lora_rank is not None,
                              tied=not model.llm.untie_embeddings), ctx)


@dataclass
class ImportPlan:
    """What each tensor of ours is made of, and what was left out on purpose."""

    sources: dict[str, tuple[Rule, list[str]]]
    skipped: Counter = field(default_factory=Counter)


CARRY_FILE = "hf_carry.safetensors"
"""Beside an imported checkpoint (``<out>/``): the HF tensors the model does not use but the
release ships (``Family.carried``), which export writes back unchanged."""
CARRIED = "carried unchanged to export (unused by the model)"


def carried_keys(keys, family: Family) -> list[str]:
    """The keys of ``keys`` that ``family`` carries through (``Family.carried``)."""
    return [k for k in keys if any(re.search(p, k) for p in family.carried)]


def _skip_reason(key: str, family: Family, num_layers: int) -> str | None:
    m = _LAYER.search(key)
    if (family.name != "siglip" and family.model_family == "kimi" and m
            and int(m.group(1)) >= num_layers and "vision_tower" not in key):
        return "multi-token-prediction layers (not part of the model)"
    if carried_keys([key], family):
        return CARRIED
    if any(re.search(p, key) for p in family.skipped):
        return "no counterpart in our model"
    return None


def _is_float(dtype: torch.dtype) -> bool:
    return dtype.is_floating_point


def plan_import(table: Table, source: TensorSource, expected: dict[str, tuple[tuple, torch.dtype]],
                family: Family, num_layers: int, where: str) -> ImportPlan:
    """Check the conversion end to end on metadata; raise ConversionError naming the key/file."""
    plan = ImportPlan(sources={})
    available = set(source.keys())
    used: set[str] = set()
    for name, (shape, _) in expected.items():
        rule, binding = table.lookup(name)
        hf_names = rule.hf_names(binding)
        missing = [k for k in hf_names if k not in available]
        if missing:
            raise ConversionError(f"missing key {missing[0]!r} in {where} (needed for our "
                                  f"{name!r})")
        specs = [source.spec(k) for k in hf_names]
        for k, s in zip(hf_names, specs):
            if not _is_float(s.dtype):
                raise ConversionError(f"dtype mismatch: {k!r} in {source.origin(k)} is {s.dtype}, "
                                      "expected a floating-point tensor")
        if len({s.dtype for s in specs}) > 1:
            found = ", ".join(f"{k} ({s.dtype}, {source.origin(k)})"
                              for k, s in zip(hf_names, specs))
            raise ConversionError(
                f"dtype mismatch: {found} are combined into our {name!r} and must share a dtype")
        try:
            out = rule.transform.to_ours([meta_like(s.shape, s.dtype) for s in specs], table.ctx)
            ok = tuple(out.shape) == tuple(shape)
        except (ConversionError, RuntimeError) as e:
            out, ok = None, str(e)
        if ok is not True:
            found = ", ".join(f"{k} {list(s.shape)} in {source.origin(k)}"
                              for k, s in zip(hf_names, specs))
            detail = f" ({ok})" if isinstance(ok, str) else ""
            raise ConversionError(f"shape mismatch: {found} cannot make our {name!r} "
                                  f"{list(shape)}{detail}")
        plan.sources[name] = (rule, hf_names)
        used.update(hf_names)
    unexpected = []
    for key in source.keys():
        if key in used:
            continue
        reason = _skip_reason(key, family, num_layers)
        if reason is None:
            unexpected.append(key)
        else:
            plan.skipped[reason] += 1
    if unexpected:
        listed = "; ".join(f"{k!r} in {source.origin(k)}" for k in unexpected[:5])
        more = f" (and {len(unexpected) - 5} more)" if len(unexpected) > 5 else ""
        raise ConversionError(f"unexpected key(s) for a {family.name} model: {listed}{more}")
    return plan


def open_source(hf_dir: Path, family: Family, ctx: ConvertContext) -> TensorSource:
    source: TensorSource = SafetensorsDir(hf_dir)
    for aliases in family.alias_passes:
        source = AliasedSource(source, aliases, ctx)
    return source


def producer(plan: ImportPlan, source: TensorSource, ctx: ConvertContext,
             expected: dict[str, tuple[tuple, torch.dtype]],
             on_tensor: Callable[[str], None] | None = None) -> Callable[[str], Tensor]:
    def produce(name: str) -> Tensor | list[Tensor]:
        """Our tensor ``name``, or row blocks that make it up (``Transform.blocks``: no cat)."""
        rule, hf_names = plan.sources[name]
        inputs = [source.read(k) for k in hf_names]
        shape, dtype = expected[name]
        if rule.transform.blocks is not None:
            blocks = rule.transform.blocks(inputs, ctx)
            rows = sum(b.shape[0] for b in blocks)
            assert (rows, *blocks[0].shape[1:]) == tuple(shape), (name, shape)  # planned
            out = [b.to(dtype) for b in blocks]
        else:
            full = rule.transform.to_ours(inputs, ctx)
            assert tuple(full.shape) == tuple(shape), (name, full.shape, shape)  # planned
            out = full.to(dtype)
        if on_tensor is not None:
            on_tensor(name)
        return out

    return produce


def job_yaml(model: ModelConfig, name: str, tokenizer: str | None = None) -> str:
    """A JobConfig YAML for the imported model (``--config`` it, then set data/optim/train)."""
    seq = max(8, min(DataConfig().seq_length, model.llm.max_position_embeddings))
    return JobConfig(name=name, model=model,
                     data=DataConfig(seq_length=seq, tokenizer=tokenizer)).to_yaml()


def adopt_hf_tokenizer(model: ModelConfig, hf_dir: Path) -> str | None:
    """The tokenizer shipped in ``hf_dir`` as ``data.tokenizer`` (its absolute path), with the
    ids the HF config does not name (``media_content``; any other it lacks) filled in from it.

    None, leaving ``model.token_ids`` as the config has them, when ``hf_dir`` holds no tokenizer
    we can read or one whose ids differ from the config's (logged: training would refuse it).
    """
    from megatron_vlm.config.model import TOKEN_ID_NAMES
    from megatron_vlm.data.token_ids import tokenizer_for_model, tokenizer_token_ids
    from megatron_vlm.data.tokenizer_loader import load_tokenizer
    from megatron_vlm.families import family_media_rules

    rules = family_media_rules(model.family) if model.is_vlm else None
    try:
        tok = tokenizer_for_model(load_tokenizer(hf_dir), model.is_vlm,
                                  rules.special_tokens if rules else ())
        ids = tokenizer_token_ids(tok, model.is_vlm, rules)
    except (ValueError, ConversionError) as e:
        logger.info("no usable tokenizer in %s (%s): job.yaml leaves data.tokenizer unset",
                    hf_dir, e)
        return None
    config_ids = model.token_ids
    wrong = [f"{n}: config {getattr(config_ids, n)}, tokenizer {getattr(ids, n)}"
             for n in TOKEN_ID_NAMES if getattr(config_ids, n) is not None
             and getattr(ids, n) is not None and getattr(config_ids, n) != getattr(ids, n)]
    if wrong:
        logger.warning("the tokenizer in %s (%s) disagrees with config.json on %s: job.yaml "
                       "keeps config.json's ids and leaves data.tokenizer unset", hf_dir,
                       tok.describe(), "; ".join(wrong))
        return None
    for n in TOKEN_ID_NAMES:
        if getattr(config_ids, n) is None:
            setattr(config_ids, n, getattr(ids, n))
    return str(hf_dir.resolve())


@dataclass
class ImportResult:
    checkpoint: Path
    """The step directory (``<out>/step_0000000``)."""
    model: ModelConfig
    family: str
    num_tensors: int
    skipped: dict[str, int]
    tokenizer: str | None = None
    """``data.tokenizer`` in the written job.yaml: ``hf_dir`` when it ships a usable tokenizer."""


@dataclass
class _Prepared:
    """Everything an import slice or its finishing step needs, derived from ``hf_dir`` alone
    (the same in every process)."""

    model: ModelConfig
    family: Family
    tokenizer: str | None
    ctx: ConvertContext
    source: TensorSource
    meta: torch.nn.Module
    expected: dict[str, tuple[tuple, torch.dtype]]
    plan: ImportPlan
    config_yaml: str
    extra: dict


def _prepare(hf_dir: Path, params_dtype: str, log: bool = True) -> _Prepared:
    from megatron_vlm.convert.mcore import SHARDED_METADATA, build_meta_model, tensor_slots

    cfg = read_config(hf_dir)
    family = architecture_of(cfg)
    if family.name == "siglip":
        raise ConversionError("SigLIP checkpoints initialise a vision tower: use "
                              "`convert_hf.py import-siglip`")
    model, interleave = model_from_hf(cfg, family, params_dtype)
    tokenizer = adopt_hf_tokenizer(model, hf_dir)
    ctx = context_for(model, interleave)
    table = table_for(family, model, ctx)
    source = open_source(hf_dir, family, ctx)
    meta = build_meta_model(model)
    slots = tensor_slots(meta.sharded_state_dict(metadata=dict(SHARDED_METADATA)))
    expected = {n: (s.shape, s.dtype) for n, s in slots.items()}
    plan = plan_import(table, source, expected, family, model.llm.num_layers, str(hf_dir))
    for reason, count in plan.skipped.items():
        if log:
            logger.warning("skipped %d HF tensor(s): %s", count, reason)
    extra = {"source": str(hf_dir), "family": family.name}
    if plan.skipped.get(CARRIED):
        extra["carried"] = CARRY_FILE
    return _Prepared(model, family, tokenizer, ctx, source, meta, expected, plan,
                     job_yaml(model, f"hf_import:{hf_dir.name}", tokenizer),
                     {"hf_import": extra})


def _check_out(out: Path) -> None:
    from megatron_vlm.convert.slices import parts_dir

    if out.exists() and any(p != parts_dir(out) for p in out.iterdir()):
        raise ConversionError(f"output {out} exists and is not empty")


def import_slice(hf_dir: Path, out: Path, index: int, count: int, *, params_dtype: str = "fp32",
                 threads: int = 2, progress: bool = False,
                 prepared: _Prepared | None = None) -> Path:
    """Slice ``index`` of ``count`` of an import (``slices.py``): this process converts and
    writes its share of the tensors (whole layers/experts) under ``out``; any process or host
    may run any slice; :func:`finish_import` joins them. Returns the slice's directory."""
    from megatron_vlm.convert.mcore import SHARDED_METADATA
    from megatron_vlm.convert.slices import write_slice

    hf_dir, out = Path(hf_dir), Path(out)
    _check_out(out)
    p = prepared or _prepare(hf_dir, params_dtype, log=index == 0)
    bar = tqdm(total=len(p.expected), desc=f"import {index}/{count}", unit="tensor",
               disable=not progress)
    try:
        return write_slice(out, p.meta.sharded_state_dict(metadata=dict(SHARDED_METADATA)),
                           producer(p.plan, p.source, p.ctx, p.expected, lambda _: bar.update()),
                           index, count, threads)
    finally:
        bar.close()


def _write_carried(p: _Prepared, out: Path) -> None:
    """``out/hf_carry.safetensors``: the carried HF tensors as the checkpoint has them."""
    from safetensors.torch import save_file

    keys = carried_keys(p.source.keys(), p.family)
    if not keys:
        return
    tmp = out / f".tmp-carry-{secrets.token_hex(4)}.safetensors"
    try:
        save_file({k: p.source.read(k).contiguous() for k in keys}, str(tmp),
                  metadata={"format": "pt", "family": p.family.name})
        os.replace(tmp, out / CARRY_FILE)
    finally:
        tmp.unlink(missing_ok=True)


def finish_import(hf_dir: Path, out: Path, count: int, *, params_dtype: str = "fp32",
                  prepared: _Prepared | None = None) -> ImportResult:
    """Join the ``count`` finished slices under ``out`` into ``out/step_0000000`` and write
    ``out/job.yaml``."""
    from megatron_vlm.convert.slices import finish_checkpoint

    hf_dir, out = Path(hf_dir), Path(out)
    p = prepared or _prepare(hf_dir, params_dtype, log=False)
    _write_carried(p, out)  # first: a finished step directory always has its carried copy
    step_dir = finish_checkpoint(out, count, p.config_yaml, p.extra)
    tmp = out / f".tmp-job-{secrets.token_hex(4)}.yaml"
    tmp.write_text(p.config_yaml)
    os.replace(tmp, out / "job.yaml")
    return ImportResult(step_dir, p.model, p.family.name, len(p.expected), dict(p.plan.skipped),
                        p.tokenizer)


def import_hf(hf_dir: Path, out: Path, *, params_dtype: str = "fp32", progress: bool = True,
              workers: int = 1, threads: int = 2) -> ImportResult:
    """Convert the HF checkpoint in ``hf_dir`` into our checkpoint root ``out`` (new or empty).

    Writes ``out/step_0000000/`` (a model-only checkpoint: step 0, no optimizer, scheduler or
    data state; ``checkpoint.load_checkpoint(..., load_optimizer=False)`` reads it) and
    ``out/job.yaml`` (the model config as a job to edit: ``model.token_ids`` from config.json,
    ``data.tokenizer`` = ``hf_dir`` when it ships a tokenizer that agrees with them). On any error
    nothing is left behind.

    ``workers``: local processes, each converting and writing a slice (``import_slice``), then
    joined (``finish_import``); ``threads``: writer threads per process. The tensors written do
    not depend on either.
    """
    from megatron_vlm.convert.workers import run_slices

    hf_dir, out = Path(hf_dir), Path(out)
    _check_out(out)
    if out.exists() and any(out.iterdir()):
        raise ConversionError(f"output {out} exists and is not empty")
    if workers < 1:
        raise ConversionError(f"--workers {workers}: give at least 1")
    prepared = _prepare(hf_dir, params_dtype)  # every error before anything is written
    created = not out.exists()
    try:
        if workers == 1:
            import_slice(hf_dir, out, 0, 1, params_dtype=params_dtype, threads=threads,
                         progress=progress, prepared=prepared)
        else:
            run_slices("megatron_vlm.convert.importer:import_slice",
                       [[str(hf_dir), str(out), i, workers] for i in range(workers)],
                       dict(params_dtype=params_dtype, threads=threads))
        return finish_import(hf_dir, out, workers, params_dtype=params_dtype, prepared=prepared)
    except BaseException:
        if created:
            shutil.rmtree(out, ignore_errors=True)
        else:
            from megatron_vlm.convert.slices import parts_dir

            shutil.rmtree(parts_dir(out), ignore_errors=True)
        raise


def load_job_model(config_yaml: str) -> ModelConfig:
    """The model section of a checkpoint's JobConfig YAML."""
    from megatron_vlm.config.job import from_dict

    data = yaml.safe_load(config_yaml) or {}
    if "model" not in data:
        raise ConversionError("the checkpoint's manifest has no model config")
    return from_dict(ModelConfig, data["model"])
