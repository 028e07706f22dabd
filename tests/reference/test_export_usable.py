"""An HF export a user can load and use (``convert_hf.py export``), against transformers 5.25.

The run: a tiny fp32 K2.5 whose tokenizer is a tiny one in Kimi's released format
(``tests/kimi_tokenizer_files.py``: ~600 merges, so ``<|media_pad|>`` is ~877, not Kimi's 163605).
It is made as a user would get it: an HF directory (tiny ``Kimi_K25ForConditionalGeneration``
whose config carries the tokenizer's ids, the tokenizer files beside it) imported with
``import_hf`` -- whose job config then records ``model.token_ids`` and ``data.tokenizer`` -- and
exported. Checked on the export: transformers loads the model and ``AutoTokenizer`` loads the
tokenizer offline without remote code; the media ids are the tokenizer's; a chat prompt with an
image encodes to our ids and gives our logits (fp32, 1e-5); processor configs use the keys
transformers' Kimi K2.5 processors read, with the run's values; files are 0644. Older checkpoints
(no ``model.token_ids``) take the tokenizer's ids, or Kimi's defaults with a note.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import logging
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from tiny_runs import load_tool

pytest.importorskip("transformers")
from hf_fixtures import VISION, load_converted, perturb_all, random_media
from kimi_tokenizer_files import write_kimi_tokenizer
from transformers import AutoTokenizer
from transformers.models.kimi_k25 import Kimi_K25Config, Kimi_K25ForConditionalGeneration

from megatron_vlm.config.model import TOKEN_ID_NAMES
from megatron_vlm.data.corpus import bundled_corpus_dir
from megatron_vlm.data.kimi_tokenizer import KimiTokenizer
from megatron_vlm.data.templates import IMAGE_PLACEHOLDER, MEDIA_BEGIN, MEDIA_CONTENT, MEDIA_END

ATOL = 1e-5
KIMI_IMAGE_TOKEN_ID = 163605  # Kimi_K25Config's default, what the export used to write
TEXT = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 4, "intermediate_size": 96, "moe_intermediate_size": 32,
        "n_routed_experts": 4, "num_experts_per_tok": 2, "n_group": 1, "topk_group": 1,
        "n_shared_experts": 1, "q_lora_rank": 16, "kv_lora_rank": 16, "qk_nope_head_dim": 8,
        "qk_rope_head_dim": 8, "v_head_dim": 8, "first_k_dense_replace": 1,
        "num_nextn_predict_layers": 0, "max_position_embeddings": 256}
EXPORT_UMASK = 0o022  # the umask the export runs under in these tests


def _tokenizer_ids(tok: KimiTokenizer) -> dict[str, int]:
    media = tok.media_token_ids()
    return {"bos": tok.bos_id, "eos": tok.eos_id, "pad": tok.pad_id,
            "image": media.image_placeholder, "video": media.video_placeholder,
            "media_begin": media.media_begin, "media_content": media.media_content,
            "media_end": media.media_end}


@pytest.fixture(scope="module")
def run(megatron_groups, tmp_path_factory):
    """The HF source, its import (our checkpoint) and its export; ``tok`` is our tokenizer."""
    from megatron_vlm.convert import export_hf, import_hf

    tmp = tmp_path_factory.mktemp("usable")
    text = (bundled_corpus_dir() / "valid.txt").read_text()[:40000]
    tok_dir = write_kimi_tokenizer(tmp / "tokenizer", text, num_merges=600)
    tok = KimiTokenizer.from_dir(tok_dir)
    ids = _tokenizer_ids(tok)
    assert ids["image"] < 1000 and ids["image"] != KIMI_IMAGE_TOKEN_ID
    torch.manual_seed(0)
    config = Kimi_K25Config(
        vision_config=VISION, projection_hidden_size=VISION["hidden_size"],
        text_config=dict(TEXT, vocab_size=tok.vocab_size, bos_token_id=ids["bos"],
                         eos_token_id=ids["eos"], pad_token_id=ids["pad"]),
        image_token_id=ids["image"], video_token_id=ids["video"],
        vision_start_token_id=ids["media_begin"], vision_end_token_id=ids["media_end"],
        tie_word_embeddings=False)
    hf = Kimi_K25ForConditionalGeneration(config).eval()
    perturb_all(hf, seed=11)
    src = tmp / "hf_src"
    hf.save_pretrained(src)
    for f in tok_dir.iterdir():
        shutil.copy(f, src / f.name)
    imported = import_hf(src, tmp / "ours", progress=False)
    out = tmp / "exported"
    mask = os.umask(EXPORT_UMASK)
    try:
        result = export_hf(imported.checkpoint, out, dtype="fp32", progress=False)
    finally:
        os.umask(mask)
    return SimpleNamespace(tmp=tmp, tok=tok, ids=ids, src=src, imported=imported, out=out,
                           result=result, ours=load_converted(imported.checkpoint))


def test_import_records_the_token_ids_and_the_tokenizer(run):
    job = yaml.safe_load((run.imported.checkpoint.parent / "job.yaml").read_text())
    assert job["model"]["token_ids"] == run.ids
    assert job["data"]["tokenizer"] == str(run.src.resolve())


def test_export_loads_in_transformers_with_its_tokenizer_media_ids_and_our_image_logits(run):
    reloaded, info = Kimi_K25ForConditionalGeneration.from_pretrained(
        run.out, output_loading_info=True, attn_implementation="eager")
    assert all(not v for v in info.values()), info
    reloaded.eval()
    cfg = reloaded.config
    assert (cfg.image_token_id, cfg.video_token_id, cfg.vision_start_token_id,
            cfg.vision_end_token_id) == (run.ids["image"], run.ids["video"],
                                         run.ids["media_begin"], run.ids["media_end"])
    assert (cfg.text_config.bos_token_id, cfg.text_config.eos_token_id,
            cfg.text_config.pad_token_id) == (run.ids["bos"], run.ids["eos"], run.ids["pad"])

    hf_tok = AutoTokenizer.from_pretrained(run.out, local_files_only=True,
                                           trust_remote_code=False)
    assert hf_tok.convert_tokens_to_ids(IMAGE_PLACEHOLDER) == cfg.image_token_id
    pixels, grid = random_media([[1, 4, 6]], seed=7)  # 24 patches -> 6 LLM tokens
    image = MEDIA_BEGIN + "image" + MEDIA_CONTENT + IMAGE_PLACEHOLDER * 6 + MEDIA_END
    messages = [{"role": "user", "content": f"What is in {image} this picture? It's 1 cat."}]
    prompt = hf_tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert prompt == run.tok.apply_chat_template(messages, add_generation_prompt=True)
    ids = hf_tok.encode(prompt, add_special_tokens=False)
    assert ids == run.tok.encode_with_special(prompt)
    ids = torch.tensor([ids])
    positions = (ids[0] == cfg.image_token_id).nonzero()[:, 0]
    assert len(positions) == 6

    with torch.no_grad():
        theirs = reloaded(input_ids=ids, pixel_values=pixels, image_grid_thw=grid).logits
        ours = run.ours(ids, torch.arange(ids.shape[1])[None], None, pixel_values=pixels,
                        grid_thw=grid, media_positions=positions)[..., :run.tok.vocab_size]
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)
    assert theirs.abs().max() > 0.5  # the tolerance is small against the output


def test_exported_tokenizer_reloads_as_ours(run):
    from megatron_vlm.data.tokenizer_loader import load_tokenizer

    again = load_tokenizer(run.out)
    assert isinstance(again, KimiTokenizer)
    assert again.special_tokens == run.tok.special_tokens
    assert again.chat_template == run.tok.chat_template
    assert (run.out / "chat_template.jinja").read_text() == run.tok.chat_template
    config = json.loads((run.out / "tokenizer_config.json").read_text())
    assert "auto_map" not in config and config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert run.result.notes == []
    assert json.loads((run.out / "generation_config.json").read_text()) == {
        "bos_token_id": run.ids["bos"], "eos_token_id": run.ids["eos"],
        "pad_token_id": run.ids["pad"]}


def test_exported_tokenizer_json_splits_text_like_kimi(run):
    """transformers 5.25 would also convert ``tiktoken.model`` by itself for a ``kimi_k25``
    config.json, but with GPT-4's split pattern (other words for camel case, Han next to Latin,
    contractions); the exported ``tokenizer.json`` carries Kimi's."""
    import regex
    from tokenizers import Tokenizer

    from megatron_vlm.data.kimi_tokenizer import KIMI_PAT_STR

    text = "HelloWorld 你好abc it's DON'T x2024y\n\n  end"
    fast = Tokenizer.from_file(str(run.out / "tokenizer.json"))
    pieces = [text[a:b] for _, (a, b) in fast.pre_tokenizer.pre_tokenize_str(text)]
    assert pieces == regex.findall(KIMI_PAT_STR, text, flags=regex.V1)
    assert "HelloWorld" not in pieces and "Hello" in pieces  # not GPT-4's \p{L}+


