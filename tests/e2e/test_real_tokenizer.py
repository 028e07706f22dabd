"""The tiny VLM trained with a tokenizer in Kimi's released format (tiktoken BPE +
``tokenizer_config.json``, written by the test) instead of the SentencePiece model trained on the
corpus: its media ids (not Kimi's defaults, not the SentencePiece layout) reach the packed batch,
training runs, and the checkpoint records the ids the model was trained with."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import yaml
from kimi_tokenizer_files import write_kimi_tokenizer

from megatron_vlm.config import apply_overrides
from megatron_vlm.data.corpus import bundled_corpus_dir
from megatron_vlm.data.tokenizer_loader import load_tokenizer
from megatron_vlm.recipes import get_recipe


@pytest.fixture(scope="module")
def kimi_dir(tmp_path_factory):
    text = (bundled_corpus_dir() / "train.txt").read_text()[:200_000]
    return write_kimi_tokenizer(tmp_path_factory.mktemp("kimi_tok"), text, 600)


def _job(kimi_dir, run_dir, *extra):
    return apply_overrides(get_recipe("tiny_vlm_cpu"), [
        f"train.output_dir={run_dir}", f"data.tokenizer={kimi_dir}", "train.steps=3",
        "optim.warmup_steps=1", "train.eval_interval=0", "train.eval_batches=1",
        "train.tensorboard=false", "train.plot=false", "data.global_batch_size=2",
        "data.multimodal.num_workers=0", *extra])


def test_media_ids_of_the_tokenizer_reach_the_batch(kimi_dir, tmp_path):
    from megatron_vlm.training.data_setup import build_data

    tok = load_tokenizer(kimi_dir)
    media = tok.media_token_ids()
    assert media.image_placeholder < 1152 and media.image_placeholder != 163605
    data = build_data(_job(kimi_dir, tmp_path / "run"), dp_rank=0, dp_size=1,
                      run_dir=tmp_path / "run")
    try:
        assert data.tokenizer.describe().startswith("Kimi tiktoken")
        assert data.token_ids.image == media.image_placeholder
        assert data.token_ids.eos == tok.eos_id
        seen = {"image": 0, "video": 0, "eos": 0}
        for _ in range(3):
            for batch in data.loader.next_global_batch():
                tokens = batch.tokens[0].numpy()
                seen["image"] += int((tokens == media.image_placeholder).sum())
                seen["video"] += int((tokens == media.video_placeholder).sum())
                seen["eos"] += int((tokens == tok.eos_id).sum())
                if batch.vision is not None:  # every placeholder is one of the tokenizer's
                    placeholders = np.isin(tokens, list(media.placeholder_ids)).sum()
                    assert placeholders == int(batch.vision.num_llm_tokens.sum())
                    assert (tokens[tokens == media.media_begin].size
                            == batch.vision.num_llm_tokens.numel())
        assert seen["image"] > 0 and seen["video"] > 0 and seen["eos"] > 0
    finally:
        data.close()


def test_tiny_vlm_trains_with_the_kimi_format_tokenizer(kimi_dir, tmp_path):
    from megatron_vlm.training.trainer import train

    run = tmp_path / "run"
    result = train(_job(kimi_dir, run))
    assert result.state.step == 3 and result.state.skipped_steps == 0
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in rows if r["split"] == "train"]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
    assert losses[0] > 5.0  # ~ln(1112): a fresh model over the tiktoken vocabulary
    # The checkpoint's config records the ids the model was trained with (what the export uses).
    manifest = json.loads((result.checkpoint / "manifest.json").read_text())
    saved = yaml.safe_load(manifest["config_yaml"])["model"]["token_ids"]
    tok = load_tokenizer(kimi_dir)
    assert saved["image"] == tok.media_token_ids().image_placeholder
    assert saved["video"] == tok.media_token_ids().video_placeholder
    assert saved["eos"] == tok.eos_id
    assert yaml.safe_load((run / "job.yaml").read_text())["model"]["token_ids"] == saved
    assert not list(run.glob("spm_*.model"))  # no SentencePiece trained on the corpus
