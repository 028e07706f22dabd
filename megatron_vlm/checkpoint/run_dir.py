"""The run directory: one job at a time, no silent mixing of runs, and a resume that either
continues this run's model or says why it cannot.

:func:`start_run` is what a run calls first (rank 0 decides, every rank gets the verdict):

1. **Lock.** ``<train.output_dir>/run.lock`` (and ``<checkpoint.dir>/run.lock`` when the
   checkpoints live elsewhere) is held for the job's lifetime (:func:`acquire_run_lock`). A
   second job on the same directory is refused, naming the holder.
2. **Fresh run or resume** (``checkpoint.resume``):

   * ``never``: refused when the directory holds a previous run (checkpoints or a non-empty
     ``metrics.jsonl``): appending to its metrics and a later resume picking its checkpoint
     would mix two runs. ``checkpoint.overwrite`` moves that run aside (:func:`move_aside`).
   * ``auto``: the newest complete checkpoint, or step 0 with a message saying so.
   * ``require``: the newest complete checkpoint, or :class:`RunDirError` naming the directory.
   * ``checkpoint.load``: that checkpoint.
3. **Resumable?** (:func:`resume_problem`): the checkpoint must hold this model (every model
   field but the runtime ones, :data:`RUNTIME_MODEL_FIELDS`) and optimizer state this
   parallel layout can take (``dist.optimizer_layout_problem``). TP/PP/EP/CP/DP changes
   otherwise reshard on load. Model changes between stages go through ``checkpoint.init_from``.
4. ``job.yaml`` is written (after the lock: a refused job leaves the running one's alone).

After the load, :func:`lr_report` says the learning rate of the checkpoint's schedule and of
this run's at the resume step (the run follows its own schedule, ``optim/schedules.py``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import json
import os
import socket
import threading
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch.distributed as dist
import yaml

from megatron_vlm.checkpoint.dist import (
    TMP_PREFIX,
    Layout,
    _all_gather_json,
    _step_dirs,
    find_latest_checkpoint,
    optimizer_layout_problem,
)
from megatron_vlm.checkpoint.manifest import (
    ABSENT,
    CheckpointError,
    field_diffs,
    format_diff,
    model_section,
    read_manifest,
)
from megatron_vlm.config.checkpoint import CheckpointConfig
from megatron_vlm.config.job import from_dict
from megatron_vlm.config.model import ModelConfig
from megatron_vlm.config.optim import OptimConfig
from megatron_vlm.optim.schedules import lr_at

LOCK_NAME = "run.lock"
HEARTBEAT_S = 10.0
"""The lock holder refreshes the lock file's mtime this often (a daemon thread)."""
PROBE_BEATS = 2.5
"""A holder on another host is alive iff its heartbeat moves within this many periods."""
METRICS_FILES = ("metrics.jsonl", "tensorboard", "loss_curve.png")
"""What a run writes into its directory besides checkpoints (moved aside by an overwrite)."""


class RunDirError(CheckpointError):
    """This run may not start in its run directory; the message says why and what to do."""


# --- the lock ------------------------------------------------------------------------------------


@dataclass
class RunLock:
    """``<dir>/run.lock``, held with ``flock`` (the kernel drops it when the process dies, however
    it dies) and naming its holder; :meth:`release` removes it."""

    path: Path
    fd: int | None
    guard: threading.Lock = field(default_factory=threading.Lock)
    """Orders the heartbeat's touch against :meth:`release` closing the descriptor."""

    def beat(self) -> None:
        """Refresh the file's mtime every ``HEARTBEAT_S`` until released (a daemon thread)."""
        while True:
            time.sleep(HEARTBEAT_S)
            with self.guard:
                if self.fd is None:
                    return
                with contextlib.suppress(OSError):
                    os.utime(self.fd)

    def release(self) -> None:
        with self.guard:
            if self.fd is None:
                return
            try:  # unlink before unlocking: a job that opened this file retries on the new one
                if _same_file(self.fd, self.path):
                    self.path.unlink()
            except OSError:
                pass
            with contextlib.suppress(OSError):
                fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def _same_file(fd: int, path: Path) -> bool:
    try:
        a, b = os.fstat(fd), os.stat(path)
    except OSError:
        return False
    return (a.st_dev, a.st_ino) == (b.st_dev, b.st_ino)


