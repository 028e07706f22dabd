"""Raw inputs -> one prepared dataset, in slices that any engine can run, then one merge.

``prepare_slice(inputs, out_dir, shard=(i, N))`` prepares slice ``i`` of ``N``: the records of
every split are numbered in input order (``iter_input``) and cut into blocks of
``samples_per_shard``; block ``b`` belongs to slice ``b % N`` and becomes shard
``<split>/shard_<b:06d>.tar`` holding its valid records under the keys
``<split>_<record index:09d>``. A slice calls ``load()`` only for its own blocks' records and
writes its shards, a partial manifest, its samples' ids and its reject log under
``<out_dir>/.slices/``. ``merge_slices(out_dir)`` joins the partial manifests into
``mm_dataset.json``, the reject logs into ``rejects.jsonl`` and builds the energon index, without
rewriting a shard. Duplicate ids are decided at merge (the first in split/record order is kept;
later ones stay in their shards and are excluded in energon's ``split.yaml``, logged
``duplicate_id``). ``prepare_dataset`` is slice 0 of 1 plus the merge, so N slices merged equal
one process byte for byte (shards, keys, splits).

Within a slice, ``workers`` processes prepare blocks in parallel (default: the CPUs the process
is given); results do not depend on it. Ray Data, Dask or a SLURM array (``tools/prepare_data.py
--shard i/N`` then ``--merge``) only need to call ``prepare_slice`` once per ``i`` and
``merge_slices`` once after all of them (see ``docs/data_at_scale.md``).
"""

from __future__ import annotations

import heapq
import json
import os
import re
import shutil
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megatron_vlm.data.media_checks import check_mode
from megatron_vlm.data.media_errors import BadSampleError
from megatron_vlm.data.records import DUPLICATE_ID, FORMAT, normalize_record
from megatron_vlm.data.shards import (
    MANIFEST_NAME,
    REJECTS_NAME,
    SPLITS,
    ShardVerificationError,
    TarShard,
    _mp_context,
    default_workers,
    infer_modality,
    sample_modality,
    verify_entries,
    write_energon_index,
)
from megatron_vlm.data.sources import expand_inputs, iter_input

SLICES_DIR = ".slices"
"""Partial manifests, id lists and reject logs of the slices, under the dataset directory."""

SLICE_BY = ("auto", "block", "file")
AUTO_FILE_INPUTS = 16
"""``slice_by="auto"`` slices by whole files when a split has at least this many input files
(tar shards, parquet parts: what teams hold at scale), by blocks of records otherwise (one big
manifest). It depends on the inputs only, never on N, so any N merges to the same dataset."""


def resolve_slice_by(slice_by: str, paths: dict[str, list[Path]]) -> str:
    """``block`` or ``file`` for these (folder-expanded) inputs; see ``AUTO_FILE_INPUTS``."""
    if slice_by not in SLICE_BY:
        raise ValueError(f"slice_by={slice_by!r}: use one of {SLICE_BY} (--slice-by)")
    if slice_by != "auto":
        return slice_by
    return "file" if max(map(len, paths.values()), default=0) >= AUTO_FILE_INPUTS else "block"


_BYTESIO = re.compile(r"<_io\.BytesIO object at 0x[0-9a-fA-F]+>")


@dataclass
class PrepareSummary:
    """What a prepared dataset holds and what was rejected."""

    name: str
    modality: str
    written: dict[str, int]
    """Samples per split (duplicates excluded)."""
    rejected: Counter
    """Reason -> records."""
    examples: dict[str, str]
    """Reason -> first rejected record's location and message."""
    num_shards: int
    num_bytes: int
    seconds: float
    sample_modalities: Counter | None = None
    """Per-sample modality (``text``/``image``/``video``/``mixed``) -> samples."""

    def format(self) -> str:
        lines = [
            f"{self.name} ({self.modality}): wrote "
            + ", ".join(f"{n} {s}" for s, n in self.written.items())
            + f" samples in {self.num_shards} shards ({self.num_bytes / 1e6:.1f} MB, "
            f"{self.seconds:.1f} s); rejected {sum(self.rejected.values())}"
        ]
        total = sum((self.sample_modalities or {}).values())
        if total:
            lines.append("  samples by modality: " + ", ".join(
                f"{m} {n} ({100 * n / total:.1f}%)" for m, n in self.sample_modalities.items()
                if n))
        for reason, n in sorted(self.rejected.items()):
            lines.append(f"  rejected {n:6d} {reason}: e.g. {self.examples[reason][:200]}")
        return "\n".join(lines)


