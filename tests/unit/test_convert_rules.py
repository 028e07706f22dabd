"""The conversion tables and transforms on their own: every tensor of our models has exactly one
rule and the HF names form a bijection; local -> Transformer Engine -> local names are exact on a
real state dict; every transform round-trips bit for bit; the INT4 rule equals compressed-tensors'
``pack-quantized`` format written out independently below; streaming safetensors I/O."""

from __future__ import annotations

import json
import struct

import pytest
import torch

from megatron_vlm.config import LLMConfig, ModelConfig, ParallelConfig
from megatron_vlm.config.vision import ProjectorConfig, VisionConfig
from megatron_vlm.convert.rules import ConversionError, ConvertContext, Table

LLM = dict(vocab_size=200, hidden_size=32, num_layers=3, num_attention_heads=4, kv_lora_rank=16,
           qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, ffn_hidden_size=48,
           num_dense_layers=1, num_experts=4, moe_router_topk=2, num_shared_experts=1,
           moe_ffn_hidden_size=16, max_position_embeddings=64)


def _model(vlm: bool, q_lora: int | None) -> ModelConfig:
    llm = LLMConfig(**LLM, q_lora_rank=q_lora)
    if not vlm:
        return ModelConfig(llm=llm)
    vision = VisionConfig(hidden_size=16, num_layers=2, num_attention_heads=2, ffn_hidden_size=32,
                          pos_emb_height=4, pos_emb_width=4)
    return ModelConfig(llm=llm, vision=vision, projector=ProjectorConfig(
        vision_hidden_size=16, merge_size=4, output_size=32))


@pytest.fixture(scope="module")
def groups():
    from megatron_vlm.convert.mcore import ensure_single_process_groups

    ensure_single_process_groups()


def _table(model: ModelConfig, family: str, interleave: bool = True) -> Table:
    from megatron_vlm.convert.importer import context_for, table_for
    from megatron_vlm.convert.tables import FAMILIES

    return table_for(FAMILIES[family], model, context_for(model, interleave))


def _slots(model: ModelConfig) -> dict:
    from megatron_vlm.convert.mcore import SHARDED_METADATA, build_meta_model, tensor_slots

    meta = build_meta_model(model)
    return tensor_slots(meta.sharded_state_dict(metadata=dict(SHARDED_METADATA)))


@pytest.mark.parametrize("family,vlm,q_lora", [
    ("kimi_k25", True, 16), ("kimi_vl", True, None), ("deepseek_v3", False, 16),
    ("deepseek_v3", False, None)])
def test_every_tensor_has_one_rule_and_hf_names_are_a_bijection(groups, family, vlm, q_lora):
    model = _model(vlm, q_lora)
    table = _table(model, family)
    slots = _slots(model)
    hf_names = []
    for name in slots:
        rule, binding = table.lookup(name)  # exactly one rule, else ConversionError
        hf_names += rule.hf_names(binding)
        te = table.to_te_name(name)
        assert table.to_local_name(te) == name
    assert len(hf_names) == len(set(hf_names))
    # Every rule is used (no stale entries) for this kind of model.
    used = {id(table.lookup(n)[0]) for n in slots}
    assert used == {id(r) for r in table.rules}


def test_local_to_te_to_local_is_bit_exact(groups):
    """A real (random) model's state dict, renamed to megatron's Transformer Engine spec names
    and back: same names, same bits. TE fuses q/kv norms into the up-projections, the dense
    layer's pre-MLP norm into linear_fc1; MoE layers keep theirs (gpt_layer_specs.py:233-265)."""
    from megatron_vlm.models.vlm import KimiVLM

    model = _model(vlm=True, q_lora=16)
    torch.manual_seed(0)
    state = {k: v for k, v in KimiVLM(model, ParallelConfig()).state_dict().items()
             if torch.is_tensor(v) and "_extra_state" not in k
             and not k.endswith("local_tokens_per_expert")}
    table = _table(model, "kimi_k25")
    te = {table.to_te_name(k): v for k, v in state.items()}
    assert len(te) == len(state)
    for name in [
        "language_model.decoder.layers.0.self_attention.linear_q_up_proj.layer_norm_weight",
        "language_model.decoder.layers.0.self_attention.linear_kv_up_proj.layer_norm_weight",
        "language_model.decoder.layers.0.mlp.linear_fc1.layer_norm_weight",
        "language_model.decoder.layers.1.pre_mlp_layernorm.weight",
        "vision_tower.encoder.layers.1.self_attention.linear_qkv.layer_norm_bias",
        "vision_tower.encoder.layers.1.mlp.linear_fc1.layer_norm_weight",
    ]:
        assert name in te, name
    back = {table.to_local_name(k): v for k, v in te.items()}
    assert back.keys() == state.keys()
    assert all(torch.equal(back[k], v) for k, v in state.items())


