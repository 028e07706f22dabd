"""GLM-4.5V / GLM-4.1V HF conversion (issue 20 item 5): a tiny checkpoint in the release layout,
built from transformers' own modules (``glm_reference.hf_glm``, experts per expert as released,
bf16 with the router's fp32 ``e_score_correction_bias``) plus, for GLM-4.5V, one MTP layer under
Megatron-Bridge's GLM-4.5 names (``families/glm/hf_table.py``), goes through
``tools/convert_hf.py import`` and ``export --dtype bf16`` (streaming, two shards and an index):

* every tensor comes back byte for byte (MTP tensors and the fp32 bias included), under exactly
  the names written, and the exported ``config.json`` carries transformers' values;
* transformers loads the exported directory (``from_pretrained``; it leaves the MTP layer out,
  as it does for the release) and its logits equal our imported model's on a text document;
* what transformers' own ``save_pretrained`` writes imports too.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
from glm_reference import LLM_PREFIX, hf_glm, mtp_release_tensors, release_state  # noqa: E402
from hf_fixtures import read_safetensors_dir  # noqa: E402

ATOL = 1e-5


def release_config(hf, mtp: bool) -> dict:
    """transformers' ``config.json`` of ``hf`` (``to_dict``) naming its architecture, with
    ``num_nextn_predict_layers`` when the checkpoint holds an MTP layer."""
    cfg = hf.config.to_dict()
    cfg["architectures"] = [type(hf).__name__]
    cfg["dtype"] = "bfloat16"
    if mtp:
        cfg["text_config"]["num_nextn_predict_layers"] = 1
    return cfg


def release_tensors(hf, mtp: bool) -> dict[str, torch.Tensor]:
    tensors = release_state(hf)
    if mtp:
        tensors.update(mtp_release_tensors(hf, seed=5))
    return {k: v if k.endswith("e_score_correction_bias") else v.to(torch.bfloat16)
            for k, v in tensors.items()}


@pytest.fixture(scope="module", params=["glm45v", "glm41v"])
def converted(request, megatron_groups, tmp_path_factory):
    """(HF tensors written, their config, the work dir) after import + export."""
    from safetensors.torch import save_file
    from tiny_runs import load_tool

    moe = request.param == "glm45v"
    tmp = tmp_path_factory.mktemp(request.param)
    hf = hf_glm(moe)
    tensors, config = release_tensors(hf, mtp=moe), release_config(hf, mtp=moe)
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
    which, tensors, _, tmp = converted
    exported = read_safetensors_dir(tmp / "exported")
    assert sorted(exported) == sorted(tensors)
    index = json.loads((tmp / "exported" / "model.safetensors.index.json").read_text())
    assert sorted(index["weight_map"]) == sorted(tensors)
    assert len(set(index["weight_map"].values())) > 1  # streamed into several shards
    for key, original in tensors.items():
        got = exported[key]
        assert got.dtype == original.dtype and got.shape == original.shape, key
        assert torch.equal(got.view(torch.uint8), original.contiguous().view(torch.uint8)), key
    mtp = [k for k in tensors if k.startswith(f"{LLM_PREFIX}layers.3.")]
    assert (len(mtp) > 20) == (which == "glm45v")  # the MTP layer (decoder layer + 4 tensors)
    assert f"{LLM_PREFIX}layers.3.eh_proj.weight" in mtp or which == "glm41v"


def test_exported_config_is_transformers(converted):
    """Every key the export writes has transformers' value; only the video wrapper ids (no
    field of ours, never read by transformers 5.25) are left to its defaults."""
    _, _, config, tmp = converted
    exported = json.loads((tmp / "exported" / "config.json").read_text())
    assert exported["architectures"] == config["architectures"]
    for section in ("text_config", "vision_config"):
        for key, value in exported[section].items():
            assert config[section][key] == value, (section, key)
    top = {k: v for k, v in exported.items() if k not in ("text_config", "vision_config")}
    assert top == {k: config[k] for k in top}
    assert set(config) - set(exported) >= {"video_start_token_id", "video_end_token_id"}
    for key in ("image_token_id", "video_token_id", "image_start_token_id", "image_end_token_id"):
        assert exported[key] == config[key]


def _load_imported(step_dir: Path):
    from megatron_vlm.checkpoint import load_checkpoint, read_manifest
    from megatron_vlm.config import ParallelConfig
    from megatron_vlm.convert.importer import load_job_model
    from megatron_vlm.families import get_family
    from megatron_vlm.parallel.init import ensure_single_process_groups

    model_cfg = load_job_model(read_manifest(step_dir)["config_yaml"])
    groups = ensure_single_process_groups().pg_collection
    model = get_family("glm").build_vlm(model_cfg, ParallelConfig(), pg_collection=groups)
    load_checkpoint(step_dir, [model], None, None, load_optimizer=False)
    return model.eval(), model_cfg


def test_transformers_loads_the_export_and_equals_ours(converted):
    """``from_pretrained`` on the exported directory (fp32) misses nothing (the MTP layer is all
    it leaves unused); its text logits equal our imported model's (3-axis ids t = h = w)."""
    import transformers

    which, tensors, config, tmp = converted
    cls = getattr(transformers, config["architectures"][0])
    hf, info = cls.from_pretrained(tmp / "exported", dtype=torch.float32,
                                   output_loading_info=True)
    hf.eval()
    assert not info["missing_keys"] and not info["mismatched_keys"]
    assert all(k.startswith(f"{LLM_PREFIX}layers.3.") for k in info["unexpected_keys"])
    ours, model_cfg = _load_imported(tmp / "ours" / "step_0000000")
    assert model_cfg.llm.mtp_num_layers == (1 if which == "glm45v" else 0)
    ids = torch.randint(0, 120, (1, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        got = ours(ids, torch.arange(20).expand(3, 1, -1)[:, 0], None)
    assert expected.abs().max() > 1.0
    torch.testing.assert_close(got[..., :expected.shape[-1]], expected, atol=ATOL, rtol=0)


def test_save_pretrained_layout_imports(megatron_groups, tmp_path):
    """What transformers 5.25 itself writes (``save_pretrained`` of the tiny GLM-4.5V, fp32: the
    release's per-expert names, no MTP layer) imports into a model whose text logits equal
    transformers'."""
    from tiny_runs import load_tool

    hf = hf_glm(moe=True)
    hf.save_pretrained(tmp_path / "hf")
    cli = load_tool("convert_hf")
    assert cli.main(["import", str(tmp_path / "hf"), str(tmp_path / "ours"), "--quiet"]) == 0
    ours, model_cfg = _load_imported(tmp_path / "ours" / "step_0000000")
    assert model_cfg.llm.mtp_num_layers == 0 and model_cfg.llm.num_experts == 8
    ids = torch.randint(0, 120, (1, 20), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = hf(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
        got = ours(ids, torch.arange(20).expand(3, -1), None)
    torch.testing.assert_close(got[..., :expected.shape[-1]], expected, atol=ATOL, rtol=0)


def _meta_release(hf_cls, config_cls, cfg: dict, mtp: bool) -> dict[str, torch.Tensor]:
    """transformers' modules of ``cfg`` on the meta device, in the release layout, with the MTP
    layer's names (a copy of the last layer's plus Megatron-Bridge's four) when ``mtp``."""
    with torch.device("meta"):
        hf = hf_cls(config_cls(**{k: v for k, v in cfg.items() if k != "architectures"}))
    state = release_state(hf)
    if mtp:
        n, hidden = cfg["text_config"]["num_hidden_layers"], cfg["text_config"]["hidden_size"]
        last, nxt = f"{LLM_PREFIX}layers.{n - 1}.", f"{LLM_PREFIX}layers.{n}."
        state.update({k.replace(last, nxt, 1): v for k, v in state.items() if k.startswith(last)})
        for name, shape in (("enorm", (hidden,)), ("hnorm", (hidden,)),
                            ("shared_head.norm", (hidden,)), ("eh_proj", (hidden, 2 * hidden))):
            state[f"{nxt}{name}.weight"] = torch.empty(shape, device="meta")
    return state


@pytest.mark.parametrize("recipe", ["glm45v", "glm41v_9b"])
def test_real_sizes_plan_both_ways(megatron_groups, recipe):
    """The recipes' real-size models: ``config.json`` written and read back gives the same
    config; with the real widths (layers cut to 2 + the MTP layer, the same names layer for
    layer) transformers' modules on the meta device have exactly the tensors our table maps,
    every shape checked both ways (import plan and export shards)."""
    import dataclasses

    import transformers

    from megatron_vlm.convert.export_plan import plan_shards
    from megatron_vlm.convert.hf_io import DictSource
    from megatron_vlm.convert.importer import context_for, plan_import, table_for
    from megatron_vlm.convert.mcore import SHARDED_METADATA, build_meta_model, tensor_slots
    from megatron_vlm.families.glm.hf_config import model_from_hf, model_to_hf
    from megatron_vlm.families.glm.hf_table import HF_FAMILY
    from megatron_vlm.recipes import get_recipe

    real = get_recipe(recipe).model
    cfg = model_to_hf(real, "bf16", real.token_ids)
    model, _ = model_from_hf(cfg, "bf16")
    assert model_to_hf(model, "bf16", model.token_ids) == cfg
    assert model.llm == dataclasses.replace(real.llm, mtp_loss_weight=model.llm.mtp_loss_weight,
                                            init_method_std=model.llm.init_method_std)
    assert (model.vision, model.projector) == (real.vision, real.projector)

    moe = real.llm.num_experts is not None
    small = json.loads(json.dumps(cfg))
    small["text_config"].update(num_hidden_layers=2)
    arch = cfg["architectures"][0]
    config_cls = getattr(transformers, arch.replace("ForConditionalGeneration", "Config"))
    hf = _meta_release(getattr(transformers, arch), config_cls, small, mtp=moe)
    model, _ = model_from_hf(small, "bf16")
    ctx = context_for(model)
    table = table_for(HF_FAMILY, model, ctx)
    slots = tensor_slots(build_meta_model(model).sharded_state_dict(
        metadata=dict(SHARDED_METADATA)))
    expected = {n: (s.shape, s.dtype) for n, s in slots.items()}
    plan = plan_import(table, DictSource(hf), expected, HF_FAMILY, 2, "meta")
    assert not plan.skipped
    shards = plan_shards(table, ctx, list(expected), lambda n: expected[n][0],
                         lambda n: expected[n][1], torch.bfloat16, False, 5 * 2**30)
    outs = {o.name: o.shape for s in shards for o in s.outs}
    assert outs == {k: tuple(v.shape) for k, v in hf.items()}
    assert any(".mlp.experts.127." in k for k in outs) == moe


def _tiny_config(moe: bool) -> dict:
    from glm_reference import GLM41_TEXT, GLM45_TEXT, VISION
    from transformers import Glm4vConfig, Glm4vMoeConfig

    text = GLM45_TEXT if moe else GLM41_TEXT
    cfg = (Glm4vMoeConfig if moe else Glm4vConfig)(
        text_config=text, vision_config=dict(VISION, out_hidden_size=text["hidden_size"])
    ).to_dict()
    cfg["architectures"] = ["Glm4vMoeForConditionalGeneration" if moe
                            else "Glm4vForConditionalGeneration"]
    return cfg


@pytest.mark.parametrize("moe, section, change, message", [
    (True, "text_config", {"hidden_act": "gelu"}, "text_config.hidden_act='gelu'"),
    (True, "text_config", {"use_qk_norm": True}, "use_qk_norm=true"),
    (True, "text_config", {"norm_topk_prob": False}, "norm_topk_prob=false"),
    (True, "text_config", {"rope_parameters": {"rope_type": "yarn", "factor": 4.0}},
     "rope type 'yarn'"),
    (False, "text_config", {"head_dim": 64}, "GLM-4.1V's attention uses hidden_size"),
    (True, "vision_config", {"out_hidden_size": 48}, "out_hidden_size=48 != text_config"),
    (True, None, {"quantization_config": {"quant_method": "fp8"}}, "quantized GLM"),
    (True, None, {"architectures": ["Glm4vForCausalLM"]}, "the GLM table converts one of"),
])
def test_config_refusals_name_the_field(moe, section, change, message):
    from megatron_vlm.convert.rules import ConversionError
    from megatron_vlm.families.glm.hf_config import model_from_hf

    cfg = _tiny_config(moe)
    model_from_hf(cfg)  # the unchanged config reads
    (cfg[section] if section else cfg).update(change)
    with pytest.raises(ConversionError, match=message.replace("(", r"\(")):
        model_from_hf(cfg)


def test_export_refuses_what_transformers_cannot_build():
    """A GLM model the two architectures cannot express is refused naming the key."""
    import dataclasses

    from megatron_vlm.convert.rules import ConversionError
    from megatron_vlm.families.glm.hf_config import model_from_hf, model_to_hf

    for moe, change, message in (
            (True, {"sandwich_norms": True}, "sandwich_norms=false"),
            (True, {"mrope_style": "interleaved"}, "mrope_style=neox"),
            (False, {"sandwich_norms": False}, "sandwich_norms=true"),
            (False, {"mtp_num_layers": 1}, "mtp_num_layers=0")):
        model, _ = model_from_hf(_tiny_config(moe))
        model.llm = dataclasses.replace(model.llm, **change)
        with pytest.raises(ConversionError, match=message):
            model_to_hf(model, "bf16", model.token_ids)
    model, _ = model_from_hf(_tiny_config(True))
    model.family = "keye"
    with pytest.raises(ConversionError, match="needs a GLM VLM checkpoint"):
        model_to_hf(model, "bf16", model.token_ids)


@pytest.mark.parametrize("moe", [True, False])
def test_released_rope_layout_reads_as_transformers_reads_it(moe):
    """The released files' RoPE layout (``rope_scaling`` with ``mrope_section``, ``rope_theta``
    and ``partial_rotary_factor`` beside it in ``text_config``; several eos ids) gives the base,
    rotary fraction and sections transformers 5.25 normalises it to (``rope_parameters``)."""
    import transformers

    from megatron_vlm.families.glm.hf_config import model_from_hf

    cfg = _tiny_config(moe)
    text = cfg["text_config"]
    del text["rope_parameters"]
    text.update(rope_scaling={"type": "default", "mrope_section": [2, 3, 3]}, rope_theta=5000.0,
                partial_rotary_factor=0.5, eos_token_id=[120, 121])
    model, _ = model_from_hf(json.loads(json.dumps(cfg)))
    config_cls = getattr(transformers, "Glm4vMoeConfig" if moe else "Glm4vConfig")
    rope = config_cls(**{k: v for k, v in cfg.items() if k != "architectures"}
                      ).text_config.rope_parameters
    llm = model.llm
    assert (llm.rope_theta, llm.rotary_fraction, llm.mrope_section) == (
        rope["rope_theta"], rope["partial_rotary_factor"], rope["mrope_section"])
    assert llm.rope_theta == 5000.0 and model.token_ids.eos == 120
