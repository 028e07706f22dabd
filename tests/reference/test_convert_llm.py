"""HF ``DeepseekV3ForCausalLM`` -> import -> our GPTModel: logits equal transformers 5.23's; and
our checkpoint -> export -> transformers loads it with no missing/unexpected keys and computes the
same logits (so the same next tokens) as our model.

Tiny fp32 configs, every weight and the router's correction bias perturbed away from init:
* ``q_lora_groups_yarn_af``: q_lora, two dense-first layers then MoE with router groups
  (8 experts, top-4, 4 groups, top-2 groups), YaRN factor 4 with mscale 0.707,
  mscale_all_dim 0 and an explicit ``attention_factor`` = mscale(4, 0.707) (the formula's
  value, which our export must write back for HF to reproduce it);
* ``q_proj_halves_yarn_m0``: q_proj (no q_lora), ``rope_interleave=False`` (rope rows permuted
  on import), one dense layer, 2 shared experts, YaRN mscale 0.707 / mscale_all_dim 0 without
  ``attention_factor`` (HF then drops both mscales: import reproduces that).

Tolerance: ``ATOL`` 1e-5 absolute on logits of size ~3 (measured 8e-7: fp32 summation order; 80
tokens, past YaRN's original 32).
"""

from __future__ import annotations

import json
import math

import pytest
import torch

pytest.importorskip("transformers")
from hf_fixtures import load_converted, perturb_all
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

ATOL = 1e-5
SEQ = 80

BASE = dict(vocab_size=96, hidden_size=48, intermediate_size=64, moe_intermediate_size=16,
            num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=16, qk_nope_head_dim=8,
            qk_rope_head_dim=8, v_head_dim=8, max_position_embeddings=128,
            tie_word_embeddings=False, rms_norm_eps=1e-6, routed_scaling_factor=2.5,
            num_nextn_predict_layers=0)
CASES = {
    "q_lora_groups_yarn_af": dict(
        BASE, num_hidden_layers=3, first_k_dense_replace=2, q_lora_rank=16, n_routed_experts=8,
        num_experts_per_tok=4, n_group=4, topk_group=2, n_shared_experts=1,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                         "original_max_position_embeddings": 32, "beta_fast": 32.0,
                         "beta_slow": 1.0, "mscale": 0.707, "mscale_all_dim": 0.0,
                         "attention_factor": 0.1 * 0.707 * math.log(4.0) + 1.0}),
    "q_proj_halves_yarn_m0": dict(
        BASE, num_hidden_layers=3, first_k_dense_replace=1, q_lora_rank=None,
        n_routed_experts=4, num_experts_per_tok=2, n_group=1, topk_group=1,
        n_shared_experts=2, rope_interleave=False,
        rope_parameters={"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                         "original_max_position_embeddings": 32, "mscale": 0.707,
                         "mscale_all_dim": 0.0}),
}


@pytest.fixture(scope="module", params=list(CASES))
def case(request, megatron_groups, tmp_path_factory):
    """(HF model, its save_pretrained dir, our imported checkpoint root)."""
    from megatron_vlm.convert import import_hf

    torch.manual_seed(0)
    cfg = DeepseekV3Config(**CASES[request.param])
    cfg._attn_implementation = "eager"
    hf = DeepseekV3ForCausalLM(cfg).eval()
    perturb_all(hf, seed=3)
    tmp = tmp_path_factory.mktemp(request.param)
    hf.save_pretrained(tmp / "hf")
    result = import_hf(tmp / "hf", tmp / "ours", progress=False)
    assert result.family == "deepseek_v3" and result.skipped == {}
    return hf, tmp, result


def _ids(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (2, SEQ), generator=torch.Generator().manual_seed(5))