@pytest.mark.te
def test_te_spec_model_loads_the_te_names(groups):
    """Where Transformer Engine imports (NGC container, GPU): megatron's TE-spec GPTModel loads a
    local-spec state dict renamed through the table, strictly, and computes the same logits."""
    pytest.importorskip("transformer_engine")
    if not torch.cuda.is_available():
        pytest.skip("Transformer Engine layers need CUDA")
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_decoder_block_spec

    from megatron_vlm.models.llm import build_llm, build_transformer_config, padded_vocab_size

    model = _model(vlm=False, q_lora=16)
    torch.manual_seed(0)
    local = build_llm(model.llm, ParallelConfig()).cuda().eval()
    config = build_transformer_config(model.llm, ParallelConfig())
    te_model = GPTModel(config=config, transformer_layer_spec=get_gpt_decoder_block_spec(
        config, use_transformer_engine=True, normalization="RMSNorm"),
        vocab_size=padded_vocab_size(model.llm.vocab_size, 1),
        max_sequence_length=model.llm.max_position_embeddings, position_embedding_type="none",
        share_embeddings_and_output_weights=False).cuda().eval()
    table = _table(model, "deepseek_v3")
    state = {table.to_te_name(k): v for k, v in local.state_dict().items()
             if torch.is_tensor(v) and "_extra_state" not in k
             and not k.endswith("local_tokens_per_expert")}
    missing, unexpected = te_model.load_state_dict(state, strict=False)
    assert not unexpected and all("_extra_state" in k for k in missing), (missing, unexpected)
    ids = torch.randint(0, model.llm.vocab_size, (1, 16), device="cuda")
    with torch.no_grad():
        torch.testing.assert_close(te_model(ids, None, None), local(ids, None, None),
                                   atol=1e-4, rtol=1e-4)


# --- transforms ---------------------------------------------------------------------------------


def _ctx(interleave: bool) -> ConvertContext:
    return ConvertContext(num_heads=4, qk_nope_head_dim=8, qk_rope_head_dim=8, kv_lora_rank=16,
                          vocab_size=200, padded_vocab_size=256, rope_interleave=interleave,
                          num_dense_layers=1, vision_num_heads=2, vision_pos_emb_shape=(3, 3, 16))


CASES = {
    "fuse_gate_up": [(48, 32), (48, 32)], "pad_vocab": [(200, 32)],
    "mla_q_rope_rows": [(4 * 16, 16)], "mla_kv_a_rope_rows": [(16 + 8, 32)],
    "vit_wqkv": [(48, 16)], "vit_q_k_v": [(16, 16), (16, 16), (16, 16)],
    "flat_pos_table": [(9, 16)],
}


@pytest.mark.parametrize("interleave", [True, False])
@pytest.mark.parametrize("name", list(CASES))
def test_transforms_round_trip_bit_exact(name, interleave):
    from megatron_vlm.convert import transforms

    transform = next(t for t in vars(transforms).values()
                     if isinstance(t, transforms.Transform) and t.name == name)
    gen = torch.Generator().manual_seed(1)
    hf = [torch.randn(s, generator=gen) for s in CASES[name]]
    ours = transform.to_ours(hf, _ctx(interleave))
    back = transform.to_hf(ours, _ctx(interleave))
    assert len(back) == len(hf) and all(torch.equal(a, b) for a, b in zip(back, hf))


