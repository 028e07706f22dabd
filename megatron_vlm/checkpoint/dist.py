"""Distributed checkpoints on megatron-core ``dist_checkpointing`` (torch_dist format), atomic.

Layout of one checkpoint::

    <root>/step_0000123/
        __0_0.distcp ...      model + optimizer tensors (megatron torch_dist, any TP/PP/EP layout)
        .metadata             torch DCP index of the above
        common.pt             rank 0's non-sharded state: scheduler, step, optimizer param groups
        metadata.json         megatron's backend tag
        rank_00000.pt ...     per rank: RNG states and the caller's ``extra`` (data-loader state...)
        manifest.json         ours, written last: step, config, versions, layout, every file's
                              size and sha256

A save writes into ``<root>/.tmp-step_0000123-<random>``, fsyncs, writes the manifest and renames
the directory into place, so a crash mid-save leaves only a ``.tmp-*`` directory that resume
ignores. Every file is read back only through ``torch.load(weights_only=True)``, JSON, or a
restricted unpickler.

This module holds save/load/find/prune, the manifest contents and the rank exchange helpers.
The megatron-core 0.16.1 / torch DCP I/O workarounds (in-process writer, safe load strategies)
live in ``megatron_io.py``; the model/optimizer sharded state dicts in ``sharded_state.py``.
The module sees models only through ``sharded_state_dict``/``load_state_dict``.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import re
import secrets
import shutil
import sys
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing
from megatron.core.dist_checkpointing.strategies.common import COMMON_STATE_FNAME
from megatron.core.dist_checkpointing.validation import StrictHandling
from torch.distributed.checkpoint.api import CheckpointException as DCPCheckpointException

from megatron_vlm.checkpoint.hashed_io import BackgroundHasher, overlap_hashing, verify_share
from megatron_vlm.checkpoint.manifest import (
    FORMAT,
    FORMAT_VERSION,
    CheckpointError,
    check_files,
    check_model_config,
    file_entries,
    list_files,
    model_section,
    raise_problems,
    read_manifest,
    structural_hash,
    write_manifest,
)
from megatron_vlm.checkpoint.megatron_io import (
    InProcessTorchDistSaveStrategy,
    SafeCommonLoadStrategy,
    SafeTorchDistLoadStrategy,
    weights_only_load,
)
from megatron_vlm.checkpoint.rng import capture_rng_state, restore_rng_state
from megatron_vlm.checkpoint.sharded_state import (
    allocate_distributed_optimizer_state,
    fix_distributed_optimizer_steps,
    model_keys,
    optimizer_has_state,
    sharded_state_dict,
    unwrap,
    uses_distributed_optimizer,
)
from megatron_vlm.parallel import comm
from megatron_vlm.parallel.agree import all_gather_json as _all_gather_json
from megatron_vlm.parallel.runtime import layout_or_default

logger = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"^step_(\d+)$")
TMP_PREFIX = ".tmp-"

# Passed to every sharded_state_dict call (model and optimizer) on save, stored in the manifest,
# and passed back on load so both sides describe the same layout. ``dp_reshardable``: each
# DistributedOptimizer buffer shard is one tensor; reshardable across DP only (SPEC §6).
_SHARDED_METADATA = {
    "distrib_optim_sharding_type": "dp_reshardable",
    "singleton_local_shards": False,
    "chained_optim_avoid_prefix": True,
}


# --- collectives (tensor-only, so nothing is unpickled across ranks) ----------------------------


def _rank_world() -> tuple[int, int]:
    if not dist.is_initialized():
        raise RuntimeError(
            "megatron dist_checkpointing needs torch.distributed: call "
            "megatron_vlm.parallel.init.init_distributed first"
        )
    return dist.get_rank(), dist.get_world_size()


def _agree(check: Callable[[], Any]) -> Any:
    """Run ``check`` on every rank; if it raised CheckpointError on any, raise it on all.

    A refusal seen by one rank only (a file visible to some nodes) must not leave the others
    blocked in the next collective.
    """
    try:
        result, error = check(), None
    except CheckpointError as e:
        result, error = None, str(e)
    errors = [e for e in _all_gather_json(error) if e]
    if errors:
        raise CheckpointError(errors[0])
    return result


def fsync_path(path: Path) -> None:
    """fsync a file, or a directory (its entries: a rename or a new file inside is durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- manifest contents, file names ---------------------------------------------------------------


Layout = Mapping[str, int]
"""A run's parallel sizes ``{tp, pp, vpp, cp, ep, etp, dp}`` (``Runtime.layout()``). Every
function here that takes one treats None as the layout of the process groups this process made
(``parallel/runtime.py``: ``layout_or_default``)."""


def _versions() -> dict[str, str]:
    from importlib import metadata as importlib_metadata

    import megatron.core

    try:
        ours = importlib_metadata.version("megatron_vlm")
    except importlib_metadata.PackageNotFoundError:
        ours = "unknown (not installed)"
    return {
        "torch": torch.__version__,
        "megatron_core": megatron.core.__version__,
        "megatron_vlm": ours,
        "python": sys.version.split()[0],
    }


def step_dir_name(step: int) -> str:
    """``step_0000123``: the directory name of the checkpoint of ``step``."""
    return f"step_{step:07d}"


# --- save ----------------------------------------------------------------------------------------


def save_checkpoint(
    root: Path,
    step: int,
    model_chunks: list,
    optimizer,
    scheduler,
    extra: dict,
    config_yaml: str,
    keep_last: int = 3,
    layout: Layout | None = None,
) -> Path:
    """Save a complete checkpoint of ``step`` atomically; collective over all ranks.

    Args:
        root: checkpoint root; the checkpoint lands in ``root/step_XXXXXXX``.
        step: optimizer steps completed.
        model_chunks: this rank's model chunks (DDP-wrapped or bare), one per virtual stage.
        optimizer: megatron optimizer (DistributedOptimizer saved as ``dp_reshardable``), or None.
        scheduler: ``OptimizerParamScheduler`` or None.
        extra: this rank's JSON-serialisable state (data-loader position, counters, ...);
            returned by :func:`load_checkpoint` on the same rank.
        config_yaml: the run's JobConfig YAML, kept verbatim in the manifest.
        keep_last: complete checkpoints to keep under ``root``; older ones are deleted.
        layout: this run's parallel sizes, recorded in the manifest (:data:`Layout`).

    Returns:
        The final checkpoint directory (the same path on every rank).

    See ``async_save.py`` for the asynchronous variant (same files, same manifest).
    """
    pending = begin_save(root, step, model_chunks, optimizer, scheduler, extra, config_yaml,
                         keep_last, layout)
    strategy = InProcessTorchDistSaveStrategy()
    dist_checkpointing.save(pending.state, str(pending.tmp), sharded_strategy=strategy)
    write_rank_state(pending)
    # The data files were hashed (and fsynced) while written; the small ones are hashed here.
    # Rank 0 wrote common.pt, and megatron's finalize .metadata and metadata.json.
    small = [rank_file(pending.rank)]
    if pending.rank == 0:
        small += [COMMON_STATE_FNAME, ".metadata", "metadata.json"]
    entries = list(strategy.digests.values()) + file_entries(pending.tmp, small, fsync=True)
    return complete_save(pending, entries)


@dataclass
class PendingSave:
    """A save between :func:`begin_save` and :func:`complete_save` (same on every rank but
    ``rank``, ``state`` and ``extra``)."""

    root: Path
    tmp: Path
    final: Path
    step: int
    rank: int
    world: int
    state: dict
    """The sharded state dict handed to ``dist_checkpointing.save``."""
    with_optimizer: Any
    """The optimizer whose state is saved, or None (not stepped yet)."""
    extra: dict
    config_yaml: str
    keep_last: int
    layout: dict[str, int]
    """The run's parallel sizes, for the manifest."""


def begin_save(
    root: Path, step: int, model_chunks: list, optimizer, scheduler, extra: dict,
    config_yaml: str, keep_last: int, layout: Layout | None = None,
) -> PendingSave:
    """Validate, create the temp directory (rank 0) and build the state dict; collective."""
    if keep_last < 1:
        raise ValueError(f"keep_last must be >= 1, got {keep_last}")
    try:
        json.dumps(extra)
    except (TypeError, ValueError) as e:
        raise ValueError(f"checkpoint extra state must be JSON-serialisable: {e}") from e
    rank, world = _rank_world()
    wait_for_pruning()  # the previous save's deletions (bounds the disk in use)
    root = Path(root)
    final = root / step_dir_name(step)

    tmp_name = None
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        tmp = root / f"{TMP_PREFIX}{final.name}-{secrets.token_hex(4)}"
        tmp.mkdir()
        tmp_name = str(tmp)
    tmp = Path(_all_gather_json(tmp_name)[0])

    # Model + optimizer tensors and rank 0's common state (scheduler, step).
    # An optimizer that has not stepped has no state to save, and a fresh one equals it.
    has_state = all(_all_gather_json(optimizer_has_state(optimizer)))
    with_optimizer = optimizer if has_state else None
    state = sharded_state_dict(model_chunks, with_optimizer, _SHARDED_METADATA, is_loading=False)
    state["step"] = step
    if scheduler is not None:
        state["scheduler"] = scheduler.state_dict()
    return PendingSave(root=root, tmp=tmp, final=final, step=step, rank=rank, world=world,
                       state=state, with_optimizer=with_optimizer, extra=extra,
                       config_yaml=config_yaml, keep_last=keep_last,
                       layout=layout_or_default(layout))


def rank_file(rank: int) -> str:
    """``rank_00007.pt``: the per-rank file (RNG states, the caller's extra)."""
    return f"rank_{rank:05d}.pt"


def write_rank_state(pending: PendingSave) -> None:
    """This rank's RNG states and extra: plain tensors/ints/strings, so weights_only=True reads
    them. Captured now, at the step being saved (an async save writes the rest later)."""
    rank_state = {
        "format": FORMAT,
        "rank": pending.rank,
        "world_size": pending.world,
        "step": pending.step,
        "rng": capture_rng_state(),
        "extra_json": json.dumps(pending.extra),
    }
    torch.save(rank_state, pending.tmp / rank_file(pending.rank))


def complete_save(pending: PendingSave, my_entries: list[dict]) -> Path:
    """Every file written: gather the ranks' file entries, rank 0 writes the manifest, renames
    the directory into place and prunes; collective. Returns the final directory."""
    entries = [e for part in _all_gather_json(my_entries) for e in part]
    if pending.rank == 0:
        tmp = pending.tmp
        listed, present = sorted(e["path"] for e in entries), list_files(tmp)
        if listed != present:  # internal invariant: the manifest covers exactly the files
            raise CheckpointError(
                f"checkpoint {tmp}: files {present} on disk, {listed} hashed by the ranks")
        fsync_path(tmp)
        manifest = _build_manifest(pending.step, pending.config_yaml, pending.with_optimizer,
                                   pending.world, pending.extra, entries, pending.layout)
        write_manifest(tmp, manifest)
        fsync_path(tmp)
        _rename_into_place(tmp, pending.final)
    comm.barrier()
    if pending.rank == 0:  # renames now, deletes in a thread (off the step loop)
        prune_checkpoints(pending.root, pending.keep_last, background=True)
    comm.barrier()
    logger.info("saved checkpoint %s", pending.final)
    return pending.final


def _build_manifest(
    step: int, config_yaml: str, optimizer, world: int, extra: dict, entries: list[dict],
    layout: dict[str, int],
) -> dict[str, Any]:
    now = time.time()
    return {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "step": step,
        "time_unix": now,
        "time_utc": datetime.datetime.fromtimestamp(now, datetime.timezone.utc).isoformat(),
        "versions": _versions(),
        "world_size": world,
        "layout": layout,
        "optimizer_state": optimizer is not None,
        "distributed_optimizer": uses_distributed_optimizer(optimizer),
        "sharded_state_dict_metadata": dict(_SHARDED_METADATA),
        "model_config_sha256": structural_hash(model_section(config_yaml)),
        "config_yaml": config_yaml,
        "extra_rank0": extra,
        "files": sorted(entries, key=lambda e: e["path"]),
    }


def _rename_into_place(tmp: Path, final: Path) -> None:
    """Atomic rename; an existing checkpoint of the same step is replaced (moved aside first)."""
    old = None
    if final.exists():
        old = final.with_name(f"{TMP_PREFIX}replaced-{final.name}-{secrets.token_hex(4)}")
        final.rename(old)
    tmp.rename(final)
    fsync_path(final.parent)
    if old is not None:
        shutil.rmtree(old)


def _step_dirs(root: Path) -> list[tuple[int, Path]]:
    """``(step, path)`` for every ``step_*`` directory under ``root``, newest first."""
    if not root.is_dir():
        return []
    out = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir():
            out.append((int(m.group(1)), p))
    return sorted(out, reverse=True)


_PRUNER: threading.Thread | None = None
"""Rank 0's background deletion of pruned checkpoints (at most one at a time)."""


def wait_for_pruning() -> None:
    """Wait until a background prune (:func:`prune_checkpoints` ``background=True``) is done."""
    global _PRUNER
    if _PRUNER is not None:
        _PRUNER.join()
        _PRUNER = None


def _remove_dirs(paths: list[Path]) -> None:
    for path in paths:
        shutil.rmtree(path, ignore_errors=True)


def prune_checkpoints(root: Path, keep_last: int, background: bool = False) -> list[Path]:
    """Delete complete checkpoints under ``root`` beyond the newest ``keep_last``.

    Directories that fail verification are left alone (never count as kept, never deleted).
    ``background``: each is first renamed to ``.tmp-pruned-step_*-<random>`` (atomic; resume
    ignores ``.tmp-*``, so a crash mid-delete leaves no checkpoint that looks complete), then a
    thread deletes it; :func:`wait_for_pruning` waits for it (the next save and
    ``CheckpointSaver.close`` do). Returns the deleted checkpoints' original paths.
    """
    global _PRUNER
    complete = []
    for _, path in _step_dirs(Path(root)):
        try:
            read_manifest(path)
        except CheckpointError:
            continue
        complete.append(path)
    deleted = complete[keep_last:]
    aside = []
    for path in deleted:
        if background:
            aside.append(path.rename(
                path.with_name(f"{TMP_PREFIX}pruned-{path.name}-{secrets.token_hex(4)}")))
        else:
            shutil.rmtree(path)
        logger.info("deleted old checkpoint %s (keep_last=%d)", path, keep_last)
    if aside:
        wait_for_pruning()
        _PRUNER = threading.Thread(target=_remove_dirs, args=(aside,), name="ckpt-prune")
        _PRUNER.start()  # not a daemon: the interpreter finishes the deletion before exiting
    return deleted


# --- find / load ---------------------------------------------------------------------------------


def find_latest_checkpoint(root: Path) -> Path | None:
    """The newest complete checkpoint under ``root`` (manifest present, listed files present with
    their listed sizes), or None. ``.tmp-*`` leftovers of interrupted saves and damaged
    checkpoints are skipped with a warning."""
    root = Path(root)
    if not root.is_dir():
        return None
    leftovers = sorted(p.name for p in root.iterdir() if p.name.startswith(TMP_PREFIX))
    if leftovers:
        logger.warning(
            "ignoring %d incomplete checkpoint dir(s) in %s (interrupted saves, safe to delete "
            "when no save is running): %s",
            len(leftovers), root, ", ".join(leftovers),
        )
    for _, path in _step_dirs(root):
        try:
            manifest = read_manifest(path)
            raise_problems(path, check_files(path, manifest["files"]))
        except CheckpointError as e:
            logger.warning("skipping checkpoint: %s", e)
            continue
        return path
    return None


_WEIGHTS_ONLY_HINT = (
    " To take its model weights only: checkpoint.init_from=<this checkpoint> in a training run "
    "(a fresh optimizer; step, schedule and data start afresh), or "
    "load_checkpoint(..., load_optimizer=False) in code.")


def optimizer_layout_problem(manifest: dict, ckpt_dir: Path,
                             layout: Layout | None = None) -> str | None:
    """Why the checkpoint's optimizer state cannot load in this run's parallel ``layout``
    (:data:`Layout`), or None.

    Model weights reshard across any TP/PP/EP/CP/DP layout (dist_checkpointing); optimizer
    state does too, except: a DistributedOptimizer checkpoint (``dp_reshardable``) reshards
    across DP only, and no optimizer state crosses ep=1 <-> ep>1.
    """
    if not manifest.get("optimizer_state"):
        return None
    saved, now = manifest.get("layout", {}), layout_or_default(layout)
    diffs = [f"{k}: {saved.get(k)} in checkpoint != {now.get(k)} now"
             for k in ("tp", "pp", "vpp", "cp", "ep", "etp") if saved.get(k) != now.get(k)]
    if diffs and manifest.get("distributed_optimizer"):
        return (f"checkpoint {ckpt_dir} holds DistributedOptimizer state (dp_reshardable), which "
                f"reshards across data-parallel ranks only; layout differs: {'; '.join(diffs)}.")
    if (saved.get("ep", 1) > 1) != (now.get("ep", 1) > 1):
        # megatron keeps expert weights in their own optimizer only when ep > 1
        # (tensor_parallel/layers.py:829,886 'allreduce' -> optimizer/__init__.py:165).
        return (f"checkpoint {ckpt_dir} holds optimizer state saved at ep={saved.get('ep')}, "
                f"which cannot load at ep={now.get('ep')}: megatron keeps the experts' state in "
                "a separate optimizer only when ep > 1.")
    return None


def _check_layout(manifest: dict, optimizer, load_optimizer: bool, ckpt_dir: Path,
                  layout: Layout | None) -> None:
    """Refuse optimizer state this layout cannot take (:func:`optimizer_layout_problem`)."""
    problem = optimizer_layout_problem(manifest, ckpt_dir, layout) if load_optimizer else None
    if problem:
        raise CheckpointError(problem + _WEIGHTS_ONLY_HINT)


def optimizer_state_problem(ckpt_dir: Path, layout: Layout | None = None) -> str | None:
    """Why ``ckpt_dir``'s optimizer state cannot load in this run's ``layout``, or None if it
    can (the rules of ``load_checkpoint``'s layout check, asked before loading)."""
    try:
        return optimizer_layout_problem(read_manifest(ckpt_dir), ckpt_dir, layout)
    except CheckpointError as e:
        return str(e)


def _describe_load_error(e: BaseException) -> str:
    """One line per cause; DCP's own message is only a list of failed ranks plus tracebacks."""
    if isinstance(e, DCPCheckpointException):
        causes = [f"rank {rank}: {type(exc).__name__}: {exc}"
                  for rank, (exc, _) in sorted(e.failures.items())]
        return "; ".join(causes) or str(e)
    return f"{type(e).__name__}: {e}"


def load_checkpoint(
    path: Path,
    model_chunks: list,
    optimizer,
    scheduler,
    strict: bool = True,
    load_optimizer: bool = True,
    verify_hashes: bool = True,
    config_yaml: str | None = None,
    layout: Layout | None = None,
) -> dict:
    """Load a checkpoint into live objects; collective over all ranks. Returns this rank's extra.

    Args:
        path: a checkpoint directory (``<root>/step_XXXXXXX``).
        model_chunks: this rank's model chunks, built for the same model config.
        optimizer: megatron optimizer to restore, or None.
        scheduler: ``OptimizerParamScheduler`` to restore, or None to keep the live one.
        strict: require every model key in the checkpoint and vice versa.
        load_optimizer: restore optimizer state; if False, model weights only (fp32 main params
            re-copied from the loaded weights).
        verify_hashes: check every file's digest against the manifest (XXH3-128 where the
            manifest has it, else sha256), not only its size (each
            rank a share of the files, hashed in threads while DCP reads them, or first on
            fewer than ``hashed_io.OVERLAP_MIN_CPUS`` CPUs; a mismatch is raised before the
            state is applied, though with the overlap DCP may already have read tensors into
            the live parameters: after a CheckpointError, rebuild the model).
        config_yaml: this run's JobConfig YAML; if given, the model section must match the
            checkpoint's (the error lists the differing fields).
        layout: this run's parallel sizes (:data:`Layout`): optimizer state saved in a layout
            it cannot take is refused.

    Returns:
        The ``extra`` dict this rank saved. RNG states (python, numpy, torch, CUDA, megatron's
        tracker) are restored as a side effect. If the world size changed, RNG states are left
        alone and rank 0's ``extra`` is returned on every rank.

    Raises:
        CheckpointError: damaged, foreign or incompatible checkpoint (same error on every rank).
    """
    rank, world = _rank_world()
    path = Path(path)

    def check() -> dict:
        manifest = read_manifest(path)
        # Sizes now; digests beside the read below. _agree() joins the ranks' verdicts.
        raise_problems(path, check_files(path, manifest["files"][rank::world]))
        if config_yaml is not None:
            check_model_config(manifest, config_yaml, path)
        _check_layout(manifest, optimizer, load_optimizer, path, layout)
        return manifest

    manifest = _agree(check)
    with_optimizer = optimizer if load_optimizer else None
    if with_optimizer is not None and not manifest["optimizer_state"]:
        logger.info("checkpoint %s has no optimizer state (saved before the first step)", path)
        with_optimizer = None
    if with_optimizer is not None:
        allocate_distributed_optimizer_state(with_optimizer)
    state = sharded_state_dict(
        model_chunks, with_optimizer, manifest["sharded_state_dict_metadata"], is_loading=True
    )
    # This rank's share of the files is hashed in threads while DCP reads, or first where no
    # core is to spare (hashed_io.py).
    hasher = (BackgroundHasher(path, verify_share(manifest["files"], rank, world))
              if verify_hashes else None)
    if hasher is not None and not overlap_hashing():
        _agree(lambda: raise_problems(path, hasher.problems()))
        hasher = None
    try:
        loaded = dist_checkpointing.load(
            state,
            str(path),
            sharded_strategy=SafeTorchDistLoadStrategy(),
            common_strategy=SafeCommonLoadStrategy(),
            strict=StrictHandling.ASSUME_OK_UNEXPECTED if strict else StrictHandling.LOG_ALL,
        )
    # megatron's CheckpointingException, key/shape errors; DCP's CheckpointException (which
    # derives from BaseException) carries the per-rank errors of its read phase.
    except (Exception, DCPCheckpointException) as e:
        if hasher is not None:  # a damaged file explains a failed read best
            raise_problems(path, hasher.problems())
        if isinstance(e, CheckpointError):
            raise
        raise CheckpointError(f"cannot load {path}: {_describe_load_error(e)}") from e
    if hasher is not None:  # before anything reaches the live objects' load_state_dict
        _agree(lambda: raise_problems(path, hasher.problems()))

    chunks = [unwrap(m) for m in model_chunks]
    for key, chunk in zip(model_keys(len(chunks)), chunks):
        chunk.load_state_dict(loaded[key], strict=strict)
    if with_optimizer is not None:
        # DistributedOptimizer's dp_reshardable load writes into parameters in place.
        with torch.no_grad():
            optimizer.load_state_dict(loaded["optimizer"])
        fix_distributed_optimizer_steps(optimizer)
    elif optimizer is not None:
        optimizer.reload_model_params()  # fp32 main params <- the loaded (bf16) weights
    if scheduler is not None:
        if "scheduler" not in loaded:
            raise CheckpointError(f"checkpoint {path} has no scheduler state")
        scheduler.load_state_dict(loaded["scheduler"])

    same_world = manifest["world_size"] == world
    rank_path = path / rank_file(rank if same_world else 0)
    rank_state = weights_only_load(rank_path, str(rank_path))
    if same_world:
        restore_rng_state(rank_state["rng"])
    else:
        logger.warning(
            "checkpoint %s was saved by %d ranks, this run has %d: RNG states not restored, "
            "every rank gets rank 0's extra state", path, manifest["world_size"], world,
        )
    comm.barrier()
    logger.info("loaded checkpoint %s (step %d)", path, manifest["step"])
    return json.loads(rank_state["extra_json"])