def _source_names(module: str, classes: tuple[str, ...]) -> set[str]:
    """Attribute and TypedDict key names of ``classes`` in an installed transformers module,
    read from its source (the module imports torchvision, which is not installed here)."""
    tree = ast.parse(Path(importlib.util.find_spec(module).origin).read_text())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ClassDef) and node.name in classes:
            for stmt in node.body:
                if isinstance(stmt, ast.Assign):
                    names.update(t.id for t in stmt.targets if isinstance(t, ast.Name))
                elif isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name):
                    names.add(stmt.target.id)
    assert names, (module, classes)
    return names


def test_processor_configs_use_transformers_keys_and_the_run_values(run):
    from transformers.image_processing_base import ImageProcessingMixin
    from transformers.processing_utils import ImagesKwargs, VideosKwargs
    from transformers.video_processing_utils import BaseVideoProcessor

    pkg = "transformers.models.kimi_k25."
    image_keys = _source_names(pkg + "image_processing_kimi_k25", (
        "Kimi_K25ImageProcessor", "Kimi_K25ImageProcessorKwargs")) | set(
        ImagesKwargs.__annotations__)
    video_keys = _source_names(pkg + "video_processing_kimi_k25", (
        "Kimi_K25VideoProcessor", "Kimi_K25VideoProcessorInitKwargs")) | set(
        VideosKwargs.__annotations__)
    image, _ = ImageProcessingMixin.get_image_processor_dict(str(run.out))
    video, _ = BaseVideoProcessor.get_video_processor_dict(str(run.out))
    assert image["image_processor_type"] == "Kimi_K25ImageProcessor"
    assert video["video_processor_type"] == "Kimi_K25VideoProcessor"
    meta = {"image_processor_type", "video_processor_type", "processor_class"}
    assert set(image) - meta <= image_keys and set(video) - meta <= video_keys
    # The data pipeline's defaults (the run had no data.multimodal): HF Kimi K2.5's sizing.
    assert {k: image[k] for k in ("patch_size", "merge_size", "max_patches", "image_mean",
                                  "image_std", "size")} == {
        "patch_size": 14, "merge_size": 2, "max_patches": 16384, "image_mean": [0.5] * 3,
        "image_std": [0.5] * 3, "size": {"max_height": 512, "max_width": 512}}
    assert (video["max_patches"], video["temporal_patch_size"], video["fps"]) == (4096, 4, 2.0)
    flat = json.loads((run.out / "video_preprocessor_config.json").read_text())
    assert flat == video
    assert json.loads((run.out / "processor_config.json").read_text())[
        "processor_class"] == "Kimi_K25Processor"


