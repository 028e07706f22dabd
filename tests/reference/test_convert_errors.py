"""Bad input to the converter: a clear ``ConversionError`` naming the key and the file, and no
output left behind (import and export write into a temporary directory renamed at the end).

The input is a tiny ``DeepseekV3ForCausalLM`` saved by transformers, then damaged one way per test.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from tiny_runs import load_tool

pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

from megatron_vlm.convert import ConversionError, export_hf, import_hf

CONFIG = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 48,
          "moe_intermediate_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
          "num_key_value_heads": 2, "q_lora_rank": 16, "kv_lora_rank": 16,
          "qk_nope_head_dim": 8, "qk_rope_head_dim": 8, "v_head_dim": 8, "n_routed_experts": 4,
          "num_experts_per_tok": 2, "n_group": 1, "topk_group": 1, "first_k_dense_replace": 1,
          "max_position_embeddings": 64, "tie_word_embeddings": False,
          "num_nextn_predict_layers": 0}


@pytest.fixture(scope="module")
def pristine(megatron_groups, tmp_path_factory):
    path = tmp_path_factory.mktemp("pristine")
    torch.manual_seed(0)
    DeepseekV3ForCausalLM(DeepseekV3Config(**CONFIG)).save_pretrained(path)
    return path


@pytest.fixture
def hf_dir(pristine, tmp_path):
    """A fresh copy to damage; returns (dir, its tensors)."""
    path = tmp_path / "hf"
    shutil.copytree(pristine, path)
    return path, load_file(str(path / "model.safetensors"))


def _rewrite(path, tensors):
    save_file(tensors, str(path / "model.safetensors"))


def _import_fails(src, out, match):
    with pytest.raises(ConversionError, match=match):
        import_hf(src, out, progress=False)
    assert not out.exists(), "partial output left behind"


def test_missing_key(hf_dir, tmp_path):
    path, tensors = hf_dir
    del tensors["model.layers.0.mlp.up_proj.weight"]
    _rewrite(path, tensors)
    _import_fails(path, tmp_path / "out", r"missing key 'model\.layers\.0\.mlp\.up_proj\.weight'"
                  r" in .*hf \(needed for our 'decoder\.layers\.0\.mlp\.linear_fc1\.weight'\)")


def test_unexpected_key(hf_dir, tmp_path):
    path, tensors = hf_dir
    tensors["model.layers.1.mlp.extra.weight"] = torch.zeros(2)
    _rewrite(path, tensors)
    _import_fails(path, tmp_path / "out",
                  r"unexpected key\(s\).*'model\.layers\.1\.mlp\.extra\.weight' in "
                  r"model\.safetensors")


def test_shape_mismatch(hf_dir, tmp_path):
    path, tensors = hf_dir
    key = "model.layers.1.self_attn.o_proj.weight"
    tensors[key] = tensors[key].t().contiguous()
    _rewrite(path, tensors)
    _import_fails(path, tmp_path / "out", r"shape mismatch: model\.layers\.1\.self_attn\.o_proj"
                  r"\.weight \[16, 32\] in model\.safetensors")


@pytest.mark.parametrize("how", ["integer", "mixed"])
def test_dtype_mismatch(hf_dir, tmp_path, how):
    path, tensors = hf_dir
    key = "model.layers.0.mlp.gate_proj.weight"
    if how == "integer":
        tensors[key] = tensors[key].to(torch.int32)
        match = rf"dtype mismatch: '{key}' in model\.safetensors is torch\.int32"
    else:
        tensors[key] = tensors[key].to(torch.bfloat16)
        match = rf"dtype mismatch: {key} \(torch\.bfloat16, model\.safetensors\)"
    _rewrite(path, tensors)
    _import_fails(path, tmp_path / "out", match)


def test_unknown_architecture(hf_dir, tmp_path):
    path, _ = hf_dir
    cfg = json.loads((path / "config.json").read_text())
    cfg["architectures"] = ["LlamaForCausalLM"]
    (path / "config.json").write_text(json.dumps(cfg))
    _import_fails(path, tmp_path / "out", r"unknown architecture 'LlamaForCausalLM'; supported:")


def test_truncated_shard(hf_dir, tmp_path):
    path, _ = hf_dir
    data = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(data[: len(data) - 100])
    _import_fails(path, tmp_path / "out", r"truncated shard .*model\.safetensors")


def test_index_naming_a_missing_shard(hf_dir, tmp_path):
    path, tensors = hf_dir
    (path / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {k: "model-00001-of-00002.safetensors" for k in tensors}}))
    _import_fails(path, tmp_path / "out", r"lists model-00001-of-00002\.safetensors, which does "
                  "not exist")


def test_failure_while_writing_leaves_nothing(hf_dir, tmp_path, monkeypatch):
    """A read error in the middle of writing (after the plan passed) removes the output."""
    from megatron_vlm.convert.hf_io import SafetensorsDir

    path, _ = hf_dir
    real, calls = SafetensorsDir.read, []

    def flaky(self, key):
        calls.append(key)
        if len(calls) == 7:
            raise ConversionError(f"short read of {key!r}")
        return real(self, key)

    monkeypatch.setattr(SafetensorsDir, "read", flaky)
    _import_fails(path, tmp_path / "out", "short read")
    # The writer stops at the failure (its other thread and the read-ahead finish at most the
    # tensors they had started): far fewer reads than the checkpoint's tensors.
    assert 7 <= len(calls) < len(SafetensorsDir(path).keys()) // 2


def test_mtp_layers_are_skipped_and_counted(hf_dir, tmp_path):
    path, tensors = hf_dir
    tensors["model.layers.2.eh_proj.weight"] = torch.zeros(32, 64)
    tensors["model.layers.2.enorm.weight"] = torch.zeros(32)
    _rewrite(path, tensors)
    result = import_hf(path, tmp_path / "out", progress=False)
    assert result.skipped == {"multi-token-prediction layers (not part of the model)": 2}


def test_export_refuses_damaged_checkpoint_and_existing_output(hf_dir, tmp_path):
    from megatron_vlm.checkpoint import CheckpointError

    path, _ = hf_dir
    step = import_hf(path, tmp_path / "ours", progress=False).checkpoint
    existing = tmp_path / "exists"
    existing.mkdir()
    with pytest.raises(ConversionError, match="exists; choose a new directory"):
        export_hf(step, existing, progress=False)
    (step / "rank_00000.pt").unlink()
    out = tmp_path / "exported"
    with pytest.raises(CheckpointError, match=r"missing file .*rank_00000\.pt"):
        export_hf(step, out, progress=False)
    assert not out.exists() and not list(tmp_path.glob(".tmp-*"))


def test_export_failure_while_writing_leaves_nothing(hf_dir, tmp_path, monkeypatch):
    from megatron_vlm.convert import hf_io

    path, _ = hf_dir
    step = import_hf(path, tmp_path / "ours", progress=False).checkpoint

    def boom(self):
        raise OSError("disk full")

    monkeypatch.setattr(hf_io.PlannedShardWriter, "close", boom)
    out = tmp_path / "exported"
    with pytest.raises(OSError, match="disk full"):
        export_hf(step, out, progress=False)
    assert not out.exists() and not list(tmp_path.glob(".tmp-*"))


def test_cli_reports_errors_with_exit_code(hf_dir, tmp_path, capsys):
    cli = load_tool("convert_hf")
    path, tensors = hf_dir
    del tensors["model.norm.weight"]
    _rewrite(path, tensors)
    assert cli.main(["import", str(path), str(tmp_path / "out"), "--quiet"]) == 1
    assert "error: missing key 'model.norm.weight'" in capsys.readouterr().err