# ----------------------------------------------------------------------------------- a slice


def _reject(split: str, index: int, src: str, where: str, exc: BadSampleError) -> dict:
    media = getattr(exc, "media", None)
    message = _BYTESIO.sub(media or where, str(exc))  # never an object's repr in the log
    return {"split": split, "index": index, "input": src, "where": where, "reason": exc.reason,
            "media": media, "message": message}


def _prepare_block(split: str, shard_rel: str, key_prefix: str, out: str, check_media: str,
                   items: list[tuple], rejects: list[dict]) -> dict[str, Any]:
    """Normalise (and check) one block's loaded records and write its shard ``shard_rel``
    (worker side); sample keys are ``<key_prefix><index:09d>``."""
    shard, samples = None, []
    for index, src, where, root, record in items:
        try:
            sample = normalize_record(record, Path(root), check_media)
        except BadSampleError as exc:
            rejects.append(_reject(split, index, src, where, exc))
            continue
        if shard is None:
            shard = TarShard(Path(out) / shard_rel)
        key = f"{key_prefix}{index:09d}"
        shard.add(sample.to_members(key))
        samples.append([split, index, sample.id, sample.kind,
                        sample_modality(m.type for m in sample.media),
                        [m.type for m in sample.media], src, where, f"{shard_rel}/{key}"])
    entry = None
    if shard is not None:
        entry = shard.close()
        entry["path"] = str(entry["path"].relative_to(out))
        # Re-read it now, while it is likely still in the page cache: a shard cut short on disk
        # stops the slice before its partial manifest says it is done.
        if problems := verify_entries(Path(out), [entry], deep=True, workers=1):
            raise ShardVerificationError(problems[0])
    rejects.sort(key=lambda r: r["index"])
    return {"shard": entry, "samples": samples, "rejects": rejects}


def _records(src: Path, root: Path, progress: bool, desc: str) -> Iterator[tuple[str, Any]]:
    records = iter_input(src, root)
    if progress:
        from tqdm import tqdm

        records = tqdm(records, desc=desc, unit="rec", file=sys.stderr, mininterval=0.5)
    return records


def _my_blocks(inputs: dict[str, list[Path]], media_root: Path | None, samples_per_shard: int,
               shard: tuple[int, int], slice_by: str, progress: bool,
               name: str) -> Iterator[tuple]:
    """(split, shard path, key prefix, [(index, input, where, media root, load)]) of this
    slice's blocks.

    ``slice_by="block"``: records numbered across a split's inputs, block ``b`` (shard
    ``shard_<b:06d>``, keys ``<split>_<index:09d>``) to slice ``b % N``; every slice scans every
    record. ``"file"``: input ``f`` of a split to slice ``f % N``, numbered within the file
    (shard ``shard_<f:05d>_<b:06d>``, keys ``<split>_<f:05d>_<index:09d>``); a slice opens only
    its own files.
    """
    i, n = shard
    for split in SPLITS:
        index, pending_block, pending = 0, None, []
        for f, src in enumerate(inputs.get(split, [])):
            if slice_by == "file":
                if f % n != i:
                    continue
                index, pending_block, pending = 0, None, []
            root = media_root if media_root is not None else src.parent
            for where, load in _records(src, root, progress, f"{name}/{split} {i}/{n}"):
                block = index // samples_per_shard
                if slice_by == "file" or block % n == i:
                    if pending_block is not None and block != pending_block:
                        yield _named(split, f, pending_block, slice_by) + (pending,)
                        pending = []
                    pending_block = block
                    pending.append((index, str(src), where, str(root), load))
                index += 1
            if slice_by == "file" and pending:
                yield _named(split, f, pending_block, slice_by) + (pending,)
                pending = []
        if pending:
            yield _named(split, 0, pending_block, slice_by) + (pending,)


def _named(split: str, file: int, block: int, slice_by: str) -> tuple[str, str, str]:
    if slice_by == "file":
        return split, f"{split}/shard_{file:05d}_{block:06d}.tar", f"{split}_{file:05d}_"
    return split, f"{split}/shard_{block:06d}.tar", f"{split}_"


