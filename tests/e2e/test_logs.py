"""Logs a team reads: a 2-rank run prints the start-up banner and validation losses once (rank 0)
and nothing on stderr; a start-up error is one line, printed once, with no traceback of ours; the
optional W&B run (offline) mirrors the metrics and continues across a resume."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from tiny_runs import REPO, train_env

TWO_RANK_ARGS = ["--recipe", "tiny_vlm_cpu", "train.steps=3", "optim.warmup_steps=1",
                 "train.eval_interval=0", "train.eval_batches=1", "data.global_batch_size=2",
                 "data.multimodal.num_workers=1", "train.plot=false"]


def torchrun(args: list[str], timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "-m", "megatron_vlm.train", *args],
        cwd=REPO, env=train_env(), capture_output=True, text=True, timeout=timeout)


def test_two_rank_run_prints_the_banner_once_and_keeps_stderr_quiet(tmp_path):
    run = tmp_path / "run"
    proc = torchrun([*TWO_RANK_ARGS, f"train.output_dir={run}"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    err = [line for line in proc.stderr.splitlines() if line.strip()]
    # Third-party noise per rank (TE/Apex fallbacks, pin_memory, energon's buffer bars,
    # megatron deprecations) is silenced: at most a few lines, none of those.
    assert len(err) <= 3, err
    for noise in ("pin_memory", "Filling reading buffer", "not installed", "Deprecat"):
        assert noise not in proc.stderr
    out = proc.stdout
    assert out.count("=== tiny_vlm_cpu:") == 1  # rank 0 only
    assert "layout: world 2 = tp 1 x pp 1 x cp 1 x dp 2" in out
    assert re.search(r"params: [\d,]+ total \(\S+\), [\d,]+ active per token", out)
    assert "kernels: backend=local" in out
    assert re.search(r"tokenizer: SentencePiece \S+spm_1024\.model .*\+ 7 media tokens", out)
    assert "data: stage 'joint', shares of LLM tokens" in out
    for name in ("video", "image_caption", "image_qa", "interleaved", "text"):
        assert re.search(rf"^  {name} \(\w+\): [\d.]+% \(weight", out, re.M), name
    assert f"output: {run.resolve()}" in out
    assert "resume: none, starting at step 0" in out
    assert "threads: 1 per rank" in out
    # Validation losses are printed when computed (start and end), one line each.
    assert re.search(r"^valid 0/3 \| image_caption \d", out, re.M)
    assert re.search(r"^valid 3/3 \| image_caption \d", out, re.M)
    assert out.count("valid 3/3") == 1
    assert re.search(r"^step 3/3 \| loss", out, re.M)  # the last step always reports


def test_a_startup_error_is_one_line_printed_once(tmp_path):
    proc = torchrun([*TWO_RANK_ARGS, f"train.output_dir={tmp_path / 'run'}",
                     "data.tokenizer=/nonexistent/tokenizer"])
    assert proc.returncode != 0
    lines = [x for x in proc.stderr.splitlines()
             if "data.tokenizer=/nonexistent/tokenizer does not exist" in x]
    assert lines == ["error: data error: data.tokenizer=/nonexistent/tokenizer does not exist"]
    assert "megatron_vlm/" not in proc.stderr  # no traceback through our code (torchrun's own
    assert "=== tiny_vlm_cpu" not in proc.stdout  # summary remains); refused before the banner


def test_wandb_offline_mirrors_metrics_and_continues_the_run_on_resume(tmp_path):
    from megatron_vlm.config import apply_overrides
    from megatron_vlm.recipes import get_recipe
    from megatron_vlm.training.trainer import train

    run = tmp_path / "run"
    common = [f"train.output_dir={run}", "train.wandb=offline", "train.wandb_project=tests",
              "optim.warmup_steps=1", "train.eval_interval=0", "train.eval_batches=1",
              "train.tensorboard=false", "train.plot=false", "data.global_batch_size=2"]
    train(apply_overrides(get_recipe("tiny_text_cpu"), [*common, "train.steps=2"]))
    run_id = (run / "wandb_run_id").read_text().strip()
    (first,) = (run / "wandb").glob(f"offline-run-*-{run_id}")
    data = (first / f"run-{run_id}.wandb").read_bytes()
    assert b"train/loss" in data and b"valid/loss/text" in data
    train(apply_overrides(get_recipe("tiny_text_cpu"),
                          [*common, "train.steps=4", "checkpoint.resume=require"]))
    assert (run / "wandb_run_id").read_text().strip() == run_id  # the same W&B run continues
    assert len(list((run / "wandb").glob(f"offline-run-*-{run_id}"))) >= 1


def test_wandb_without_the_package_is_a_startup_error(tmp_path, monkeypatch):
    import importlib.util

    from megatron_vlm.config import apply_overrides
    from megatron_vlm.recipes import get_recipe
    from megatron_vlm.training.wandb_log import check_wandb

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "wandb" else real(name, *a))
    job = apply_overrides(get_recipe("tiny_text_cpu"), ["train.wandb=online"])
    try:
        check_wandb(job)
    except ValueError as e:
        assert "pip install '.[wandb]'" in str(e) and "train.wandb=off" in str(e)
    else:
        raise AssertionError("train.wandb=online without wandb must be refused")
    check_wandb(apply_overrides(get_recipe("tiny_text_cpu"), ["train.wandb=off"]))
    assert Path(REPO / "pyproject.toml").read_text().count('wandb = ["wandb"]') == 1
