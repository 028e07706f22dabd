"""``export --int4-experts``: routed experts as the K2.5 release ships them (compressed-tensors
``pack-quantized`` INT4, group 32), checked against compressed-tensors 0.20 itself and against
transformers 5.23 loading the result. The model is test_convert_kimi's tiny K2.5 (every weight and
the router bias perturbed), imported from ``save_pretrained``'s files.

* the exported ``weight_packed/weight_scale/weight_shape`` equal what the library's own save path
  (``apply_quantization_config`` -> min-max scales -> ``ModelCompressor.compress_model``, as
  llm-compressor saves a model) writes for the same bf16 weight with the release's args;
* import(export) = the library's unpacking, exactly (fp32, checked in float64), within the INT4
  bound of the weight; every other tensor is the bf16 weight, untouched;
* export -> import -> export: not bit-identical (min-max re-scales already-quantised groups:
  ``scale' = max|q| * scale / 7.5``); re-quantising with the same scales is (see ``int4.py``);
* the CLI end to end, and transformers loads the directory (no missing/unexpected keys) into our
  imported weights, with logits close to ours.
"""

from __future__ import annotations

import json

import pytest
import torch
from tiny_runs import load_tool

pytest.importorskip("transformers")
pytest.importorskip("compressed_tensors")
from compressed_tensors.compressors import ModelCompressor
from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
from compressed_tensors.compressors.pack_quantized.helpers import unpack_from_int32
from compressed_tensors.quantization import (
    QuantizationArgs,
    QuantizationConfig,
    QuantizationScheme,
    apply_quantization_config,
    quantize,
)
from compressed_tensors.quantization.utils import compute_dynamic_scales_and_zp
from hf_fixtures import load_converted, read_safetensors_dir, rekey_to_release
from test_convert_kimi import TEXT, build_hf
from transformers.models.kimi_k25 import Kimi_K25ForConditionalGeneration

# The release's weight scheme, written out here from SPEC §4 (not read from our module).
RELEASE_ARGS = QuantizationArgs(num_bits=4, type="int", symmetric=True, strategy="group",
                                group_size=32)
PRE = "language_model.model.layers.1.mlp.experts"
INT4 = tuple(f"{PRE}.{e}.{p}_proj" for e in range(TEXT["n_routed_experts"])
             for p in ("gate", "up", "down"))
# |w - q * scale| <= max(1/2 + 2**-6, 7.5 / (1 - 2**-8) - 7) * scale = 0.5294 * scale: rounding to
# the nearest step, plus bf16 arithmetic (w / scale rounded to bf16; the scale's own bf16 rounding
# moving a group's maximum past the clamp at 7), derived in int4.py.
BOUND = max(0.5 + 2**-6, 7.5 / (1 - 2**-8) - 7)


@pytest.fixture(scope="module")
def k25_int4(megatron_groups, tmp_path_factory):
    """(HF model, its save_pretrained tensors in release names, our checkpoint, INT4 export)."""
    from megatron_vlm.convert import export_hf, import_hf

    hf = build_hf(q_lora=16)
    tmp = tmp_path_factory.mktemp("k25_int4")
    hf.save_pretrained(tmp / "saved")
    release = rekey_to_release(read_safetensors_dir(tmp / "saved"))
    ckpt = import_hf(tmp / "saved", tmp / "ours", progress=False).checkpoint
    result = export_hf(ckpt, tmp / "int4", int4_experts=True, progress=False)
    assert result.num_int4 == len(INT4)
    return hf, release, ckpt, tmp / "int4"


def _library_compress(weight: torch.Tensor) -> dict[str, torch.Tensor]:
    """compressed-tensors' save path for one bf16 ``Linear`` under the release's scheme."""
    model = torch.nn.Sequential()
    model.add_module("expert", torch.nn.Linear(weight.shape[1], weight.shape[0], bias=False,
                                               dtype=torch.bfloat16))
    with torch.no_grad():
        model.expert.weight.copy_(weight)
    config = QuantizationConfig(config_groups={"group_0": QuantizationScheme(
        targets=["Linear"], weights=RELEASE_ARGS)}, format="pack-quantized")
    apply_quantization_config(model, config)
    scale, _ = compute_dynamic_scales_and_zp(model.expert.weight.data, RELEASE_ARGS, model.expert)
    with torch.no_grad():
        model.expert.weight_scale.copy_(scale)
    ModelCompressor.from_pretrained_model(model, "pack-quantized").compress_model(model)
    return dict(model.expert.state_dict())


def _packed(files: dict, base: str) -> dict[str, torch.Tensor]:
    return {s: files[f"{base}.weight_{s}"] for s in ("packed", "scale", "shape")}


def _library_dequantize(t: dict[str, torch.Tensor]) -> torch.Tensor:
    scheme = QuantizationScheme(targets=["Linear"], weights=RELEASE_ARGS)
    state = {f"weight_{k}": v for k, v in t.items()}
    return PackedQuantizationCompressor.decompress(state, scheme)["weight"]