class _BlockPool:
    """Runs ``_prepare_block`` inline (1 worker) or in a process pool with a bounded backlog,
    handing each result to ``sink`` in submission order (so the slice's lists stay sorted and
    nothing per sample accumulates in memory)."""

    def __init__(self, workers: int, sink: Callable[[dict], None]) -> None:
        self.workers = workers
        self.sink = sink
        self.pool: ProcessPoolExecutor | None = None
        self.futures: list[Future] = []

    def submit(self, *args: Any) -> None:
        if self.workers <= 1:
            self.sink(_prepare_block(*args))
            return
        if self.pool is None:
            self.pool = ProcessPoolExecutor(self.workers, mp_context=_mp_context())
        self.futures.append(self.pool.submit(_prepare_block, *args))
        while len(self.futures) > 2 * self.workers:  # loaded records wait in memory: bound them
            self.sink(self.futures.pop(0).result())

    def drain(self) -> None:
        while self.futures:
            self.sink(self.futures.pop(0).result())

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)


def _run_blocks(blocks: Iterator[tuple], out: Path, samples_path: Path, rejects_path: Path, *,
                check_media: str, after_write: Callable[[Path], None] | None,
                workers: int) -> list[dict[str, Any]]:
    """Prepare ``blocks`` (``_my_blocks``) with ``workers`` processes; write the sample list
    and the reject log (in block order) and return the shard entries."""
    entries: list[dict[str, Any]] = []
    tmp_samples, tmp_rejects = (p.with_name(p.name + ".tmp") for p in (samples_path,
                                                                        rejects_path))
    with open(tmp_samples, "w", encoding="utf-8") as samples_out, \
            open(tmp_rejects, "w", encoding="utf-8") as rejects_out:

        def sink(result: dict) -> None:  # results arrive in block order
            if result["shard"] is not None:
                entries.append(result["shard"])
                if after_write is not None:
                    after_write(out / result["shard"]["path"])
                    if problems := verify_entries(out, [result["shard"]], deep=True, workers=1):
                        raise ShardVerificationError(f"{out}: {problems[0]}")
            samples_out.writelines(json.dumps(x, ensure_ascii=False) + "\n"
                                   for x in result["samples"])
            rejects_out.writelines(json.dumps(x, ensure_ascii=False) + "\n"
                                   for x in result["rejects"])

        pool = _BlockPool(workers, sink)
        try:
            for split, shard_rel, prefix, records in blocks:
                items, rejects = [], []
                for index, src, where, rec_root, load in records:  # load here: reading is I/O
                    try:
                        items.append((index, src, where, rec_root, load()))
                    except BadSampleError as exc:
                        rejects.append(_reject(split, index, src, where, exc))
                pool.submit(split, shard_rel, prefix, str(out), check_media, items, rejects)
            pool.drain()
        finally:
            pool.close()
    os.replace(tmp_samples, samples_path)
    os.replace(tmp_rejects, rejects_path)
    return entries


def _settings(inputs: dict[str, list[Path]], *, name: str, modality: str | None,
              media_root: Path | None, samples_per_shard: int, check_media: str,
              num_slices: int, slice_by: str) -> dict[str, Any]:
    return {"name": name, "modality": modality, "slice_by": slice_by,
            "inputs": {s: [str(p) for p in inputs.get(s, [])] for s in SPLITS},
            "media_root": None if media_root is None else str(media_root),
            "samples_per_shard": samples_per_shard, "check_media": check_media,
            "num_slices": num_slices}


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _clear_merged(out: Path) -> None:
    for name in (MANIFEST_NAME, REJECTS_NAME):
        (out / name).unlink(missing_ok=True)
    shutil.rmtree(out / ".nv-meta", ignore_errors=True)


