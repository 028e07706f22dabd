"""InternVL3.5 HF conversion (issue 21 item 4): a tiny ``InternVLForConditionalGeneration``
checkpoint (``internvl_reference.hf_internvl``) in the release layout (the ``-HF`` checkpoints'
and ``save_pretrained``'s names: ``language_model.model.*``, ``vision_tower.*``, ...), bf16, goes
through ``tools/convert_hf.py import`` and ``export --dtype bf16`` (streaming, two shards and an
index):

* Qwen3 dense with tied embeddings (``InternVLConfig``'s default: no head tensor) and
  Qwen3-MoE with an untied head and per-expert release names, and Qwen3 with the 6B-style tower
  (q/k norms, no q/k/v biases): every tensor comes back byte for
  byte under exactly the names written, the exported ``config.json`` carries transformers' values,
  and transformers loads the export (nothing missing or unexpected) with logits equal to our
  imported model's on a text document;
* GPT-OSS as transformers writes it (``save_pretrained``: fused per-layer experts with biases)
  imports into a model whose logits equal transformers'. Its export writes per-expert slices
  (``experts.{E}.gate_up_proj``), which transformers does not load: not covered here;
* the real sizes (InternVL3.5-8B, 30B-A3B, 20B-A4B): config both ways, and transformers' modules
  on the meta device have exactly the tensors the table maps, shapes checked both ways.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
from hf_fixtures import read_safetensors_dir  # noqa: E402
from internvl_reference import VOCAB, hf_internvl, release_name, release_state  # noqa: E402

ATOL = 1e-5
CASES = {"qwen3_tied": ("qwen3", True, False), "qwen3_moe": ("qwen3_moe", False, False),
         "qwen3_vit6b": ("qwen3", False, True)}
"""case -> (text model, tied embeddings, 6B-style tower)."""


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

    kind, tied, vit6b = CASES[request.param]
    tmp = tmp_path_factory.mktemp(request.param)
    hf = hf_internvl(kind, tied=tied, vit6b=vit6b)
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
    qk_norms = [k for k in tensors if k.endswith("attention.q_norm.weight")]
    assert len(qk_norms) == (2 if case == "qwen3_vit6b" else 0)


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


# ------------------------------------------------------------------------------ real sizes

REAL_VISION_300M = dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                        intermediate_size=4096, image_size=448, patch_size=14,
                        norm_type="layer_norm", attention_bias=True, use_qk_norm=False,
                        layer_norm_eps=1e-6, layer_scale_init_value=0.1)
REAL_TEXTS = {
    # InternVL3.5-8B: Qwen3-8B
    "qwen3": dict(model_type="qwen3", vocab_size=151936, hidden_size=4096,
                  intermediate_size=12288, num_hidden_layers=36, num_attention_heads=32,
                  num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
                  rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 1e6}),
    # InternVL3.5-30B-A3B: Qwen3-30B-A3B
    "qwen3_moe": dict(model_type="qwen3_moe", vocab_size=151936, hidden_size=2048,
                      intermediate_size=6144, moe_intermediate_size=768, num_hidden_layers=48,
                      num_attention_heads=32, num_key_value_heads=4, head_dim=128,
                      num_experts=128, num_experts_per_tok=8, norm_topk_prob=True,
                      decoder_sparse_step=1, mlp_only_layers=[], max_position_embeddings=40960,
                      rms_norm_eps=1e-6,
                      rope_parameters={"rope_type": "default", "rope_theta": 1e6}),
    # InternVL3.5-20B-A4B: gpt-oss-20b
    "gpt_oss": dict(model_type="gpt_oss", vocab_size=201088, hidden_size=2880,
                    intermediate_size=2880, num_hidden_layers=24, num_attention_heads=64,
                    num_key_value_heads=8, head_dim=64, num_local_experts=32,
                    num_experts_per_tok=4, sliding_window=128, swiglu_limit=7.0,
                    attention_bias=True, max_position_embeddings=131072, rms_norm_eps=1e-5,
                    rope_parameters={"rope_type": "yarn", "rope_theta": 150000.0,
                                     "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                                     "truncate": False,
                                     "original_max_position_embeddings": 4096}),
}


@pytest.mark.parametrize("kind", sorted(REAL_TEXTS))
def test_real_sizes_plan_both_ways(megatron_groups, kind):
    """InternVL3.5-8B / 30B-A3B / 20B-A4B's configs (InternViT-300M + the real text model):
    ``config.json`` read, written and read again gives the same config; with the real widths
    (text layers cut to 2) transformers' modules on the meta device, in the release layout
    (through the family's alias passes: GPT-OSS's fused experts sliced), have exactly the
    tensors our table maps, every shape checked both ways (import plan and export shards)."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    from megatron_vlm.convert.export_plan import plan_shards
    from megatron_vlm.convert.hf_io import AliasedSource, DictSource
    from megatron_vlm.convert.importer import context_for, plan_import, table_for
    from megatron_vlm.convert.mcore import SHARDED_METADATA, build_meta_model, tensor_slots
    from megatron_vlm.families.internvl.hf_config import model_from_hf, model_to_hf
    from megatron_vlm.families.internvl.hf_table import HF_FAMILY

    def config(layers: int) -> dict:
        cfg = InternVLConfig(vision_config=REAL_VISION_300M, tie_word_embeddings=False,
                             text_config=dict(REAL_TEXTS[kind], num_hidden_layers=layers),
                             image_token_id=151671).to_dict()
        cfg["architectures"] = ["InternVLForConditionalGeneration"]
        return cfg

    full, _ = model_from_hf(config(REAL_TEXTS[kind]["num_hidden_layers"]), "bf16")
    again, _ = model_from_hf(model_to_hf(full, "bf16", full.token_ids), "bf16")
    assert again == full
    assert full.projector.output_size == full.llm.hidden_size and full.vision.num_layers == 24

    small = config(2)
    with torch.device("meta"):
        hf = InternVLForConditionalGeneration(InternVLConfig(**small))
    state = {release_name(k): v for k, v in hf.state_dict().items()}
    if kind == "qwen3_moe":  # the release holds Qwen3-MoE's experts one by one
        state = {k: v for k, v in state.items() if ".mlp.experts." not in k}
        for layer in range(2):
            pre = f"language_model.model.layers.{layer}.mlp.experts."
            for e in range(128):
                for name, shape in (("gate_proj", (768, 2048)), ("up_proj", (768, 2048)),
                                    ("down_proj", (2048, 768))):
                    state[f"{pre}{e}.{name}.weight"] = torch.empty(shape, device="meta")
    model, _ = model_from_hf(small, "bf16")
    ctx = context_for(model)
    source = DictSource(state)
    for aliases in HF_FAMILY.alias_passes:
        source = AliasedSource(source, aliases, ctx)
    table = table_for(HF_FAMILY, model, ctx)
    slots = tensor_slots(build_meta_model(model).sharded_state_dict(
        metadata=dict(SHARDED_METADATA)))
    expected = {n: (s.shape, s.dtype) for n, s in slots.items()}
    plan = plan_import(table, source, expected, HF_FAMILY, 2, "meta")
    assert not plan.skipped
    shards = plan_shards(table, ctx, list(expected), lambda n: expected[n][0],
                         lambda n: expected[n][1], torch.bfloat16, False, 5 * 2**30)
    outs = {o.name: o.shape for s in shards for o in s.outs}
    assert outs == {k: tuple(source.spec(k).shape) for k in source.keys()}
    assert any(".mlp.experts.31." in k for k in outs) == (kind != "qwen3")


