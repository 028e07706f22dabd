"""Keye-VL 1.5 HF conversion (issue 19 item 6): a tiny checkpoint in the released layout, built
here from transformers' own modules (``Qwen3ForCausalLM`` for ``model.``/``lm_head``,
``SiglipVisionModel`` under ``visual.vision_model.``) plus the ``mlp_AR`` merger and the unused
``packing_position_embedding``, goes through ``tools/convert_hf.py import`` and ``export``:

* its keys are the committed list ``tests/fixtures/keye_vl_1_5_keys.txt`` (transcribed from
  vLLM's Keye modules, not from our table), and so are the exported keys;
* import -> export gives every tensor back byte for byte (the carried
  ``packing_position_embedding`` included) and the same ``config.json``;
* the imported LLM computes ``Qwen3ForCausalLM``'s logits (text-only M-RoPE ids t = h = w) and
  holds the tensors of ``qwen3_reference.megatron_state_from_hf`` (a mapping written apart from
  the table); the imported tower equals the SigLIP init path (``siglip_init``), the merger the
  ``mlp_AR`` tensors.

Sizes: the Qwen3 of ``qwen3_reference`` (hidden 48, 2 layers, 4/2 heads of dim 16, vocab 128);
SigLIP hidden 32, 2 layers, 4 heads, 4x4 table; a 2 x 2 merge into 128 -> 48. fp32.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
from hf_fixtures import read_safetensors_dir
from qwen3_reference import (
    EPS,
    FFN,
    HEAD_DIM,
    HEADS,
    HIDDEN,
    KV_HEADS,
    LAYERS,
    VOCAB,
    hf_qwen3,
    megatron_state_from_hf,
)

ATOL = 1e-5
THETA = 1e6
SECTION = [2, 3, 3]  # sums to HEAD_DIM / 2
KEYS = Path(__file__).resolve().parents[1] / "fixtures" / "keye_vl_1_5_keys.txt"
VISION = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
          "num_attention_heads": 4, "num_channels": 3, "image_size": 56, "patch_size": 14,
          "hidden_act": "gelu_pytorch_tanh", "layer_norm_eps": 1e-6, "attention_dropout": 0.0}
MERGED = 4 * VISION["hidden_size"]
PACKING = "visual.vision_model.embeddings.packing_position_embedding.weight"


def release_config() -> dict:
    """A flat Keye-VL 1.5 ``config.json`` (Qwen3 fields on top, as the HF port reads it)."""
    return {
        "architectures": ["KeyeVL1_5ForConditionalGeneration"], "model_type": "KeyeVL1_5",
        "vocab_size": VOCAB, "hidden_size": HIDDEN, "intermediate_size": FFN,
        "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS, "head_dim": HEAD_DIM, "hidden_act": "silu",
        "max_position_embeddings": 256, "rms_norm_eps": EPS, "rope_theta": THETA,
        "rope_scaling": {"type": "mrope", "mrope_section": SECTION}, "attention_bias": False,
        "attention_dropout": 0.0, "use_sliding_window": False, "tie_word_embeddings": False,
        "bos_token_id": 1, "eos_token_id": 2, "image_token_id": 120, "video_token_id": 121,
        "vision_start_token_id": 122, "vision_end_token_id": 123,
        "vision_config": {**VISION, "spatial_merge_size": 2}, "torch_dtype": "float32",
    }


def committed_keys() -> list[str]:
    return [line for line in KEYS.read_text().splitlines() if line and not line.startswith("#")]


def _siglip_state() -> dict[str, torch.Tensor]:
    """A perturbed tiny ``SiglipVisionModel``'s tower tensors, without any key prefix."""
    from transformers import SiglipVisionConfig, SiglipVisionModel

    from megatron_vlm.families.keye.siglip_init import siglip_prefix

    torch.manual_seed(1)
    model = SiglipVisionModel(SiglipVisionConfig(**VISION, vision_use_head=False))
    gen = torch.Generator().manual_seed(2)
    state = {k: v + 0.1 * torch.randn(v.shape, generator=gen)
             for k, v in model.state_dict().items()}
    prefix = siglip_prefix(state)
    return {k[len(prefix):]: v for k, v in state.items()}