def prepare_slice(
    inputs: dict[str, list[str | os.PathLike]],
    out_dir: str | os.PathLike,
    *,
    shard: tuple[int, int] = (0, 1),
    name: str,
    modality: str | None = None,
    media_root: str | os.PathLike | None = None,
    samples_per_shard: int = 1000,
    check_media: bool | str = True,
    workers: int | None = None,
    overwrite: bool = False,
    progress: bool = False,
    after_write: Callable[[Path], None] | None = None,
    slice_by: str = "auto",
) -> dict[str, Any]:
    """Prepare slice ``shard = (i, N)`` of a dataset into ``out_dir`` (see the module docstring).

    Every slice of one dataset must get the same arguments except ``shard``, ``workers`` and
    ``progress``. A slice already done with the same arguments returns at once (a re-run array
    task redoes nothing), unless ``overwrite``.

    Args:
        inputs: ``split -> input paths`` (anything ``sources.iter_input`` reads); splits are
            ``train`` and ``val``.
        out_dir: The dataset directory (shared by all slices).
        shard: ``(i, N)``: this is slice ``i`` of ``N`` (0-based).
        name: Dataset name (mixes and metrics refer to it).
        modality: Dataset label for the manifest; inferred from per-sample counts when None.
        media_root: Base of relative media paths (default: each input file's directory).
        samples_per_shard: Input records per block (= at most samples per shard).
        check_media: Reject broken images and videos (``media_checks``): ``"structure"``
            (default; True) reads headers and structure (JPEG markers to the EOI, PNG chunk
            CRCs, a video's container and sample table), ``"full"`` decodes them as
            training does, ``"none"`` (False) checks nothing (training skips what fails).
        workers: Processes preparing blocks (default: ``len(os.sched_getaffinity(0))``).
        overwrite: Redo this slice even if done, and drop a merged manifest and index.
        progress: tqdm progress bar on stderr.
        after_write: Called with each finished shard's path before verification (fault
            injection in tests; a hook for uploads).
        slice_by: ``"auto"`` (default): ``"file"`` when a split has at least
            ``AUTO_FILE_INPUTS`` input files (a folder of shards counts its tars), else
            ``"block"``. ``"block"``: blocks of ``samples_per_shard`` records round-robin over the
            slices (any number of input files; every slice scans every record). ``"file"``:
            whole input files round-robin (a slice opens only its own files: for many inputs
            that are slow to scan, e.g. WebDataset tars; keys and shard names then carry the
            file's position).

    Returns:
        The slice's partial manifest.

    Raises:
        ShardVerificationError: A written shard does not read back as written.
        ValueError: Bad arguments, or a slice done before with other arguments.
    """
    i, n = shard
    if not (n >= 1 and 0 <= i < n):
        raise ValueError(f"shard={i}/{n}: need 0 <= i < N (e.g. --shard 0/4 .. 3/4)")
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    if unknown := set(inputs) - set(SPLITS):
        raise ValueError(f"unknown splits {sorted(unknown)}; use {SPLITS}")
    out = Path(out_dir)
    paths = {s: expand_inputs(inputs.get(s, [])) for s in SPLITS}
    slice_by = resolve_slice_by(slice_by, paths)
    root = None if media_root is None else Path(media_root)
    check_media = check_mode(check_media)
    settings = _settings(paths, name=name, modality=modality, media_root=root,
                         samples_per_shard=samples_per_shard, check_media=check_media,
                         num_slices=n, slice_by=slice_by)
    slices = out / SLICES_DIR
    tag = f"{i:05d}_of_{n:05d}"
    part_path = slices / f"slice_{tag}.json"
    if part_path.is_file() and not overwrite:
        part = json.loads(part_path.read_text())
        if part["settings"] != settings:
            raise ValueError(f"{out}: slice {i}/{n} was prepared with other arguments; use a new "
                             "--out or pass overwrite=True (--overwrite)")
        return part
    if (out / MANIFEST_NAME).is_file() and not overwrite:
        raise ValueError(f"{out} is a merged dataset; pass overwrite=True (--overwrite) to redo "
                         "its slices")
    if overwrite:
        part_path.unlink(missing_ok=True)
        _clear_merged(out)
    slices.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    samples_file, rejects_file = f"samples_{tag}.jsonl", f"rejects_{tag}.jsonl"
    blocks = _my_blocks(paths, root, samples_per_shard, shard, slice_by, progress, name)
    entries = _run_blocks(blocks, out, slices / samples_file, slices / rejects_file,
                          check_media=check_media, after_write=after_write,
                          workers=default_workers() if workers is None else max(1, workers))
    part = {"format": FORMAT, "slice": [i, n], "settings": settings, "shards": entries,
            "samples_file": samples_file, "rejects_file": rejects_file,
            "seconds": time.perf_counter() - start}
    _write_atomic(part_path, json.dumps(part, indent=1) + "\n")  # last: the slice is done
    return part