def _tiny_config(kind: str) -> dict:
    from internvl_reference import TEXTS, VISION
    from transformers import InternVLConfig

    cfg = InternVLConfig(vision_config=VISION, text_config=TEXTS[kind]).to_dict()
    cfg["architectures"] = ["InternVLForConditionalGeneration"]
    return cfg


@pytest.mark.parametrize("kind, section, change, message", [
    ("qwen3", "text_config", {"model_type": "llama"}, "text_config.model_type='llama'"),
    ("qwen3", "text_config", {"hidden_act": "gelu"}, "text_config.hidden_act='gelu'"),
    ("qwen3", "text_config", {"attention_bias": True}, "attention_bias=true"),
    ("qwen3", "text_config", {"use_sliding_window": True}, "use_sliding_window=true"),
    ("qwen3", "text_config", {"rope_parameters": {"rope_type": "yarn", "factor": 4.0}},
     "plain RoPE"),
    ("gpt_oss", "text_config", {"attention_bias": False}, "attention_bias=false"),
    ("gpt_oss", "text_config", {"layer_types": ["full_attention", "sliding_attention"] * 2},
     "layer_types"),
    ("gpt_oss", "text_config", {"rope_parameters": {"rope_type": "yarn", "factor": 4.0,
                                                    "original_max_position_embeddings": 64,
                                                    "attention_factor": 2.0}},
     "attention_factor"),
    ("qwen3", None, {"vision_feature_layer": -2}, "vision_feature_layer=-2"),
    ("qwen3", None, {"architectures": ["LlavaForConditionalGeneration"]}, "architectures"),
])
def test_config_refusals_name_the_field(kind, section, change, message):
    """What our model cannot run is refused on import with the field's name."""
    from megatron_vlm.convert.rules import ConversionError
    from megatron_vlm.families.internvl.hf_config import model_from_hf

    cfg = _tiny_config(kind)
    (cfg[section] if section else cfg).update(change)
    with pytest.raises(ConversionError, match=message.replace("(", r"\(").replace("[", r"\[")):
        model_from_hf(cfg)


def test_export_refuses_what_internvl_cannot_express():
    """GLM-4.1V's sandwich norms, a GLM-style sigmoid router with a shared expert, or M-RoPE
    have no InternVL text model: export names the keys."""
    import dataclasses

    from megatron_vlm.convert.rules import ConversionError
    from megatron_vlm.families.internvl.hf_config import model_from_hf, model_to_hf

    model, _ = model_from_hf(_tiny_config("qwen3_moe"))
    for change, message in (
            (dict(sandwich_norms=True), "sandwich_norms=false"),
            (dict(moe_router_score_function="sigmoid", num_shared_experts=1),
             "moe_router_score_function=softmax"),
            (dict(position_embedding="mrope", mrope_section=[2, 3, 3]),
             "position_embedding=rope")):
        llm = dataclasses.replace(model.llm, **change)
        with pytest.raises(ConversionError, match=message):
            model_to_hf(dataclasses.replace(model, llm=llm), "bf16", model.token_ids)