def _describe(holder: dict | None) -> str:
    if not holder:
        return "an unknown process (unreadable lock file)"
    slurm = f", SLURM job {holder['slurm_job_id']}" if holder.get("slurm_job_id") else ""
    return (f"pid {holder.get('pid')} on host {holder.get('host')}{slurm}, "
            f"started {holder.get('started_utc')}")


def _read_holder(fd: int) -> dict | None:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        data = json.loads(os.read(fd, 1 << 16).decode() or "null")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def _pid_alive(pid: Any) -> bool:
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, TypeError, ValueError):
        return True  # another user's process, or no pid to test: assume alive
    return True


def _heartbeat_moves(fd: int) -> bool:
    """Whether another host's holder refreshes the lock file within ``PROBE_BEATS`` periods."""
    before, deadline = os.fstat(fd).st_mtime_ns, time.monotonic() + PROBE_BEATS * HEARTBEAT_S
    while time.monotonic() < deadline:
        time.sleep(min(1.0, HEARTBEAT_S / 4))
        if os.fstat(fd).st_mtime_ns != before:
            return True
    return False


def _open_locked(path: Path) -> tuple[int, bool]:
    """Open ``path`` and ``flock`` it; ``(fd, flock_works)``. Raises BlockingIOError if held."""
    for _ in range(10):  # the holder may unlink the file between our open and our flock
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise
        except OSError as e:
            if e.errno not in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                os.close(fd)
                raise
            return fd, False  # no flock on this file system (e.g. Lustre without -o flock)
        if _same_file(fd, path):
            return fd, True
        os.close(fd)
    raise RunDirError(f"cannot take the lock {path}: it keeps being replaced")


def acquire_run_lock(directory: Path) -> tuple[RunLock, str | None]:
    """Hold ``directory/run.lock`` for this job; returns the lock and a message when a stale lock
    (its holder crashed or was killed) was taken over.

    A holder is alive when the kernel's ``flock`` says so. Where ``flock`` is missing or not
    coherent across nodes, the lock file decides: a holder on this host is alive iff its pid
    is; one on another host iff its heartbeat (the file's mtime, refreshed every
    ``HEARTBEAT_S``) moves while we watch for ``PROBE_BEATS`` periods.

    Raises:
        RunDirError: another job holds the directory (the message names it).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / LOCK_NAME

    def busy(holder: dict | None) -> RunDirError:
        return RunDirError(
            f"run directory {directory} is in use by another job ({_describe(holder)}; lock "
            f"{path}): wait for it to end or stop it, or choose another train.output_dir / "
            "checkpoint.dir")

    try:
        fd, flock_works = _open_locked(path)
    except BlockingIOError:
        holder = None
        try:
            holder = json.loads(path.read_text() or "null")
        except (OSError, ValueError):
            pass
        raise busy(holder) from None
    holder, host, message = _read_holder(fd), socket.gethostname(), None
    if holder and (holder.get("host"), holder.get("pid")) != (host, os.getpid()):
        if holder.get("host") == host:
            alive = not flock_works and _pid_alive(holder.get("pid"))
        else:  # flock may be node-local (Lustre localflock): ask the heartbeat
            alive = _heartbeat_moves(fd)
        if alive:
            os.close(fd)
            raise busy(holder)
        message = f"took over the stale lock {path} of {_describe(holder)}: that job is gone"
    mine = {"host": host, "pid": os.getpid(), "slurm_job_id": os.environ.get("SLURM_JOB_ID"),
            "started_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(mine).encode(), 0)
    os.fsync(fd)
    lock = RunLock(path, fd)
    threading.Thread(target=lock.beat, daemon=True, name="run-lock-heartbeat").start()
    return lock, message


# --- previous runs -------------------------------------------------------------------------------


def previous_run(run_dir: Path, ckpt_root: Path) -> list[Path]:
    """What a previous run left that a fresh run must not mix with: checkpoint directories
    (complete or not) under ``ckpt_root`` and a non-empty ``metrics.jsonl`` in ``run_dir``.
    Empty for an unused directory."""
    found = [p for _, p in reversed(_step_dirs(ckpt_root))]
    if ckpt_root.is_dir():
        found += sorted(p for p in ckpt_root.iterdir() if p.name.startswith(TMP_PREFIX))
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file() and metrics.stat().st_size > 0:
        found.append(metrics)
    return found


def _inside(path: Path, parent: Path) -> bool:
    return path.resolve().is_relative_to(parent.resolve())


def move_aside(run_dir: Path, ckpt_root: Path) -> Path:
    """Move a previous run's checkpoints, metrics, TensorBoard files and plot into
    ``run_dir/replaced-<UTC time>/`` (renames; nothing is deleted). Checkpoints under a root
    outside ``run_dir`` go to ``<root>.replaced-<UTC time>`` beside it. Returns the run's
    ``replaced-*`` directory."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    aside = run_dir / f"replaced-{stamp}"
    while aside.exists():
        aside = aside.with_name(aside.name + "_")
    ckpt_aside = (aside / ckpt_root.resolve().relative_to(run_dir.resolve())
                  if _inside(ckpt_root, run_dir) else
                  ckpt_root.with_name(f"{ckpt_root.name}.replaced-{stamp}"))
    moves = [(p, ckpt_aside / p.name) for p in previous_run(run_dir, ckpt_root)
             if p.parent == ckpt_root]
    moves += [(run_dir / n, aside / n) for n in METRICS_FILES if (run_dir / n).exists()]
    for src, dst in moves:
        dst.parent.mkdir(parents=True, exist_ok=True)
        try:
            src.rename(dst)
        except OSError as e:
            raise RunDirError(f"checkpoint.overwrite: cannot move {src} to {dst} ({e}); move or "
                              "delete the previous run by hand") from e
    return aside