def test_imported_logits_equal_transformers(case):
    hf, _, result = case
    ours = load_converted(result.checkpoint)
    ids = _ids(hf.config.vocab_size)
    with torch.no_grad():
        expected = hf(input_ids=ids).logits
        got = ours(ids, None, None)[..., : hf.config.vocab_size]
    assert got.shape == expected.shape == (2, SEQ, hf.config.vocab_size)
    torch.testing.assert_close(got, expected, atol=ATOL, rtol=0)
    assert expected.abs().max() > 1.0  # the tolerance is small against the output


def test_mapping_errors_would_show(case):
    """Control: swapping two experts' weights in our model moves the logits far past ATOL."""
    hf, _, result = case
    ours = load_converted(result.checkpoint)
    layer = ours.decoder.layers[-1].mlp.experts.local_experts
    with torch.no_grad():
        w0 = layer[0].linear_fc1.weight.clone()
        layer[0].linear_fc1.weight.copy_(layer[1].linear_fc1.weight)
        layer[1].linear_fc1.weight.copy_(w0)
        ids = _ids(hf.config.vocab_size)
        diff = (ours(ids, None, None)[..., : hf.config.vocab_size] - hf(input_ids=ids).logits)
    assert diff.abs().max() > 100 * ATOL


def _halves_to_interleaved(key: str, w: torch.Tensor, cfg) -> torch.Tensor:
    d, nope = cfg.qk_rope_head_dim, cfg.qk_nope_head_dim
    order = torch.stack([torch.arange(d // 2), torch.arange(d // 2) + d // 2], dim=1).flatten()
    if key.endswith("kv_a_proj_with_mqa.weight"):
        return torch.cat([w[: cfg.kv_lora_rank], w[cfg.kv_lora_rank:][order]])
    heads = w.view(cfg.num_attention_heads, nope + d, -1)
    return torch.cat([heads[:, :nope], heads[:, nope:][:, order]], dim=1).reshape(w.shape)


def test_export_loads_in_transformers_with_same_next_tokens(case):
    from megatron_vlm.convert import export_hf

    hf, tmp, result = case
    out = tmp / "exported"
    export_hf(result.checkpoint, out, dtype="fp32", progress=False)
    config = json.loads((out / "config.json").read_text())
    reloaded, info = DeepseekV3ForCausalLM.from_pretrained(out, output_loading_info=True)
    assert all(not v for v in info.values()), info
    reloaded.eval()
    ours = load_converted(result.checkpoint)
    ids = _ids(hf.config.vocab_size)
    with torch.no_grad():
        mine = ours(ids, None, None)[..., : hf.config.vocab_size]
        theirs = reloaded(input_ids=ids).logits
    torch.testing.assert_close(theirs, mine, atol=ATOL, rtol=0)
    assert torch.equal(theirs.argmax(-1), mine.argmax(-1))
    # Same tensors as the original model (every name, shape, dtype and value); the export is
    # always rope_interleave=True, so a rope_interleave=False original differs by the rope-row
    # permutation (HF-halves row j = interleaved row 2j, row d/2 + j = interleaved row 2j + 1).
    original, exported = hf.state_dict(), reloaded.state_dict()
    assert original.keys() == exported.keys()
    assert config["rope_interleave"] is True
    halves = not hf.config.rope_interleave
    for k, v in original.items():
        assert v.dtype == exported[k].dtype, k
        if halves and k.endswith(("q_proj.weight", "q_b_proj.weight", "kv_a_proj_with_mqa.weight")):
            v = _halves_to_interleaved(k, v, hf.config)
        assert torch.equal(v, exported[k]), k
    # ...and the YaRN settings written so that HF computes what we compute.
    rope = config["rope_parameters"]
    af = hf.config.rope_parameters.get("attention_factor")
    if af is None:  # HF ignored mscale 0.707 (mscale_all_dim 0): ours imported as mscale 1
        assert rope["mscale"] == pytest.approx(1.0) and "attention_factor" not in rope
    else:
        assert rope["attention_factor"] == pytest.approx(af, rel=1e-12)
