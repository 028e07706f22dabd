"""The whole K2.5 model through the converter, against transformers 5.23's
``Kimi_K25ForConditionalGeneration`` (tiny, fp32, every weight and the router bias perturbed).

* import from ``save_pretrained``'s files -> our ``KimiVLM`` logits equal HF's for text only, two
  images of different sizes packed in one sequence, and an 8-frame video (two 4-frame chunks;
  HF's video path needs SPEC §9's workaround: vision tower + projector by hand, passed as
  ``mm_encoder_outputs``);
* the Kimi-VL layout (``multi_modal_projector.*``, q_proj LLM, q_lora off), written by re-keying
  the same kind of tiny model, imports to the same logits;
* release layout -> ours -> export: every tensor bit-identical (names, shapes, dtypes, values);
  from ``save_pretrained``'s and the in-memory layouts, the exported files load in transformers
  with no missing/unexpected keys into the identical state dict, with our next-token choices;
* INT4 routed experts (compressed-tensors ``pack-quantized``, group 32) dequantise on import to
  exactly the rule applied independently here.

Tolerance: ``ATOL`` 1e-5 absolute on logits of size ~1-4 (fp32 summation order).
"""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("transformers")
from hf_fixtures import (
    VISION,
    load_converted,
    perturb_all,
    random_media,
    read_safetensors_dir,
    rekey_to_release,
)
from safetensors.torch import save_file
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.kimi_k25 import Kimi_K25Config, Kimi_K25ForConditionalGeneration