@pytest.fixture(scope="module")
def keye(megatron_groups, tmp_path_factory):
    """(HF Qwen3, SigLIP state, HF tensors, dirs) after ``convert_hf.py import`` + ``export``."""
    from safetensors.torch import save_file
    from tiny_runs import load_tool

    tmp = tmp_path_factory.mktemp("keye")
    qwen3 = hf_qwen3(THETA, seed=7)
    siglip = _siglip_state()
    gen = torch.Generator().manual_seed(3)
    tensors = {k: v.clone() for k, v in qwen3.state_dict().items()}
    tensors.update({"visual.vision_model." + k: v for k, v in siglip.items()})
    tensors[PACKING] = torch.randn(32768, VISION["hidden_size"], generator=gen)
    for name, shape in (("pre_norm", (MERGED,)), ("linear_1", (MERGED, MERGED)),
                        ("linear_2", (HIDDEN, MERGED))):
        tensors[f"mlp_AR.{name}.weight"] = torch.randn(shape, generator=gen)
        tensors[f"mlp_AR.{name}.bias"] = torch.randn(shape[:1], generator=gen)
    hf = tmp / "hf"
    hf.mkdir()
    # Two shards and an index, as the release has them.
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2],
              "model-00002-of-00002.safetensors": names[1::2]}
    for file, keys in shards.items():
        save_file({k: tensors[k].contiguous() for k in keys}, str(hf / file))
    (hf / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {k: f for f, ks in shards.items() for k in ks}}))
    (hf / "config.json").write_text(json.dumps(release_config()))
    cli = load_tool("convert_hf")
    assert cli.main(["import", str(hf), str(tmp / "ours"), "--quiet"]) == 0
    assert cli.main(["export", str(tmp / "ours"), str(tmp / "exported"), "--dtype", "fp32",
                     "--quiet"]) == 0
    return qwen3, siglip, tensors, tmp


def test_release_layout_is_the_committed_list(keye):
    """The checkpoint built from transformers' Qwen3/SigLIP modules has the committed names
    (so the list and the module names agree), and the export writes exactly those."""
    _, _, tensors, tmp = keye
    expected = committed_keys()
    assert len(expected) == len(set(expected)) == 69
    assert sorted(tensors) == expected
    index = json.loads((tmp / "exported" / "model.safetensors.index.json").read_text())
    assert sorted(index["weight_map"]) == expected
    assert sorted(read_safetensors_dir(tmp / "exported")) == expected


def test_import_export_is_bit_identical(keye):
    _, _, tensors, tmp = keye
    exported = read_safetensors_dir(tmp / "exported")
    for key, original in tensors.items():
        got = exported[key]
        assert got.dtype == original.dtype and got.shape == original.shape, key
        assert torch.equal(got.view(torch.uint8), original.contiguous().view(torch.uint8)), key
    assert json.loads((tmp / "exported" / "config.json").read_text()) == release_config()
    # The unused table was carried, not recomputed: it is not in our model.
    from megatron_vlm.checkpoint import read_manifest

    manifest = read_manifest(tmp / "ours" / "step_0000000")
    assert manifest["extra_rank0"]["hf_import"]["carried"] == "hf_carry.safetensors"
    assert "packing" not in manifest["config_yaml"]


def _load_imported(step_dir: Path):
    from megatron_vlm.checkpoint import load_checkpoint, read_manifest
    from megatron_vlm.config import ParallelConfig
    from megatron_vlm.convert.importer import load_job_model
    from megatron_vlm.families import get_family
    from megatron_vlm.parallel.init import ensure_single_process_groups

    model_cfg = load_job_model(read_manifest(step_dir)["config_yaml"])
    assert model_cfg.family == "keye" and model_cfg.llm.mrope_section == SECTION
    groups = ensure_single_process_groups().pg_collection
    model = get_family("keye").build_vlm(model_cfg, ParallelConfig(), pg_collection=groups)
    load_checkpoint(step_dir, [model], None, None, load_optimizer=False)
    return model.eval(), model_cfg


def test_imported_llm_equals_qwen3(keye):
    qwen3, _, _, tmp = keye
    model, _ = _load_imported(tmp / "ours" / "step_0000000")
    llm = model.language_model
    reference = megatron_state_from_hf(qwen3.state_dict())
    ours = llm.state_dict()
    for name, tensor in reference.items():
        assert torch.equal(ours[name][: tensor.shape[0]], tensor), name
    ids = torch.randint(0, VOCAB, (1, 24), generator=torch.Generator().manual_seed(5))
    positions = torch.arange(24).expand(3, -1)  # text only: t = h = w
    with torch.no_grad():
        expected = qwen3(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        got = llm(ids, positions, None)[..., :VOCAB]
    assert expected.abs().max() > 1.0
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)