# ------------------------------------------------------------------------------------- merge


def _read_parts(out: Path) -> list[dict[str, Any]]:
    parts = [json.loads(p.read_text()) for p in sorted((out / SLICES_DIR).glob("slice_*.json"))]
    if not parts:
        raise ValueError(f"{out}: no prepared slices (run tools/prepare_data.py --shard i/N "
                         f"--out {out} for every i first)")
    n = parts[0]["settings"]["num_slices"]
    if any(p["settings"] != parts[0]["settings"] for p in parts):
        raise ValueError(f"{out}: slices were prepared with different arguments (inputs, "
                         "--samples-per-shard, N...); redo them with one command line")
    missing = sorted(set(range(n)) - {p["slice"][0] for p in parts})
    if missing:
        raise ValueError(f"{out}: slices {missing} of {n} are not done; run "
                         f"tools/prepare_data.py ... --shard i/{n} for them, then --merge again")
    return sorted(parts, key=lambda p: p["slice"][0])


def _jsonl(path: Path) -> Iterator[Any]:
    with open(path, encoding="utf-8") as f:
        for line in f:
            yield json.loads(line)


@dataclass
class _Joined:
    """What the slices' sample lists and reject logs add up to."""

    kinds: Counter = field(default_factory=Counter)
    modalities: Counter = field(default_factory=Counter)
    media: Counter = field(default_factory=Counter)
    rejected: Counter = field(default_factory=Counter)
    written: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SPLITS, 0))
    exclude: list[str] = field(default_factory=list)
    """``<shard>/<key>`` of every later sample of an id (energon's split.yaml excludes)."""
    examples: dict[str, str] = field(default_factory=dict)


def _join_slices(out: Path, parts: list[dict[str, Any]]) -> _Joined:
    """Stream every slice's sample list and reject log in one-process order (split, input,
    record), decide duplicate ids, count, and write ``rejects.jsonl``."""
    settings, j = parts[0]["settings"], _Joined()
    order = {s: k for k, s in enumerate(SPLITS)}
    ordinal = {(s, src): f for s in SPLITS for f, src in enumerate(settings["inputs"][s])}

    def key(row: Any) -> tuple[int, int, int]:
        if isinstance(row, list):
            return order[row[0]], ordinal[row[0], row[6]], row[1]
        return order[row["split"]], ordinal[row["split"], row["input"]], row["index"]

    seen: dict[str, int] = {}  # id -> its first sample's (split, input, index) as one int
    streams = [_jsonl(out / SLICES_DIR / p[f]) for p in parts for f in ("samples_file",
                                                                         "rejects_file")]
    with open(out / (REJECTS_NAME + ".tmp"), "w", encoding="utf-8") as log:
        for row in heapq.merge(*streams, key=key):
            if isinstance(row, list):  # a written sample
                split, index, sid, kind, modality, types, src, where, sample_path = row
                if sid not in seen:
                    seen[sid] = (order[split] << 60) + (ordinal[split, src] << 40) + index
                    j.written[split] += 1
                    j.kinds[kind] += 1
                    j.modalities[modality] += 1
                    j.media.update(types)
                    continue
                j.exclude.append(sample_path)
                s_first, rest = divmod(seen[sid], 1 << 60)
                f_first, i_first = divmod(rest, 1 << 40)
                first = (_named(SPLITS[s_first], f_first, 0, settings["slice_by"])[2]
                         + f"{i_first:09d}")
                row = _reject(split, index, src, where, BadSampleError(
                    f"duplicate id {sid!r} (first: sample {first})", reason=DUPLICATE_ID))
            j.rejected[row["reason"]] += 1
            j.examples.setdefault(row["reason"], f"{row['where']}: {row['message']}")
            log.write(json.dumps(row, ensure_ascii=False) + "\n")
    os.replace(out / (REJECTS_NAME + ".tmp"), out / REJECTS_NAME)
    return j


