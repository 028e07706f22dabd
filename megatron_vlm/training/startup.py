"""What a run checks before it builds a model: the inputs a real recipe needs, optional packages,
the tokenizer and data paths, the token ids a resumed checkpoint was trained with. A problem on any
rank ends the run on every rank with one message (``parallel.agree.StartupError``), which the CLI
prints once, without a traceback, before any GPU memory is spent on a model.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import yaml

from megatron_vlm.checkpoint import read_manifest
from megatron_vlm.config.job import JobConfig
from megatron_vlm.data.token_ids import MEDIA_ID_NAMES
from megatron_vlm.parallel.agree import agree_on_startup
from megatron_vlm.training.data_setup import DataSetup, build_data, share_batches
from megatron_vlm.training.wandb_log import check_wandb


def set_cpu_threads(job: JobConfig) -> int:
    """Apply ``train.cpu_threads`` (if set); the intra-op threads this rank uses."""
    if job.train.cpu_threads is not None:
        torch.set_num_threads(job.train.cpu_threads)
    return torch.get_num_threads()


def with_token_ids(job: JobConfig, data: DataSetup) -> JobConfig:
    """``job`` with ``model.token_ids`` as resolved against the run's tokenizer."""
    if data.token_ids is None:
        return job
    model = dataclasses.replace(job.model, token_ids=data.token_ids)
    return dataclasses.replace(job, model=model)


def check_resumed_token_ids(job: JobConfig, resume_from: Path | None) -> None:
    """A resumed checkpoint trained with other media ids than this run's tokenizer gives is
    refused (older checkpoints record none and pass)."""
    if resume_from is None:
        return
    saved = yaml.safe_load(read_manifest(resume_from).get("config_yaml") or "{}") or {}
    saved_ids = (saved.get("model") or {}).get("token_ids") or {}
    now = job.model.token_ids
    wrong = [f"model.token_ids.{n}: {saved_ids[n]} in the checkpoint, {getattr(now, n)} from the "
             "tokenizer" for n in MEDIA_ID_NAMES
             if saved_ids.get(n) is not None and getattr(now, n) is not None
             and saved_ids[n] != getattr(now, n)]
    if wrong:
        raise ValueError(f"{resume_from} was trained with another tokenizer's media ids: "
                         + "; ".join(wrong) + "; set data.tokenizer to the run's tokenizer")


def prepare_run(job: JobConfig, *, dp_rank: int, dp_size: int, run_dir: Path,
                resume_from: Path | None, is_writer: bool,
                pg_collection=None) -> tuple[JobConfig, DataSetup]:
    """The checks and the data pipeline, agreed over ranks; returns the job with its token ids
    resolved (rank 0 rewrites ``job.yaml`` with them) and this rank's data (with
    ``pg_collection``, built on each replica's source rank and handed to the others:
    ``data_setup.share_batches``)."""
    def checks() -> None:
        job.check_inputs()
        check_wandb(job)

    agree_on_startup(checks, "config error")
    data = agree_on_startup(
        lambda: build_data(job, dp_rank=dp_rank, dp_size=dp_size, run_dir=run_dir,
                           pg_collection=pg_collection),
        "data error")
    try:
        data = share_batches(data, pg_collection)  # after the agreement: every rank has built
        job = with_token_ids(job, data)
        agree_on_startup(lambda: check_resumed_token_ids(job, resume_from), "resume refused")
    except BaseException:
        data.close()
        raise
    if is_writer:
        (run_dir / "job.yaml").write_text(job.to_yaml())
    return job, data