def test_imported_tower_equals_siglip_init_and_merger_equals_mlp_ar(keye):
    from megatron_vlm.families.keye.siglip_init import keye_vision_state_from_siglip

    _, siglip, tensors, tmp = keye
    model, model_cfg = _load_imported(tmp / "ours" / "step_0000000")
    expected, skipped = keye_vision_state_from_siglip(siglip, model_cfg.vision)
    assert skipped == []
    tower = {k: v for k, v in model.vision_tower.state_dict().items()
             if not k.endswith("_extra_state")}
    assert sorted(tower) == sorted(expected)
    for name, tensor in expected.items():
        assert torch.equal(tower[name], tensor), name
    merger = model.projector.state_dict()
    for ours, hf in (("pre_norm", "pre_norm"), ("mlp.linear_fc1", "linear_1"),
                     ("mlp.linear_fc2", "linear_2")):
        for p in ("weight", "bias"):
            assert torch.equal(merger[f"{ours}.{p}"], tensors[f"mlp_AR.{hf}.{p}"]), (ours, p)


def test_export_without_the_carried_copy_writes_zeros(keye, tmp_path):
    """A Keye checkpoint with no ``hf_carry.safetensors`` beside it (a model trained here) still
    exports the whole layout (vLLM's loader needs every key): the unused table as zeros, noted."""
    import shutil

    from megatron_vlm.convert import export_hf

    _, _, tensors, tmp = keye
    step = tmp_path / "run" / "checkpoints" / "step_0000000"
    shutil.copytree(tmp / "ours" / "step_0000000", step)
    result = export_hf(step, tmp_path / "out", dtype="fp32", progress=False)
    exported = read_safetensors_dir(tmp_path / "out")
    assert sorted(exported) == committed_keys()
    assert torch.equal(exported[PACKING], torch.zeros(32768, VISION["hidden_size"]))
    assert any(PACKING in note and "zeros" in note for note in result.notes), result.notes
    assert all(torch.equal(exported[k], v) for k, v in tensors.items() if k != PACKING)


def _layer_pattern(keys) -> set[str]:
    import re

    return {re.sub(r"\.\d+\.", ".N.", k) for k in keys}


def test_real_sizes_plan_both_ways(megatron_groups):
    """Keye-VL-1.5-8B's sizes (the ``keye_vl_1_5_8b`` recipe's model) on meta tensors:
    ``config.json`` written and read back gives the same config; transformers' Qwen3-8B and
    SigLIP-so400m modules (built on ``meta``) with the merger and packing table have the
    committed names (layer-for-layer) and every shape our table maps them to, both ways."""
    from transformers import Qwen3Config, Qwen3ForCausalLM, SiglipVisionConfig, SiglipVisionModel

    from megatron_vlm.convert.export_plan import plan_shards
    from megatron_vlm.convert.hf_config import model_from_hf, model_to_hf
    from megatron_vlm.convert.hf_io import DictSource
    from megatron_vlm.convert.importer import CARRIED, context_for, plan_import, table_for
    from megatron_vlm.convert.mcore import SHARDED_METADATA, build_meta_model, tensor_slots
    from megatron_vlm.convert.tables import family_of
    from megatron_vlm.families.keye.recipes import keye_vl_1_5_8b
    from megatron_vlm.families.keye.siglip_init import siglip_prefix

    family = family_of("KeyeVL1_5ForConditionalGeneration")
    cfg = model_to_hf(keye_vl_1_5_8b().model, "keye_vl_1_5", "bf16")
    model, _ = model_from_hf(cfg, family, "bf16")
    assert model_to_hf(model, "keye_vl_1_5", "bf16") == cfg
    text = {k: cfg[k] for k in ("vocab_size", "hidden_size", "intermediate_size",
                                "num_hidden_layers", "num_attention_heads",
                                "num_key_value_heads", "head_dim", "rms_norm_eps")}
    assert text == dict(vocab_size=151936, hidden_size=4096, intermediate_size=12288,
                        num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8,
                        head_dim=128, rms_norm_eps=1e-6)
    vision = {k: v for k, v in cfg["vision_config"].items() if k != "spatial_merge_size"}
    with torch.device("meta"):
        qwen3 = Qwen3ForCausalLM(Qwen3Config(**text, tie_word_embeddings=False))
        siglip = SiglipVisionModel(SiglipVisionConfig(**vision, vision_use_head=False))
    hf = {k: v for k, v in qwen3.state_dict().items()}
    state = siglip.state_dict()
    prefix = siglip_prefix(state)
    hf.update({"visual.vision_model." + k[len(prefix):]: v for k, v in state.items()})
    merged = 4 * vision["hidden_size"]
    for name, shape in (("embeddings.packing_position_embedding.weight", (32768, 1152)),):
        hf["visual.vision_model." + name] = torch.empty(shape, device="meta")
    for name, shape in (("pre_norm", (merged,)), ("linear_1", (merged, merged)),
                        ("linear_2", (4096, merged))):
        hf[f"mlp_AR.{name}.weight"] = torch.empty(shape, device="meta")
        hf[f"mlp_AR.{name}.bias"] = torch.empty(shape[:1], device="meta")
    assert _layer_pattern(hf) == _layer_pattern(committed_keys())
    assert len(hf) == 3 + 11 * 36 + 4 + 16 * 27 + 2 + 6

    ctx = context_for(model)
    table = table_for(family, model, ctx)
    slots = tensor_slots(build_meta_model(model).sharded_state_dict(
        metadata=dict(SHARDED_METADATA)))
    expected = {n: (s.shape, s.dtype) for n, s in slots.items()}
    plan = plan_import(table, DictSource(hf), expected, family, 36, "meta")
    assert dict(plan.skipped) == {CARRIED: 1}
    shards = plan_shards(table, ctx, list(expected), lambda n: expected[n][0],
                         lambda n: expected[n][1], torch.bfloat16, False, 5 * 2**30)
    outs = {o.name: o.shape for s in shards for o in s.outs}
    assert outs == {k: tuple(v.shape) for k, v in hf.items() if "packing" not in k}


