"""Start a run from another run's weights (``checkpoint.init_from``): an imported checkpoint or the
previous training stage's. Keeps that checkpoint's optimizer state only when it trained exactly
the parameters this run trains (same trainable set), otherwise starts a fresh optimizer.

The trainable set is recorded at every save (``trainable_set`` in the checkpoint's extra state,
which the manifest repeats for rank 0) as a sha256 of the sorted trainable parameter names (the
union over all ranks of each rank's local names) with per-module counts, so a 1T-parameter
checkpoint stays small. Local names depend on the pipeline split, so a PP change counts as a
different set (a fresh optimizer: conservative, never a mismatched state).
"""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import torch.distributed as dist
import yaml

from megatron_vlm.checkpoint import find_latest_checkpoint, load_checkpoint
from megatron_vlm.checkpoint.dist import optimizer_state_problem
from megatron_vlm.checkpoint.manifest import CheckpointError, read_manifest
from megatron_vlm.checkpoint.sharded_state import unwrap
from megatron_vlm.parallel import comm

EXTRA_KEY = "trainable_set"


def trainable_set(chunks) -> dict:
    """``{"sha256", "count", "modules"}`` of the parameters with ``requires_grad`` (all ranks)."""
    names = sorted({n for c in chunks for n, p in unwrap(c).named_parameters() if p.requires_grad})
    if dist.is_initialized() and dist.get_world_size() > 1:
        gathered: list = [None] * dist.get_world_size()
        comm.all_gather_object(gathered, names)
        names = sorted({n for rank_names in gathered for n in rank_names})
    modules = Counter(n.split(".", 1)[0] for n in names)
    return {"sha256": hashlib.sha256("\n".join(names).encode()).hexdigest(),
            "count": len(names), "modules": dict(sorted(modules.items()))}


def resolve_init_from(path: str | Path) -> Path:
    """A checkpoint directory as given, or the newest complete checkpoint under a root."""
    path = Path(path)
    if (path / "manifest.json").is_file():
        return path
    latest = find_latest_checkpoint(path) if path.is_dir() else None
    if latest is None:
        raise CheckpointError(
            f"checkpoint.init_from={str(path)!r} is neither a checkpoint directory (with "
            "manifest.json) nor a root holding a complete one; run the previous stage first or "
            "fix the path")
    return latest


@dataclass
class InitFromReport:
    path: Path
    optimizer_kept: bool
    message: str


def _saved_optimizer(manifest: dict) -> str | None:
    """``optim.optimizer`` of the run that saved (None when the manifest has no config)."""
    config = yaml.safe_load(manifest.get("config_yaml") or "{}") or {}
    return (config.get("optim") or {}).get("optimizer")


def init_from_checkpoint(path: str | Path, chunks, optimizer, scheduler,
                         optimizer_kind: str | None = None,
                         layout: dict[str, int] | None = None) -> InitFromReport:
    """Load ``path``'s model weights into ``chunks``, and its optimizer state if the trainable
    sets match, the same optimizer (``optimizer_kind``: this run's ``optim.optimizer``) made it
    and this ``layout`` (``Runtime.layout()``; None: the process's groups) can take it; the LR
    schedule, step and data stay fresh."""
    ckpt = resolve_init_from(path)
    manifest = read_manifest(ckpt)
    saved = (manifest.get("extra_rank0") or {}).get(EXTRA_KEY)
    now = trainable_set(chunks)
    saved_kind = _saved_optimizer(manifest)
    if not manifest.get("optimizer_state"):
        keep, why = False, "the checkpoint holds no optimizer state (weights only)"
    elif optimizer_kind is not None and saved_kind not in (None, optimizer_kind):
        keep, why = False, (f"the optimizer changed: optim.optimizer={saved_kind} in the "
                            f"checkpoint, {optimizer_kind} now")
    elif saved is None:
        keep, why = False, "the checkpoint does not record its trainable parameter set"
    elif saved["sha256"] != now["sha256"]:
        keep, why = False, (f"the trainable set changed: {saved['count']} tensors "
                            f"{saved['modules']} in the checkpoint, {now['count']} "
                            f"{now['modules']} now")
    else:
        problem = optimizer_state_problem(ckpt, layout)
        keep, why = problem is None, problem or "the trainable set is identical"
    load_checkpoint(ckpt, chunks, optimizer, None, load_optimizer=keep, layout=layout)
    if keep:
        # The loaded param groups carry the old run's LR; put the fresh schedule's back.
        scheduler.step(increment=0)
    verdict = "kept" if keep else "reset (fresh optimizer)"
    return InitFromReport(ckpt, keep, f"initialised from {ckpt} (step {manifest['step']}): model "
                                      f"weights loaded; optimizer state {verdict}: {why}; LR "
                                      "schedule, step and data start fresh")