def test_exported_int4_equals_compressed_tensors_compression(k25_int4):
    hf, release, _, out = k25_int4
    files = read_safetensors_dir(out)
    for base in INT4:
        ours = _packed(files, base)
        assert f"{base}.weight" not in files
        want = _library_compress(release[f"{base}.weight"].to(torch.bfloat16))
        assert ours["packed"].dtype == torch.int32 and ours["scale"].dtype == torch.bfloat16
        for k in ("packed", "scale", "shape"):
            assert torch.equal(ours[k], want[f"weight_{k}"]), (base, k)
    # Everything else is the bf16 release tensor (the router bias stays fp32), names as released.
    dense = {k: v for k, v in release.items() if not k.startswith(INT4)}
    assert set(files) - {f"{b}.weight_{s}" for b in INT4 for s in ("packed", "scale", "shape")} \
        == set(dense)
    for k, v in dense.items():
        want = v if k.endswith("e_score_correction_bias") else v.to(torch.bfloat16)
        assert files[k].dtype == want.dtype and torch.equal(files[k], want), k
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["dtype"] == "bfloat16"
    q = QuantizationConfig.model_validate(cfg["text_config"]["quantization_config"])
    assert q.format == "pack-quantized" and q.quantization_status == "compressed"
    assert q.quant_method == "compressed-tensors" and list(q.config_groups) == ["group_0"]
    assert q.config_groups["group_0"].weights == RELEASE_ARGS.model_copy(
        update={"observer": "minmax"})
    assert q.ignore == ["lm_head", r"re:.*self_attn.*", r"re:.*shared_experts.*",
                        r"re:.*mlp\.(gate|up|gate_up|down)_proj.*", r"re:.*vision_tower.*",
                        r"re:.*mm_projector.*"]


def test_import_of_int4_export_is_the_library_dequantisation_within_the_bound(k25_int4, tmp_path):
    from megatron_vlm.convert import import_hf

    hf, release, ckpt, out = k25_int4
    files = read_safetensors_dir(out)
    back = load_converted(import_hf(out, tmp_path / "back", progress=False).checkpoint)
    experts = back.language_model.decoder.layers[1].mlp.experts.local_experts
    worst = 0.0
    for e, expert in enumerate(experts):
        weights = {"gate": expert.linear_fc1.weight.chunk(2)[0],
                   "up": expert.linear_fc1.weight.chunk(2)[1], "down": expert.linear_fc2.weight}
        for p, w in weights.items():
            t = _packed(files, f"{PRE}.{e}.{p}_proj")
            q = unpack_from_int32(t["packed"], 4, torch.Size(t["shape"].tolist()))
            exact = q.double() * t["scale"].double().repeat_interleave(32, dim=1)
            assert w.dtype == torch.float32 and torch.equal(w.double(), exact), (e, p)
            # the library's own decompression rounds q * scale to the scale's dtype (bf16)
            assert torch.equal(w.to(torch.bfloat16), _library_dequantize(t)), (e, p)
            orig = release[f"{PRE}.{e}.{p}_proj.weight"].to(torch.bfloat16).float()
            ratio = (orig - w).abs() / t["scale"].float().repeat_interleave(32, dim=1)
            assert ratio.max() <= BOUND, (e, p, ratio.max())
            worst = max(worst, float(ratio.max()))
    assert worst > 0.4  # really quantised: some weights sit near half a step from the grid
    # Every other parameter is the bf16 rounding of the original, untouched by the INT4 path.
    ours = load_converted(ckpt)
    for (name, a), (_, b) in zip(ours.named_parameters(), back.named_parameters()):
        if ".local_experts." not in name:
            assert torch.equal(b, a.to(torch.bfloat16).float()), name


def test_export_import_export_round_trip(k25_int4, tmp_path):
    from megatron_vlm.convert import export_hf, import_hf

    _, _, _, out = k25_int4
    first = read_safetensors_dir(out)
    ckpt = import_hf(out, tmp_path / "back", progress=False).checkpoint
    export_hf(ckpt, tmp_path / "again", int4_experts=True, progress=False)
    second = read_safetensors_dir(tmp_path / "again")
    assert set(first) == set(second)
    for k in first:  # bf16 tensors come back bit for bit
        if not k.startswith(INT4):
            assert torch.equal(first[k], second[k]), k
    changed = 0
    for base in INT4:
        a, b = _packed(first, base), _packed(second, base)
        q = unpack_from_int32(a["packed"], 4, torch.Size(a["shape"].tolist()))
        w_hat = q.float() * a["scale"].float().repeat_interleave(32, dim=1)
        # Same scales: quantising the already-quantised values gives the same bits.
        again = quantize(w_hat, a["scale"], None, RELEASE_ARGS, dtype=torch.int8)
        assert torch.equal(again, q), base
        # The exporter re-derives min-max scales: max|q| * scale / 7.5 (bf16), a new grid.
        max_q = q.abs().to(torch.bfloat16).unflatten(1, (-1, 32)).amax(-1)
        assert torch.equal(b["scale"], max_q * a["scale"] / 7.5), base
        changed += not torch.equal(a["packed"], b["packed"])
    assert changed == len(INT4)  # so the INT4 round trip is not bit-identical (int4.py)