ATOL = 1e-5
IMAGE, VIDEO = 163605, 163840  # Kimi_K25Config defaults (beyond the tiny vocab: HF masks them)
TEXT = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 4, "vocab_size": 128, "intermediate_size": 96,
        "moe_intermediate_size": 32, "n_routed_experts": 4, "num_experts_per_tok": 2,
        "n_group": 1, "topk_group": 1, "n_shared_experts": 1, "kv_lora_rank": 16,
        "qk_nope_head_dim": 8, "qk_rope_head_dim": 8, "v_head_dim": 8,
        "first_k_dense_replace": 1, "num_nextn_predict_layers": 0, "max_position_embeddings": 256,
        "rope_parameters": {"rope_type": "yarn", "rope_theta": 50000.0, "factor": 4.0,
                            "original_max_position_embeddings": 32, "beta_fast": 32.0,
                            "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0}}


def build_hf(q_lora: int | None) -> Kimi_K25ForConditionalGeneration:
    torch.manual_seed(0)
    config = Kimi_K25Config(vision_config=VISION, text_config=dict(TEXT, q_lora_rank=q_lora),
                            projection_hidden_size=VISION["hidden_size"], tie_word_embeddings=False)
    config._attn_implementation = "eager"
    model = Kimi_K25ForConditionalGeneration(config).eval()
    perturb_all(model, seed=11)
    return model


@pytest.fixture(scope="module")
def k25(megatron_groups, tmp_path_factory):
    """(HF model, tmp dir, its save_pretrained dir, our imported checkpoint)."""
    from megatron_vlm.convert import import_hf

    hf = build_hf(q_lora=16)
    tmp = tmp_path_factory.mktemp("k25")
    hf.save_pretrained(tmp / "saved")
    result = import_hf(tmp / "saved", tmp / "ours", progress=False)
    assert result.family == "kimi_k25" and result.skipped == {}
    return hf, tmp, result


@pytest.fixture(scope="module")
def ours_k25(k25):
    return load_converted(k25[2].checkpoint)


# --- inputs -------------------------------------------------------------------------------------


def _sequence(spans: list[tuple[int, int]], length: int, seed: int) -> tuple[torch.Tensor, list]:
    """Random text ids with ``(placeholder id, count)`` spans spread over ``length`` tokens;
    returns ids [1, S] and each span's placeholder positions."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, TEXT["vocab_size"], (1, length), generator=gen)
    gap = (length - sum(n for _, n in spans)) // (len(spans) + 1)
    positions, at = [], gap
    for token, n in spans:
        ids[0, at:at + n] = token
        positions.append(torch.arange(at, at + n))
        at += n + gap
    return ids, positions


def _ours(model, ids, pixels=None, grid=None, positions=None):
    with torch.no_grad():
        out = model(ids, torch.arange(ids.shape[1])[None], None, pixel_values=pixels,
                    grid_thw=grid, media_positions=None if positions is None
                    else torch.cat(positions))
    return out[..., : TEXT["vocab_size"]]


def _check(ours, theirs):
    assert ours.shape == theirs.shape
    torch.testing.assert_close(ours, theirs, atol=ATOL, rtol=0)
    assert theirs.abs().max() > 0.5  # the tolerance is small against the output


# --- import: logits equal transformers' ---------------------------------------------------------


def test_text_only(k25, ours_k25):
    hf = k25[0]
    ids, _ = _sequence([], 96, seed=0)  # past YaRN's original 32 positions
    with torch.no_grad():
        _check(_ours(ours_k25, ids), hf(input_ids=ids).logits)


def test_two_images_of_different_sizes_packed(k25, ours_k25):
    hf = k25[0]
    pixels, grid = random_media([[1, 4, 6], [1, 6, 2]], seed=1)  # 6 + 3 tokens, resampled table
    ids, positions = _sequence([(IMAGE, 6), (IMAGE, 3)], 40, seed=2)
    with torch.no_grad():
        theirs = hf(input_ids=ids, pixel_values=pixels, image_grid_thw=grid).logits
    _check(_ours(ours_k25, ids, pixels, grid, positions), theirs)
    # Control: the images matter (swapping their order changes the logits well past ATOL).
    swapped = torch.cat([p for p in reversed(pixels.split(grid.prod(1).tolist()))])
    other = _ours(ours_k25, ids, swapped, grid.flip(0), [positions[1], positions[0]][::-1])
    assert (other - theirs).abs().max() > 100 * ATOL


def test_eight_frame_video_as_two_chunks(k25, ours_k25):
    """SPEC §9: transformers 5.23's ``pixel_values_videos`` path fails for t=4 chunks; the
    reference runs its vision tower and projector directly and hands the chunks' features in."""
    hf = k25[0]
    pixels, grid = random_media([[4, 4, 6], [4, 4, 6]], seed=3)  # 8 frames, 6 tokens per chunk
    ids, positions = _sequence([(VIDEO, 6), (VIDEO, 6)], 36, seed=4)
    with torch.no_grad():
        vo = hf.model.vision_tower(pixels, grid_thw=grid)
        emb = hf.model.mm_projector(vo.pooler_output).squeeze(1)
        chunks = tuple(emb.split((grid.prod(1) // 16).tolist()))
        theirs = hf(input_ids=ids, mm_encoder_outputs={
            "video": BaseModelOutputWithPooling(pooler_output=chunks)}).logits
    _check(_ours(ours_k25, ids, pixels, grid, positions), theirs)


# --- Kimi-VL layout ------------------------------------------------------------------------------


def _kimi_vl_files(hf, saved: dict) -> dict:
    """Kimi-VL checkpoint names for the tiny model: LLM from the in-memory module (K2.5's
    ``save_pretrained`` mangles a q_lora-off LLM's ``q_proj`` in 5.23, see the report), experts
    split per expert; vision/projector from the saved (release-layout) files."""
    out = {}
    for k, v in hf.state_dict().items():
        if not (k.startswith("model.language_model.") or k == "lm_head.weight"):
            continue
        k = "language_model." + ("lm_head.weight" if k == "lm_head.weight"
                                 else "model." + k[len("model.language_model."):])
        if k.endswith("experts.gate_up_proj"):
            for e, w in enumerate(v):
                gate, up = w.chunk(2)
                out[k.replace("gate_up_proj", f"{e}.gate_proj.weight")] = gate.clone()
                out[k.replace("gate_up_proj", f"{e}.up_proj.weight")] = up.clone()
        elif k.endswith("experts.down_proj"):
            for e, w in enumerate(v):
                out[k.replace("down_proj", f"{e}.down_proj.weight")] = w.clone()
        else:
            out[k] = v.clone()
    names = {"mm_projector.pre_norm": "multi_modal_projector.pre_norm",
             "mm_projector.proj.0": "multi_modal_projector.linear_1",
             "mm_projector.proj.2": "multi_modal_projector.linear_2"}
    for k, v in rekey_to_release(saved).items():
        if k.startswith("vision_tower."):
            out[k] = v
        for a, b in names.items():
            if k.startswith(a + "."):
                out[b + k[len(a):]] = v
    return out


def test_kimi_vl_layout_with_q_proj(megatron_groups, tmp_path):
    from megatron_vlm.convert import import_hf

    hf = build_hf(q_lora=None)
    hf.save_pretrained(tmp_path / "saved")
    files = _kimi_vl_files(hf, read_safetensors_dir(tmp_path / "saved"))
    kimi_vl = tmp_path / "kimi_vl"
    kimi_vl.mkdir()
    save_file(files, str(kimi_vl / "model.safetensors"))
    vision = {"model_type": "moonvit", "patch_size": 14, "init_pos_emb_height": 8,
              "init_pos_emb_width": 8, "num_attention_heads": 4, "num_hidden_layers": 2,
              "hidden_size": 32, "intermediate_size": 64, "merge_kernel_size": [2, 2]}
    text = dict(hf.config.text_config.to_dict(), model_type="deepseek_v3")
    (kimi_vl / "config.json").write_text(json.dumps({
        "architectures": ["KimiVLForConditionalGeneration"], "model_type": "kimi_vl",
        "vision_config": vision, "text_config": text, "media_placeholder_token_id": IMAGE}))
    result = import_hf(kimi_vl, tmp_path / "ours", progress=False)
    assert result.family == "kimi_vl" and result.model.llm.q_lora_rank is None
    ours = load_converted(result.checkpoint)
    pixels, grid = random_media([[1, 4, 4], [1, 2, 6]], seed=5)
    ids, positions = _sequence([(IMAGE, 4), (IMAGE, 3)], 48, seed=6)
    text_ids, _ = _sequence([], 48, seed=7)
    with torch.no_grad():
        _check(_ours(ours, text_ids), hf(input_ids=text_ids).logits)
        theirs = hf(input_ids=ids, pixel_values=pixels, image_grid_thw=grid).logits
    _check(_ours(ours, ids, pixels, grid, positions), theirs)


# --- export ---------------------------------------------------------------------------------------


def test_release_layout_round_trip_is_bit_identical(k25, tmp_path):
    from megatron_vlm.convert import export_hf, import_hf

    _, tmp, _ = k25
    release = rekey_to_release(read_safetensors_dir(tmp / "saved"))
    src = tmp_path / "release"
    src.mkdir()
    names = sorted(release)  # two shards, as a multi-file release would be
    save_file({k: release[k] for k in names[::2]}, str(src / "model-00001-of-00002.safetensors"))
    save_file({k: release[k] for k in names[1::2]}, str(src / "model-00002-of-00002.safetensors"))
    (src / "config.json").write_text((tmp / "saved" / "config.json").read_text())
    result = import_hf(src, tmp_path / "ours", progress=False)
    out = tmp_path / "hf"
    export_hf(result.checkpoint, out, dtype="fp32", max_shard_bytes=1 << 16, progress=False)
    exported = read_safetensors_dir(out)
    assert len(list(out.glob("model-*-of-*.safetensors"))) > 1
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(exported) == set(release)
    for k, v in release.items():
        assert exported[k].dtype == v.dtype and exported[k].shape == v.shape, k
        assert torch.equal(exported[k], v), k


@pytest.mark.parametrize("layout", ["save_pretrained", "in_memory"])
def test_export_loads_in_transformers_with_our_next_tokens(k25, ours_k25, tmp_path, layout):
    from megatron_vlm.convert import export_hf, import_hf

    hf, tmp, result = k25
    if layout == "in_memory":  # raw module names: fused experts, rotate-half q/k, separate qkv
        src = tmp_path / "raw"
        src.mkdir()
        save_file({k: v.contiguous() for k, v in hf.state_dict().items()},
                  str(src / "model.safetensors"))
        (src / "config.json").write_text((tmp / "saved" / "config.json").read_text())
        result = import_hf(src, tmp_path / "ours", progress=False)
    out = tmp_path / "hf"
    export_hf(result.checkpoint, out, dtype="fp32", progress=False)
    reloaded, info = Kimi_K25ForConditionalGeneration.from_pretrained(
        out, output_loading_info=True)
    assert all(not v for v in info.values()), info
    reloaded.eval()
    original, loaded = hf.state_dict(), reloaded.state_dict()
    assert original.keys() == loaded.keys()
    for k, v in original.items():
        assert loaded[k].dtype == v.dtype and torch.equal(loaded[k], v), k
    pixels, grid = random_media([[1, 4, 6]], seed=7)
    ids, positions = _sequence([(IMAGE, 6)], 24, seed=8)
    with torch.no_grad():
        theirs = reloaded(input_ids=ids, pixel_values=pixels, image_grid_thw=grid).logits
    mine = _ours(ours_k25, ids, pixels, grid, positions)
    torch.testing.assert_close(theirs, mine, atol=ATOL, rtol=0)
    assert torch.equal(theirs.argmax(-1), mine.argmax(-1))


def test_bf16_export_keeps_the_router_bias_fp32(k25, tmp_path):
    from megatron_vlm.convert import export_hf

    hf, tmp, result = k25
    export_hf(result.checkpoint, tmp_path / "hf", dtype="bf16", progress=False)
    exported = read_safetensors_dir(tmp_path / "hf")
    release = rekey_to_release(read_safetensors_dir(tmp / "saved"))
    for k, v in release.items():
        want = v if k.endswith("e_score_correction_bias") else v.to(torch.bfloat16)
        assert exported[k].dtype == want.dtype and torch.equal(exported[k], want), k
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["dtype"] == "bfloat16"
    assert "quantization_config" not in json.loads((tmp_path / "hf" / "config.json").read_text())


# --- INT4 routed experts ------------------------------------------------------------------------


def _quantize_int4(w: torch.Tensor) -> dict[str, torch.Tensor]:
    """compressed-tensors pack-quantized, symmetric int4, group 32 (written out here)."""
    rows, cols = w.shape
    groups = w.view(rows, cols // 32, 32)
    scale = (groups.abs().amax(-1) / 7).to(torch.bfloat16)
    q = torch.clamp(torch.round(groups / scale.float().unsqueeze(-1)), -8, 7).view(rows, cols)
    u = (q.to(torch.int64) + 8).view(rows, cols // 8, 8)
    words = (u << (4 * torch.arange(8))).sum(-1)
    packed = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    return {"weight_packed": packed, "weight_scale": scale,
            "weight_shape": torch.tensor([rows, cols], dtype=torch.int64)}


def _dequantize_reference(t: dict[str, torch.Tensor]) -> torch.Tensor:
    """The compressed-tensors unpack rule, per element: nibble c % 8 of word c // 8, minus 8,
    times the group scale."""
    packed, scale = t["weight_packed"].to(torch.int64) & 0xFFFFFFFF, t["weight_scale"].float()
    rows, cols = t["weight_shape"].tolist()
    c = torch.arange(cols)
    q = (packed[:, c // 8] >> (4 * (c % 8))) & 0xF
    return (q - 8).float() * scale[:, c // 32]


def test_int4_experts_dequantised_on_import(k25, tmp_path):
    from megatron_vlm.convert import import_hf

    _, tmp, _ = k25
    release = rekey_to_release(read_safetensors_dir(tmp / "saved"))
    files, expected = {}, {}
    for k, v in release.items():
        if ".mlp.experts." in k and k.endswith("_proj.weight"):
            packed = _quantize_int4(v)
            expected[k] = _dequantize_reference(packed)
            files.update({k[: -len("weight")] + n: p for n, p in packed.items()})
        else:
            files[k] = v
    assert len(expected) == 3 * TEXT["n_routed_experts"]
    src = tmp_path / "int4"
    src.mkdir()
    save_file(files, str(src / "model.safetensors"))
    (src / "config.json").write_text((tmp / "saved" / "config.json").read_text())
    ours = load_converted(import_hf(src, tmp_path / "ours", progress=False).checkpoint)
    experts = ours.language_model.decoder.layers[1].mlp.experts.local_experts
    pre = "language_model.model.layers.1.mlp.experts"
    for e, expert in enumerate(experts):
        fc1 = torch.cat([expected[f"{pre}.{e}.gate_proj.weight"],
                         expected[f"{pre}.{e}.up_proj.weight"]])
        assert torch.equal(expert.linear_fc1.weight, fc1)
        assert torch.equal(expert.linear_fc2.weight, expected[f"{pre}.{e}.down_proj.weight"])
    # Quantisation really happened (the weights moved), within half a step of each group.
    w = release[f"{pre}.0.gate_proj.weight"]
    assert not torch.equal(expected[f"{pre}.0.gate_proj.weight"], w)