def merge_slices(out_dir: str | os.PathLike, *, verbose: bool = True, workers: int | None = None,
                 deep: bool = False) -> PrepareSummary:
    """Join the slices under ``out_dir`` into one dataset (no shard is rewritten).

    Writes ``mm_dataset.json`` (counts per split, kind, media item, per-sample modality and
    reject reason), ``rejects.jsonl`` (every rejected record in split/record order, duplicate
    ids included) and energon's ``.nv-meta`` index (duplicates excluded in ``split.yaml``).

    Args:
        out_dir: The dataset directory the slices wrote into.
        verbose: Print the summary (and energon's index messages).
        workers: Processes for verification and energon's indexing (default: the CPUs given).
        deep: Re-read every shard (each slice already did after writing); else sizes only.

    Raises:
        ValueError: A slice missing or prepared with other arguments; no valid train record.
        ShardVerificationError: A shard differs from what its slice wrote.
    """
    start = time.perf_counter()
    out = Path(out_dir)
    parts = _read_parts(out)
    settings = parts[0]["settings"]
    workers = default_workers() if workers is None else max(1, workers)
    order = {s: k for k, s in enumerate(SPLITS)}
    shards = sorted((e for p in parts for e in p["shards"]),
                    key=lambda e: (order[e["path"].split("/")[0]], e["path"]))
    if problems := verify_entries(out, shards, deep=deep, workers=workers):
        raise ShardVerificationError(f"{len(problems)} bad shard(s) in {out}: "
                                     + "; ".join(problems) + ". Re-run those slices.")

    j = _join_slices(out, parts)
    kinds, modalities, media, rejected = j.kinds, j.modalities, j.media, j.rejected
    written, exclude, examples = j.written, j.exclude, j.examples
    name = settings["name"]
    if not written["train"]:
        raise ValueError(f"no valid train records for dataset {name!r} "
                         f"(rejected: {dict(rejected)}; e.g. {list(examples.values())[:3]}; "
                         f"every rejected record is in {out / REJECTS_NAME})")
    modality = settings["modality"] or infer_modality(kinds, modalities)
    manifest = {
        "format": FORMAT,
        "name": name,
        "modality": modality,
        "kinds": dict(kinds),
        "media": dict(media),
        "sample_modalities": {m: modalities[m] for m in ("text", "image", "video", "mixed")},
        "rejected": dict(rejected),
        "excluded": len(exclude),
        "splits": {split: {"samples": written[split],
                           "shards": [s for s in shards if s["path"].startswith(split + "/")]}
                   for split in SPLITS},
    }
    _write_atomic(out / MANIFEST_NAME, json.dumps(manifest, indent=1) + "\n")
    write_energon_index(out, [s for s in shards if s["samples"]], verbose, exclude, workers)
    summary = PrepareSummary(
        name, modality, written, rejected, examples, len(shards),
        sum(s["bytes"] for s in shards), time.perf_counter() - start,
        Counter({m: modalities[m] for m in ("text", "image", "video", "mixed")}),
    )
    if verbose:
        print(summary.format())
    return summary


def prepare_dataset(
    inputs: dict[str, list[str | os.PathLike]],
    out_dir: str | os.PathLike,
    *,
    name: str,
    modality: str | None = None,
    media_root: str | os.PathLike | None = None,
    samples_per_shard: int = 1000,
    check_media: bool | str = True,
    overwrite: bool = False,
    progress: bool = True,
    verbose: bool = True,
    workers: int | None = None,
    after_write: Callable[[Path], None] | None = None,
    slice_by: str = "auto",
) -> PrepareSummary:
    """Write, verify and index one energon dataset in one process: slice 0 of 1, then the merge.

    Arguments as ``prepare_slice``; ``out_dir`` must not exist unless ``overwrite`` (it is then
    removed first). ``verbose`` prints the summary and energon's index messages.

    Returns:
        The summary (also in ``mm_dataset.json``; every rejected record in ``rejects.jsonl``).
    """
    start = time.perf_counter()
    out = Path(out_dir)
    if unknown := set(inputs) - set(SPLITS):
        raise ValueError(f"unknown splits {sorted(unknown)}; use {SPLITS}")
    if out.exists():
        if not overwrite:
            raise ValueError(f"{out} exists; pass overwrite=True (--overwrite) to replace it")
        shutil.rmtree(out)
    prepare_slice(inputs, out, shard=(0, 1), name=name, modality=modality,
                  media_root=media_root, samples_per_shard=samples_per_shard,
                  check_media=check_media, workers=workers, progress=progress,
                  after_write=after_write, slice_by=slice_by)
    summary = merge_slices(out, verbose=False, workers=workers)
    summary.seconds = time.perf_counter() - start
    if verbose:
        print(summary.format())
    return summary