# --- choosing the start --------------------------------------------------------------------------


def choose_start(run_dir: Path, ckpt_root: Path, cfg: CheckpointConfig) -> tuple[Path | None,
                                                                                   list[str]]:
    """The checkpoint to resume (None: step 0) and the messages to print; applies
    ``checkpoint.overwrite``. Raises RunDirError for a refused start."""
    if cfg.load:
        return Path(cfg.load), []
    if cfg.resume != "never":
        ignored = f"checkpoint.overwrite ignored: this run resumes (checkpoint.resume={cfg.resume})"
        notes = [ignored] if cfg.overwrite else []
        latest = find_latest_checkpoint(ckpt_root)
        if latest is not None:
            return latest, notes
        others = [p.name for p in previous_run(run_dir, ckpt_root) if p.parent == ckpt_root]
        seen = f" (incomplete or damaged, ignored: {', '.join(others)})" if others else ""
        if cfg.resume == "require":
            raise RunDirError(
                f"checkpoint.resume=require: no complete checkpoint in {ckpt_root}{seen}. "
                "Nothing to resume: check train.output_dir / checkpoint.dir, or start the run "
                "with --resume=auto")
        fresh = (f"checkpoint.resume=auto: no complete checkpoint in {ckpt_root}{seen}; "
                 "starting at step 0")
        return None, [*notes, fresh]
    previous = previous_run(run_dir, ckpt_root)
    if not previous:
        return None, []
    names = ", ".join(str(p) for p in previous[:4]) + (" ..." if len(previous) > 4 else "")
    if not cfg.overwrite:
        raise RunDirError(
            f"run directory {run_dir} holds a previous run ({names}); a fresh run there would "
            "mix with it. Continue it with --resume, move it aside with --overwrite "
            "(checkpoint.overwrite=true), or choose another train.output_dir")
    aside = move_aside(run_dir, ckpt_root)
    return None, [f"checkpoint.overwrite: moved the previous run ({names}) to {aside}"
                  + (f" and {ckpt_root}.replaced-*" if not _inside(ckpt_root, run_dir) else "")
                  + "; starting at step 0"]


#: Model fields a resume may change: how the same weights are computed, regularised or logged,
#: never their shapes or meaning (kernels, recomputation, dropout, QK-Clip, the router's bias
#: update, initialisation that a load overwrites, the tower's TP mode, which reshards).
RUNTIME_MODEL_FIELDS = (
    "model.kernels",
    "model.llm.recompute", "model.llm.recompute_num_layers", "model.llm.recompute_modules",
    "model.llm.attention_dropout", "model.llm.hidden_dropout", "model.llm.init_method_std",
    "model.llm.qk_clip", "model.llm.qk_clip_threshold", "model.llm.log_max_attention_logit",
    "model.llm.moe_router_bias_update_rate", "model.llm.moe_aux_loss_coeff",
    "model.llm.moe_token_dispatcher",
    "model.vision.recompute", "model.vision.recompute_num_layers",
    "model.vision.attention_dropout", "model.vision.hidden_dropout",
    "model.vision.init_method_std", "model.vision.qk_clip", "model.vision.qk_clip_threshold",
    "model.vision.log_max_attention_logit", "model.vision.parallel_mode",
    "model.projector.init_method_std",
)
FROM_TOKENIZER = "model.token_ids"
"""Its fields left null are filled from the tokenizer at start-up (which checks them)."""