@pytest.mark.parametrize("change, message", [
    ({"use_sliding_window": True}, "use_sliding_window=true is not supported"),
    ({"rope_scaling": {"type": "yarn", "factor": 4.0}}, "rope type 'yarn'"),
    ({"attention_bias": True}, "attention_bias=true is not supported"),
    ({"vision_config": {**VISION, "hidden_act": "gelu"}}, "hidden_act='gelu'"),
])
def test_config_refusals_name_the_field(change, message):
    from megatron_vlm.convert.hf_config import model_from_hf
    from megatron_vlm.convert.rules import ConversionError
    from megatron_vlm.convert.tables import family_of

    family = family_of("KeyeVL1_5ForConditionalGeneration")
    model, _ = model_from_hf(release_config(), family)  # the unchanged config reads
    assert model.family == "keye" and model.projector.norm_epsilon == 1e-5
    top = ("architectures", "model_type", "vision_config", "image_token_id", "video_token_id",
           "vision_start_token_id", "vision_end_token_id", "torch_dtype")
    nested = {k: v for k, v in release_config().items() if k in top}
    nested["text_config"] = {k: v for k, v in release_config().items() if k not in nested}
    assert model_from_hf(nested, family)[0] == model  # text fields in text_config read alike
    with pytest.raises(ConversionError, match=message):
        model_from_hf({**release_config(), **change}, family)


def test_every_family_architecture_reaches_its_table():
    """The converter finds a table for each HF architecture a registered family declares, and
    that table converts that family's models (Keye through its own package's ``hf_table``)."""
    from megatron_vlm.convert.tables import export_family_for, family_of
    from megatron_vlm.families import family_names, get_family

    for name in family_names():
        for arch in get_family(name).hf_architectures:
            assert family_of(arch).model_family == name, (name, arch)
    assert family_of("KeyeVL1_5ForConditionalGeneration").name == "keye_vl_1_5"
    assert export_family_for("keye", True) == "keye_vl_1_5"
    assert (export_family_for("kimi", True), export_family_for("kimi", False)) == (
        "kimi_k25", "deepseek_v3")


def test_bf16_release_round_trip_with_default_dtypes(keye, tmp_path):
    """As the release ships it (bf16): import (fp32 default) then export (bf16 default) gives
    the same bytes."""
    from safetensors.torch import save_file

    from megatron_vlm.convert import export_hf, import_hf

    _, _, tensors, _ = keye
    bf16 = {k: v.to(torch.bfloat16).contiguous() for k, v in tensors.items()}
    hf = tmp_path / "hf"
    hf.mkdir()
    save_file(bf16, str(hf / "model.safetensors"))
    config = {**release_config(), "torch_dtype": "bfloat16"}
    (hf / "config.json").write_text(json.dumps(config))
    result = import_hf(hf, tmp_path / "ours", progress=False)
    assert result.family == "keye_vl_1_5" and result.model.params_dtype == "fp32"
    export_hf(tmp_path / "ours", tmp_path / "out", progress=False)
    exported = read_safetensors_dir(tmp_path / "out")
    assert exported.keys() == bf16.keys()
    for key, original in bf16.items():
        assert exported[key].dtype == torch.bfloat16, key
        assert torch.equal(exported[key].view(torch.uint8), original.view(torch.uint8)), key
    assert json.loads((tmp_path / "out" / "config.json").read_text()) == config