def test_cli_export_loads_in_transformers_close_to_ours(k25_int4, tmp_path, capsys):
    from megatron_vlm.convert import import_hf

    hf, _, ckpt, _ = k25_int4
    cli = load_tool("convert_hf")
    out = tmp_path / "cli"
    assert cli.main(["export", str(ckpt.parent), str(out), "--int4-experts", "--quiet"]) == 0
    assert f", {len(INT4)} INT4 (" in capsys.readouterr().out
    assert cli.main(["export", str(ckpt), str(tmp_path / "x"), "--int4-experts", "--dtype",
                     "fp32", "--quiet"]) == 1
    assert "drop --dtype fp32" in capsys.readouterr().err

    loaded, info = Kimi_K25ForConditionalGeneration.from_pretrained(
        out, output_loading_info=True, dtype=torch.float32)
    assert all(not v for v in info.values()), info
    loaded.eval()
    ours = load_converted(import_hf(out, tmp_path / "back", progress=False).checkpoint)
    # transformers dequantises through compressed-tensors in bf16 (q * scale rounded to bf16)
    # into its fused in-memory experts; ours are the exact fp32 products.
    mine = ours.language_model.decoder.layers[1].mlp.experts.local_experts
    theirs = loaded.model.language_model.layers[1].mlp.experts
    for e, expert in enumerate(mine):
        want = expert.linear_fc1.weight.to(torch.bfloat16).float()
        assert torch.equal(theirs.gate_up_proj[e], want), e
        assert torch.equal(theirs.down_proj[e], expert.linear_fc2.weight.to(torch.bfloat16)
                           .float()), e
    ids = torch.randint(0, TEXT["vocab_size"], (1, 32), generator=torch.Generator().manual_seed(3))
    assert theirs.gate_up_proj.dtype == torch.bfloat16  # kept bf16 despite dtype=float32
    with torch.no_grad():
        got = loaded(input_ids=ids).logits  # as transformers runs it: bf16 experts
        original = hf(input_ids=ids).logits
        exact_int4 = _ours_logits(ours, ids)
        for expert in mine:  # the same bf16 products as transformers' experts
            for w in (expert.linear_fc1.weight, expert.linear_fc2.weight):
                w.copy_(w.to(torch.bfloat16))
        same = _ours_logits(ours, ids)
        for p in (theirs.gate_up_proj, theirs.down_proj):  # (.float() refuses a quantised model)
            p.data = p.data.float()
        fp32 = loaded(input_ids=ids).logits
    # Same weights, all fp32: equal up to summation order (test_convert_kimi's ATOL).
    torch.testing.assert_close(same, fp32, atol=1e-5, rtol=0)
    # transformers' bf16 experts (weights rounded, relative <= 2**-8, and computed in bf16) move
    # logits of size ~3 by ~1e-2; the INT4 quantisation itself (vs the unquantised original)
    # moves them several times more, and stays a small fraction of the logits.
    as_loaded, int4 = (exact_int4 - got).abs().max(), (original - exact_int4).abs().max()
    assert 0 < as_loaded < 0.05 and 5 * as_loaded < int4 < 0.25 * original.abs().max(), (
        as_loaded, int4)


def _ours_logits(model, ids):
    return model(ids, torch.arange(ids.shape[1])[None], None)[..., : TEXT["vocab_size"]]


def test_import_refuses_another_quantization_scheme(k25_int4, tmp_path):
    import shutil

    from megatron_vlm.convert import ConversionError, import_hf

    src = tmp_path / "group128"
    shutil.copytree(k25_int4[3], src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["text_config"]["quantization_config"]["config_groups"]["group_0"]["weights"][
        "group_size"] = 128
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConversionError, match=r"text_config\.quantization_config .*'group_size'"
                                              r": 128.*only the K2.5 release's"):
        import_hf(src, tmp_path / "ours", progress=False)
    assert not (tmp_path / "ours").exists()


def test_int4_export_without_the_library_says_what_to_install(k25_int4, tmp_path, monkeypatch):
    import sys

    from megatron_vlm.convert import ConversionError, export_hf

    for name in [n for n in sys.modules if n.split(".")[0] == "compressed_tensors"]:
        monkeypatch.setitem(sys.modules, name, None)  # as if not installed
    with pytest.raises(ConversionError, match=r"pip install 'megatron_vlm\[int4\]'"):
        export_hf(k25_int4[2], tmp_path / "out", int4_experts=True, progress=False)
    assert not (tmp_path / "out").exists()