def test_exported_files_are_group_readable(run):
    assert (run.out.stat().st_mode & 0o777) == 0o755
    files = sorted(p for p in run.out.rglob("*") if p.is_file())
    assert {"tokenizer.json", "tiktoken.model", "config.json",
            "model.safetensors.index.json"} <= {p.name for p in files}
    assert any(p.suffix == ".safetensors" for p in files)
    assert {p.name: oct(p.stat().st_mode & 0o777) for p in files} == {
        p.name: oct(0o644) for p in files}


# --- checkpoints without model.token_ids (older runs) -------------------------------------------


def _older_run(run, root: Path, data: dict, output_dir: Path | None = None) -> Path:
    """A copy of the imported checkpoint whose job config records no token ids and ``data``."""
    from megatron_vlm.checkpoint.manifest import model_section, structural_hash

    step = root / "checkpoints" / run.imported.checkpoint.name
    shutil.copytree(run.imported.checkpoint, step)
    manifest = json.loads((step / "manifest.json").read_text())
    job = yaml.safe_load(manifest["config_yaml"])
    del job["model"]["token_ids"]
    job["data"].update(data)
    job.setdefault("train", {})["output_dir"] = str(output_dir or root / "elsewhere")
    manifest["config_yaml"] = yaml.safe_dump(job, sort_keys=False)
    manifest["model_config_sha256"] = structural_hash(model_section(manifest["config_yaml"]))
    (step / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return step


def test_older_checkpoint_takes_the_tokenizer_ids(run, tmp_path):
    from megatron_vlm.convert import export_hf

    step = _older_run(run, tmp_path, {"tokenizer": str(run.src)})
    result = export_hf(step, tmp_path / "hf", dtype="fp32", progress=False)
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert cfg["image_token_id"] == run.ids["image"]
    assert result.token_ids == run.ids
    assert "records no model.token_ids" in result.notes[0]


def test_older_checkpoint_without_a_tokenizer_gets_kimi_defaults(run, tmp_path, caplog):
    from megatron_vlm.convert import export_hf

    step = _older_run(run, tmp_path, {"tokenizer": None})
    with caplog.at_level(logging.WARNING, logger="megatron_vlm.convert.exporter"):
        result = export_hf(step, tmp_path / "hf", dtype="fp32", progress=False)
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (cfg["image_token_id"], cfg["video_token_id"]) == (KIMI_IMAGE_TOKEN_ID, 163840)
    assert not (tmp_path / "hf" / "tokenizer_config.json").exists()
    assert "Kimi K2.5's defaults" in caplog.text and "no tokenizer exported" in caplog.text
    assert set(result.token_ids) == set(TOKEN_ID_NAMES)


def test_tiny_run_sentencepiece_tokenizer_is_found_in_the_run_dir(run, tmp_path):
    """The tiny runs' trained SentencePiece model + media tokens: exported (tokenizer.model),
    ids from it; transformers' Llama conversion encodes it differently, which is reported."""
    from megatron_vlm.convert import export_hf
    from megatron_vlm.data.tokenizer import get_or_train_tokenizer

    run_dir = tmp_path / "run"
    get_or_train_tokenizer(bundled_corpus_dir(), run_dir, vocab_size=512, seed=0)
    step = _older_run(run, run_dir, {"tokenizer": None, "tokenizer_vocab_size": 512},
                      output_dir=run_dir)
    result = export_hf(step, tmp_path / "hf", dtype="fp32", progress=False)
    cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert (cfg["image_token_id"], cfg["vision_start_token_id"]) == (512 + 3, 512)
    assert (tmp_path / "hf" / "tokenizer.model").is_file()
    assert any("encodes differently" in n for n in result.notes), result.notes


def _cli():
    return load_tool("convert_hf")


def test_cli_tokenizer_option_and_refusal_of_a_tokenizer_that_disagrees(run, tmp_path, capsys):
    cli = _cli()
    ckpt = str(run.imported.checkpoint)
    other = write_kimi_tokenizer(tmp_path / "other", "a b c ab bc abc " * 50, num_merges=20)
    assert cli.main(["export", ckpt, str(tmp_path / "bad"), "--quiet",
                     "--tokenizer", str(other)]) == 1
    err = capsys.readouterr().err
    assert f"model.token_ids.bos={run.ids['bos']} but the tokenizer has" in err
    assert "--tokenizer" in err and not (tmp_path / "bad").exists()
    assert cli.main(["export", ckpt, str(tmp_path / "good"), "--quiet",
                     "--tokenizer", str(run.src)]) == 0
    assert f"'image': {run.ids['image']}" in capsys.readouterr().out
    assert (tmp_path / "good" / "tokenizer.json").is_file()