def test_rope_rows_permute_only_with_halves_layout():
    """``rope_interleave=False``: HF row j of each head's rope part is our row 2j and HF row
    d/2 + j our row 2j + 1 (the layout test_yarn_hf checks against transformers)."""
    from megatron_vlm.convert.transforms import ROPE_KV_A_ROWS, ROPE_Q_ROWS

    w = torch.arange(4 * 16 * 2, dtype=torch.float32).reshape(64, 2)
    assert torch.equal(ROPE_Q_ROWS.to_ours([w], _ctx(True)), w)
    ours = ROPE_Q_ROWS.to_ours([w], _ctx(False)).view(4, 16, 2)
    hf = w.view(4, 16, 2)
    assert torch.equal(ours[:, :8], hf[:, :8])  # nope rows untouched
    for j in range(4):
        assert torch.equal(ours[:, 8 + 2 * j], hf[:, 8 + j])
        assert torch.equal(ours[:, 8 + 2 * j + 1], hf[:, 8 + 4 + j])
    kv = torch.arange(24 * 2, dtype=torch.float32).reshape(24, 2)
    kv_ours = ROPE_KV_A_ROWS.to_ours([kv], _ctx(False))
    assert torch.equal(kv_ours[:16], kv[:16])
    assert torch.equal(kv_ours[16 + 2], kv[16 + 1]) and torch.equal(kv_ours[16 + 1], kv[16 + 4])


def test_pad_vocab_refuses_another_vocab_size():
    from megatron_vlm.convert.transforms import PAD_VOCAB

    with pytest.raises(ConversionError, match="vocab_size is 200"):
        PAD_VOCAB.to_ours([torch.zeros(199, 4)], _ctx(True))