def _defaults(tp: Any) -> Any:
    """A config dataclass's default values as a nested dict (optional sections filled in)."""
    hints = typing.get_type_hints(tp)
    out = {}
    for f in dataclasses.fields(tp):
        sub = next((t for t in (hints[f.name], *typing.get_args(hints[f.name]))
                    if dataclasses.is_dataclass(t)), None)
        if sub is not None:
            out[f.name] = _defaults(sub)
        elif f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
    return out


def _at(tree: Any, path: str) -> Any:
    """The value at dotted ``path`` (its first part naming ``tree`` itself), or ABSENT."""
    for key in path.split(".")[1:]:
        tree = tree.get(key, ABSENT) if isinstance(tree, dict) else ABSENT
    return tree


def model_differences(manifest: dict[str, Any], config_yaml: str) -> list[str]:
    """The model fields that keep this run from resuming a checkpoint (``"model.llm.num_layers:
    3 in checkpoint != 2 now"``): every difference but the runtime fields, token ids left to
    the tokenizer, a field the checkpoint predates that is at its default now, and a field
    this version no longer has."""
    saved, now = model_section(manifest.get("config_yaml")), model_section(config_yaml)
    defaults = _defaults(ModelConfig)
    out = []
    for path, old, new in field_diffs(saved, now, "model"):
        if any(path == f or path.startswith(f + ".") for f in RUNTIME_MODEL_FIELDS):
            continue
        if (path == FROM_TOKENIZER or path.startswith(FROM_TOKENIZER + ".")) and (
                new is None or old is ABSENT):
            continue
        if new is ABSENT or (old is ABSENT and new == _at(defaults, path)):
            continue
        out.append(format_diff(path, old, new))
    return out


def resume_problem(ckpt: Path, config_yaml: str, layout: Layout | None = None) -> str | None:
    """Why this run cannot resume ``ckpt`` (a different model, or optimizer state this parallel
    ``layout`` cannot take: ``dist.Layout``), naming the fields; None when it can. Needs no
    model."""
    try:
        manifest = read_manifest(ckpt)
    except CheckpointError as e:
        return f"cannot resume: {e}"
    diffs = model_differences(manifest, config_yaml)
    if diffs:
        return (f"cannot resume from {ckpt}: it holds another model ({'; '.join(diffs)}). A "
                "resume continues the same model; to change it (a new stage: RoPE base, YaRN, "
                "frozen modules ...) start a new train.output_dir with "
                f"checkpoint.init_from={ckpt}")
    problem = optimizer_layout_problem(manifest, ckpt, layout)
    if problem:
        saved = " ".join(f"{k}={v}" for k, v in manifest.get("layout", {}).items())
        return (f"cannot resume from {ckpt} in this parallel layout: {problem} Resume in the "
                f"checkpoint's layout ({saved}), or start a new train.output_dir from its weights "
                f"with checkpoint.init_from={ckpt} (fresh optimizer state)")
    return None


# --- the collective entry ------------------------------------------------------------------------


@dataclass
class RunStart:
    """The verdict of :func:`start_run`: where to start, what to say, the locks to release."""

    resume_from: Path | None
    messages: list[str]
    locks: list[RunLock] = field(default_factory=list)

    def release(self) -> None:
        for lock in reversed(self.locks):
            lock.release()
        self.locks.clear()


def _claim(run_dir: Path, ckpt_root: Path, cfg: CheckpointConfig, config_yaml: str,
           locks: list[RunLock], layout: Layout | None) -> tuple[Path | None, list[str]]:
    """Rank 0's part of :func:`start_run`; appends the locks it takes to ``locks``."""
    messages, created = [], [d for d in (run_dir, ckpt_root) if not d.exists()]
    try:
        for root in [run_dir] + ([] if _inside(ckpt_root, run_dir) else [ckpt_root]):
            lock, message = acquire_run_lock(root)
            locks.append(lock)
            messages += [message] if message else []
        resume_from, notes = choose_start(run_dir, ckpt_root, cfg)
        if resume_from is not None:
            problem = resume_problem(resume_from, config_yaml, layout)
            if problem:
                raise RunDirError(problem)
    except RunDirError:
        for lock in reversed(locks):
            lock.release()
        locks.clear()
        for d in reversed(created):  # a mistyped checkpoint.dir is not left behind, empty
            with contextlib.suppress(OSError):
                d.rmdir()
        raise
    (run_dir / "job.yaml").write_text(config_yaml)
    return resume_from, messages + notes


