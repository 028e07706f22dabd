"""InternVL3.5 HF conversion (issue 21 item 4): a tiny ``InternVLForConditionalGeneration``
checkpoint (``internvl_reference.hf_internvl``) in the release layout (the ``-HF`` checkpoints'
and ``save_pretrained``'s names: ``language_model.model.*``, ``vision_tower.*``, ...), bf16, goes
through ``tools/convert_hf.py import`` and ``export --dtype bf16`` (streaming, two shards and an
index):

* Qwen3 dense with tied embeddings (``InternVLConfig``'s default: no head tensor) and
  Qwen3-MoE with an untied head and per-expert release names: every tensor comes back byte for
  byte under exactly the names written, the exported ``config.json`` carries transformers' values,
  and transformers loads the export (nothing missing or unexpected) with logits equal to our
  imported model's on a text document;
* GPT-OSS as transformers writes it (``save_pretrained``: fused per-layer experts with biases)
  imports into a model whose logits equal transformers'. Its export writes per-expert slices
  (``experts.{E}.gate_up_proj``), which transformers does not load: not covered here.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
from hf_fixtures import read_safetensors_dir  # noqa: E402
from internvl_reference import VOCAB, hf_internvl, release_state  # noqa: E402

ATOL = 1e-5
CASES = {"qwen3_tied": ("qwen3", True), "qwen3_moe": ("qwen3_moe", False)}


def release_config(hf) -> dict:
    cfg = hf.config.to_dict()
    cfg["architectures"] = [type(hf).__name__]
    cfg["dtype"] = "bfloat16"
    return cfg


@pytest.fixture(scope="module", params=sorted(CASES))
def converted(request, megatron_groups, tmp_path_factory):
    """(case, HF tensors written, their config, the work dir) after import + export."""
    from safetensors.torch import save_file
    from tiny_runs import load_tool

    kind, tied = CASES[request.param]
    tmp = tmp_path_factory.mktemp(request.param)
    hf = hf_internvl(kind, tied=tied)
    tensors = {k: v.to(torch.bfloat16) for k, v in release_state(hf).items()}
    config = release_config(hf)
    src = tmp / "hf"
    src.mkdir()
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2],
              "model-00002-of-00002.safetensors": names[1::2]}
    for file, keys in shards.items():
        save_file({k: tensors[k].contiguous() for k in keys}, str(src / file))
    (src / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: f for f, ks in shards.items() for k in ks}}))
    (src / "config.json").write_text(json.dumps(config))
    cli = load_tool("convert_hf")
    assert cli.main(["import", str(src), str(tmp / "ours"), "--quiet"]) == 0
    assert cli.main(["export", str(tmp / "ours"), str(tmp / "exported"), "--dtype", "bf16",
                     "--max-shard-gb", "0.0002", "--quiet"]) == 0
    return request.param, tensors, config, tmp


def test_import_export_is_bit_identical(converted):
    case, tensors, _, tmp = converted
    exported = read_safetensors_dir(tmp / "exported")
    assert sorted(exported) == sorted(tensors)
    index = json.loads((tmp / "exported" / "model.safetensors.index.json").read_text())
    assert sorted(index["weight_map"]) == sorted(tensors)
    assert len(set(index["weight_map"].values())) > 1  # streamed into several shards
    for key, original in tensors.items():
        got = exported[key]
        assert got.dtype == original.dtype and got.shape == original.shape, key
        assert torch.equal(got.view(torch.uint8), original.contiguous().view(torch.uint8)), key
    assert ("language_model.lm_head.weight" in tensors) == (case != "qwen3_tied")
    experts = [k for k in tensors if ".mlp.experts.7.down_proj.weight" in k]
    assert len(experts) == (2 if case == "qwen3_moe" else 0)  # layers 0 and 2; 1 is dense


def test_exported_config_is_transformers(converted):
    """Every key the export writes has transformers' value (Qwen3-MoE's ``num_experts`` read as
    transformers' config object reads it)."""
    from transformers import InternVLConfig

    _, _, config, tmp = converted
    exported = json.loads((tmp / "exported" / "config.json").read_text())
    assert exported["architectures"] == config["architectures"]
    text = InternVLConfig(**{k: v for k, v in config.items() if k != "architectures"}).text_config
    for key, value in exported["text_config"].items():
        assert getattr(text, key) == value, ("text_config", key)
    for key, value in exported["vision_config"].items():
        assert config["vision_config"][key] == value, ("vision_config", key)
    top = {k: v for k, v in exported.items() if k not in ("text_config", "vision_config")}
    assert top == {k: config[k] for k in top}


def _load_imported(step_dir: Path):
    from megatron_vlm.checkpoint import load_checkpoint, read_manifest
    from megatron_vlm.config import ParallelConfig
    from megatron_vlm.convert.importer import load_job_model
    from megatron_vlm.families import get_family
    from megatron_vlm.parallel.init import ensure_single_process_groups

    model_cfg = load_job_model(read_manifest(step_dir)["config_yaml"])
    groups = ensure_single_process_groups().pg_collection
    model = get_family("internvl").build_vlm(model_cfg, ParallelConfig(), pg_collection=groups)
    load_checkpoint(step_dir, [model], None, None, load_optimizer=False)
    return model.eval(), model_cfg


def _text_logits_equal(hf, ours, seed: int) -> None:
    ids = torch.randint(0, 120, (1, 20), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        got = ours(ids, torch.arange(20)[None], None)
    assert expected.abs().max() > 1.0
    torch.testing.assert_close(got[..., :VOCAB], expected, atol=ATOL, rtol=0)


def test_transformers_loads_the_export_and_equals_ours(converted):
    """``from_pretrained`` on the exported directory (fp32) misses nothing and finds nothing
    unexpected; its text logits equal our imported model's."""
    from transformers import InternVLForConditionalGeneration

    case, _, _, tmp = converted
    hf, info = InternVLForConditionalGeneration.from_pretrained(
        tmp / "exported", dtype=torch.float32, output_loading_info=True)
    hf.eval()
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    ours, model_cfg = _load_imported(tmp / "ours" / "step_0000000")
    assert model_cfg.llm.untie_embeddings == (case != "qwen3_tied")
    _text_logits_equal(hf, ours, seed=3)


def test_gpt_oss_save_pretrained_layout_imports(megatron_groups, tmp_path):
    """What transformers 5.25 writes for the GPT-OSS variant (fused experts with biases, fp32)
    imports (the family's GPT-OSS alias pass) into a model whose text logits equal
    transformers'."""
    from tiny_runs import load_tool

    hf = hf_internvl("gpt_oss")
    hf.save_pretrained(tmp_path / "hf")
    saved = read_safetensors_dir(tmp_path / "hf")
    assert any(k.endswith("mlp.experts.gate_up_proj_bias") for k in saved)  # the fused layout
    cli = load_tool("convert_hf")
    assert cli.main(["import", str(tmp_path / "hf"), str(tmp_path / "ours"), "--quiet"]) == 0
    ours, model_cfg = _load_imported(tmp_path / "ours" / "step_0000000")
    assert model_cfg.llm.attention_sinks and model_cfg.llm.num_experts == 8
    _text_logits_equal(hf, ours, seed=4)