def _reference_int4(packed, scale, shape) -> torch.Tensor:
    """compressed-tensors ``pack-quantized`` (``unpack_from_int32`` + group dequantisation),
    written out element by element: column c of row r is nibble c % 8 of word c // 8, minus 8,
    times the scale of group c // 32."""
    rows, cols = shape
    out = torch.empty(rows, cols, dtype=torch.float64)
    for r in range(rows):
        for c in range(cols):
            word = int(packed[r, c // 8]) & 0xFFFFFFFF
            q = ((word >> (4 * (c % 8))) & 0xF) - 8
            out[r, c] = q * float(scale[r, c // 32])
    return out


def test_int4_dequantisation_equals_the_compressed_tensors_rule():
    from megatron_vlm.convert.int4 import dequantize_int4

    gen = torch.Generator().manual_seed(2)
    rows, cols = 6, 64
    q = torch.randint(-8, 8, (rows, cols), generator=gen)
    # pack_to_int32: offset to unsigned, 8 nibbles per int32 word, low bits first
    u = (q + 8).to(torch.int64).view(rows, cols // 8, 8)
    words = (u << (4 * torch.arange(8))).sum(-1)
    packed = torch.where(words >= 2**31, words - 2**32, words).to(torch.int32)
    scale = (torch.rand(rows, cols // 32, generator=gen) * 0.01).to(torch.bfloat16)
    shape = torch.tensor([rows, cols])
    (ours,) = dequantize_int4([packed, scale, shape], ConvertContext())
    assert ours.dtype == torch.float32
    ref = _reference_int4(packed, scale, (rows, cols))
    assert torch.equal(ours.double(), ref)
    assert torch.equal(ours, q.float() * scale.float().repeat_interleave(32, dim=1))
    with pytest.raises(ConversionError, match="INT4 shapes disagree"):
        dequantize_int4([packed, scale[:, :1], shape], ConvertContext())


# --- streaming safetensors I/O ------------------------------------------------------------------


def test_writer_shards_and_reader_reads_back(tmp_path):
    from megatron_vlm.convert.hf_io import INDEX_NAME, SafetensorsDir, ShardedSafetensorsWriter

    gen = torch.Generator().manual_seed(3)
    tensors = {f"t{i}": torch.randn(64, 16, generator=gen).to(dt)
               for i, dt in enumerate([torch.float32, torch.bfloat16] * 3)}
    writer = ShardedSafetensorsWriter(tmp_path, max_shard_bytes=64 * 16 * (4 + 2))  # pairs
    for k, v in tensors.items():
        writer.add(k, v)
    weight_map = writer.close()
    files = sorted(p.name for p in tmp_path.glob("*.safetensors"))
    assert len(files) == 3 and files[0] == "model-00001-of-00003.safetensors"
    assert json.loads((tmp_path / INDEX_NAME).read_text())["weight_map"] == weight_map
    source = SafetensorsDir(tmp_path)
    assert sorted(source.keys()) == sorted(tensors)
    for k, v in tensors.items():
        assert source.spec(k).shape == tuple(v.shape) and source.spec(k).dtype == v.dtype
        assert torch.equal(source.read(k), v)


def test_truncated_shard_is_refused_naming_the_file(tmp_path):
    from safetensors.torch import save_file

    from megatron_vlm.convert.hf_io import SafetensorsDir

    path = tmp_path / "model.safetensors"
    save_file({"a": torch.zeros(100), "b": torch.ones(100)}, str(path))
    data = path.read_bytes()
    path.write_bytes(data[:-10])
    with pytest.raises(ConversionError, match=r"truncated shard .*model.safetensors.*'b'"):
        SafetensorsDir(tmp_path)
    (n,) = struct.unpack("<Q", data[:8])
    path.write_bytes(data[: 8 + n // 2])
    with pytest.raises(ConversionError, match="truncated shard"):
        SafetensorsDir(tmp_path)


def test_export_reads_a_checkpoint_saved_with_te_names(groups, tmp_path):
    """A checkpoint whose fused norms carry the Transformer Engine spec's names (written here from
    the same weights, sharded keys renamed through the table) exports to exactly the same HF
    tensors as the local-spec checkpoint."""
    import dataclasses

    from megatron.core.dist_checkpointing.mapping import ShardedTensor

    from megatron_vlm.convert import export_hf
    from megatron_vlm.convert.hf_io import SafetensorsDir
    from megatron_vlm.convert.importer import job_yaml
    from megatron_vlm.convert.mcore import SHARDED_METADATA, build_meta_model, write_checkpoint
    from megatron_vlm.models.vlm import KimiVLM

    model = _model(vlm=True, q_lora=16)
    torch.manual_seed(1)
    state = KimiVLM(model, ParallelConfig()).state_dict()
    table = _table(model, "kimi_k25")
    meta = build_meta_model(model)
    config_yaml = job_yaml(model, "te-names")

    def sharded():
        return meta.sharded_state_dict(metadata=dict(SHARDED_METADATA))

    write_checkpoint(tmp_path / "local", sharded(), lambda n: state[n], config_yaml, {})
    renamed = {}
    for name, value in sharded().items():
        te = table.to_te_name(name) if isinstance(value, ShardedTensor) else name
        if te != name:  # the sharded key changes in the same tail as the parameter name
            common = name[: len(next(p for p in [name[: i] for i in range(len(name), 0, -1)]
                                     if te.startswith(p) and p.endswith(".")))]
            tail = name[len(common):]
            value = dataclasses.replace(value, key=value.key[: -len(tail)] + te[len(common):])
        renamed[te] = value
    assert len(renamed) == len(sharded()) and renamed.keys() != sharded().keys()
    write_checkpoint(tmp_path / "te", renamed, lambda n: state[table.to_local_name(n)],
                     config_yaml, {})
    local = export_hf(tmp_path / "local", tmp_path / "hf_local", dtype="fp32", progress=False)
    te = export_hf(tmp_path / "te", tmp_path / "hf_te", dtype="fp32", progress=False)
    assert te.te_layout and not local.te_layout
    a, b = SafetensorsDir(tmp_path / "hf_local"), SafetensorsDir(tmp_path / "hf_te")
    assert sorted(a.keys()) == sorted(b.keys())
    assert all(torch.equal(a.read(k), b.read(k)) for k in a.keys())