def start_run(run_dir: Path, ckpt_root: Path, cfg: CheckpointConfig,
              config_yaml: str, layout: Layout | None = None) -> RunStart:
    """Lock the run directory, refuse a start that would lose or mix runs, pick the checkpoint
    to resume (see the module docstring). Collective when torch.distributed is up: rank 0
    decides and holds the locks, every rank gets the same verdict. ``layout``: this run's
    parallel sizes (``Runtime.layout()``), against which a checkpoint's optimizer state is
    checked.

    Raises:
        RunDirError: on every rank, with rank 0's reason.
    """
    rank = dist.get_rank() if dist.is_initialized() else 0
    locks: list[RunLock] = []
    verdict: dict[str, Any] = {}
    if rank == 0:
        try:
            resume_from, messages = _claim(Path(run_dir), Path(ckpt_root), cfg, config_yaml,
                                           locks, layout)
            verdict = {"resume_from": resume_from and str(resume_from), "messages": messages}
        except (CheckpointError, OSError) as e:
            verdict = {"error": str(e)}
    if dist.is_initialized():
        verdict = _all_gather_json(verdict)[0]
    start = RunStart(None, verdict.get("messages", []), locks)
    if "error" in verdict:
        start.release()
        raise RunDirError(verdict["error"])
    start.resume_from = Path(verdict["resume_from"]) if verdict["resume_from"] else None
    return start


# --- the learning rate across a resume -----------------------------------------------------------


def _schedule(optim: OptimConfig, total_steps: int) -> str:
    return (f"{optim.schedule}, lr {optim.lr:g}, min_lr {optim.min_lr:g}, warmup "
            f"{optim.warmup_steps}, {total_steps} steps")


def lr_report(ckpt: Path, optim: OptimConfig, total_steps: int, step: int,
              num_steps: int) -> list[str]:
    """Lines saying the learning rate at the resume step in the checkpoint's schedule and in
    this run's (which the run follows), plus a warning when it rises by more than 1%.

    Args:
        ckpt: the resumed checkpoint (its manifest holds the old run's config).
        optim: this run's optimizer config; ``total_steps`` its ``train.steps``.
        step: the resumed training step; ``num_steps``: the scheduler's step count there
            (skipped steps do not advance the schedule).
    """
    new = lr_at(optim, total_steps, num_steps)
    try:
        saved = yaml.safe_load(read_manifest(ckpt)["config_yaml"])
        old_optim, old_total = from_dict(OptimConfig, saved["optim"]), int(saved["train"]["steps"])
        old = lr_at(old_optim, old_total, num_steps)
    except (CheckpointError, KeyError, TypeError, ValueError, AssertionError) as e:
        unknown = (f"learning rate at resume step {step}: {new:.6g} (this run's schedule: "
                   f"{_schedule(optim, total_steps)}; the checkpoint's is unreadable: {e})")
        return [unknown]
    if (old_optim, old_total) == (optim, total_steps):
        return [f"learning rate at resume step {step}: {new:.6g} (schedule unchanged)"]
    lines = [(f"learning rate at resume step {step}: {old:.6g} in the checkpoint's schedule "
              f"({_schedule(old_optim, old_total)}) -> {new:.6g} in this run's "
              f"({_schedule(optim, total_steps)}), which the run follows")]
    if new > old * 1.01:
        rise = f"+{100 * (new / old - 1):.1f}%" if old > 0 else "from 0"
        lines.append(f"warning: the learning rate rises on resume ({old:.6g} -> {new:.6g}, "
                     f"{rise}): the new schedule is not where the old one was at step {step} "
                     "(e.g. a WSD run extended after its decay began); if unintended, resume "
                     "with the old optim.* and train.steps")
    return lines


__all__ = ["RunDirError", "RunLock", "RunStart", "acquire_run_lock", "choose_start",
           "lr_report", "move_aside", "previous_run", "resume_problem", "start_run"]
