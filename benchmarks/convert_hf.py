"""Benchmark: HF <-> megatron_vlm checkpoint conversion of a synthetic multi-GB checkpoint.

A DeepSeek-V3-shaped text model (Moonlight widths: hidden 2048, MLA 512 kv-latent, 16 experts of
1408) with as many layers as ``--size-gb`` asks is written as bf16 safetensors shards, then

1. ``import``: HF -> our megatron checkpoint with bf16 parameters (``convert.import_hf``), in
   its own process;
2. ``export``: ours -> HF release names, bf16 (``convert.export_hf``: tensors read in groups of
   256 MiB, shards of ``--shard-gb``), in its own process;
3. the export is compared with the input tensor by tensor (bit-exact round trip);
4. ``export_int4``: the same export with ``int4_experts=True`` (routed experts as compressed-tensors
   INT4, as the K2.5 release ships them), in its own process: time, memory, and its size against
   the bf16 export (``int4_size``); its bf16 tensors are compared with the input too.

Each conversion reports wall time, GB/s (checkpoint bytes / seconds) and host memory: the peak
RSS of its process (sampled every 5 ms, and the kernel's high-water mark) minus the RSS after
imports, against the checkpoint size, the largest shard and the largest layer -- the streaming
claim is that the conversion needs about one shard plus one layer, not the checkpoint.

    python -m benchmarks.convert_hf --size-gb 3        # writes benchmarks/results/convert_hf_*.json
    python -m benchmarks.convert_hf --smoke            # a few MB, in-process, seconds
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS_DIR, write_result

FULL = {"hidden_size": 2048, "num_attention_heads": 16, "q_lora_rank": 768, "kv_lora_rank": 512,
        "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
        "intermediate_size": 8192, "n_routed_experts": 16, "moe_intermediate_size": 1408,
        "num_experts_per_tok": 4, "n_shared_experts": 1, "vocab_size": 32768}
SMOKE = {"hidden_size": 128, "num_attention_heads": 4, "q_lora_rank": 64, "kv_lora_rank": 32,
         "qk_nope_head_dim": 16, "qk_rope_head_dim": 16, "v_head_dim": 16,
         "intermediate_size": 256, "n_routed_experts": 4, "moe_intermediate_size": 64,
         "num_experts_per_tok": 2, "n_shared_experts": 1, "vocab_size": 1024}


def hf_tensors(cfg: dict[str, Any]) -> list[tuple[str, tuple[int, ...], str]]:
    """(name, shape, dtype) of every tensor of the release layout, layer by layer."""
    h, heads = cfg["hidden_size"], cfg["num_attention_heads"]
    nope, rope, v = cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["v_head_dim"]
    ql, kvl = cfg["q_lora_rank"], cfg["kv_lora_rank"]
    out = [("model.embed_tokens.weight", (cfg["vocab_size"], h), "bf16")]
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        out += [(p + "input_layernorm.weight", (h,), "bf16"),
                (p + "post_attention_layernorm.weight", (h,), "bf16"),
                (p + "self_attn.q_a_proj.weight", (ql, h), "bf16"),
                (p + "self_attn.q_a_layernorm.weight", (ql,), "bf16"),
                (p + "self_attn.q_b_proj.weight", (heads * (nope + rope), ql), "bf16"),
                (p + "self_attn.kv_a_proj_with_mqa.weight", (kvl + rope, h), "bf16"),
                (p + "self_attn.kv_a_layernorm.weight", (kvl,), "bf16"),
                (p + "self_attn.kv_b_proj.weight", (heads * (nope + v), kvl), "bf16"),
                (p + "self_attn.o_proj.weight", (h, heads * v), "bf16")]
        if i < cfg["first_k_dense_replace"]:
            f = cfg["intermediate_size"]
            out += [(p + f"mlp.{n}_proj.weight", s, "bf16")
                    for n, s in (("gate", (f, h)), ("up", (f, h)), ("down", (h, f)))]
            continue
        f, e = cfg["moe_intermediate_size"], cfg["n_routed_experts"]
        out += [(p + "mlp.gate.weight", (e, h), "bf16"),
                (p + "mlp.gate.e_score_correction_bias", (e,), "fp32")]
        for x in [f"experts.{j}." for j in range(e)] + ["shared_experts."]:
            fx = f * cfg["n_shared_experts"] if x == "shared_experts." else f
            out += [(p + f"mlp.{x}{n}_proj.weight", s, "bf16")
                    for n, s in (("gate", (fx, h)), ("up", (fx, h)), ("down", (h, fx)))]
    out += [("model.norm.weight", (h,), "bf16"), ("lm_head.weight", (cfg["vocab_size"], h), "bf16")]
    return out


def _nbytes(shape, dtype) -> int:
    n = 1
    for s in shape:
        n *= s
    return n * (4 if dtype == "fp32" else 2)


def synthetic_config(size_gb: float, smoke: bool) -> dict[str, Any]:
    """A DeepseekV3ForCausalLM config.json whose bf16 weights take about ``size_gb`` GB."""
    base = dict(SMOKE if smoke else FULL)
    base.update(architectures=["DeepseekV3ForCausalLM"], model_type="deepseek_v3",
                first_k_dense_replace=1, n_group=1, topk_group=1, num_key_value_heads=0,
                max_position_embeddings=4096, rms_norm_eps=1e-6, tie_word_embeddings=False,
                routed_scaling_factor=2.446, num_nextn_predict_layers=0,
                rope_parameters={"rope_type": "default", "rope_theta": 50000.0})
    base["num_key_value_heads"] = base["num_attention_heads"]

    def total(layers: int) -> int:
        return sum(_nbytes(s, d) for _, s, d in hf_tensors(dict(base, num_hidden_layers=layers)))

    per_layer = total(3) - total(2)
    base["num_hidden_layers"] = max(2, 2 + round((size_gb * 1e9 - total(2)) / per_layer))
    return base


def generate(hf_dir: Path, cfg: dict[str, Any], shard_bytes: int, seed: int = 0) -> dict:
    """Random bf16 weights (fp32 router bias) written shard by shard; returns sizes."""
    import torch

    from megatron_vlm.convert.hf_io import ShardedSafetensorsWriter

    hf_dir.mkdir(parents=True)
    gen = torch.Generator().manual_seed(seed)
    writer = ShardedSafetensorsWriter(hf_dir, shard_bytes)
    layer_bytes: dict[str, int] = {}
    for name, shape, dtype in hf_tensors(cfg):
        t = torch.randn(shape, generator=gen).mul_(0.02)
        writer.add(name, t if dtype == "fp32" else t.to(torch.bfloat16))
        layer = ".".join(name.split(".")[:3]) if ".layers." in name else name
        layer_bytes[layer] = layer_bytes.get(layer, 0) + _nbytes(shape, dtype)
    writer.close()
    (hf_dir / "config.json").write_text(json.dumps(cfg, indent=2))
    shards = [p.stat().st_size for p in hf_dir.glob("*.safetensors")]
    return {"checkpoint_bytes": sum(shards), "num_shards": len(shards),
            "largest_shard_bytes": max(shards), "largest_layer_bytes": max(layer_bytes.values()),
            "num_layers": cfg["num_hidden_layers"]}


# --- one conversion, measured -----------------------------------------------------------------


def _rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


class PeakRss:
    """Samples this process's RSS every 5 ms while active."""

    def __enter__(self) -> PeakRss:
        self.peak, self._stop = _rss_bytes(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, _rss_bytes())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_bytes())


def run_phase(phase: str, src: Path, dst: Path, shard_bytes: int) -> dict[str, Any]:
    """``import`` (HF ``src`` -> our root ``dst``) or ``export`` / ``export_int4`` (ours -> HF
    ``dst``)."""
    from megatron_vlm.convert import export_hf, import_hf
    from megatron_vlm.convert.mcore import ensure_single_process_groups

    ensure_single_process_groups()  # process groups and imports before the baseline
    baseline = _rss_bytes()
    t0 = time.perf_counter()
    with PeakRss() as rss:
        if phase == "import":
            import_hf(src, dst, params_dtype="bf16", progress=True)
        else:
            export_hf(src, dst, dtype="bf16", max_shard_bytes=shard_bytes, progress=True,
                      int4_experts=phase == "export_int4")
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "baseline_rss_bytes": baseline, "peak_rss_bytes": rss.peak,
            "max_rss_bytes_kernel": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def _child(phase: str, src: Path, dst: Path, shard_bytes: int) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "benchmarks.convert_hf", "--phase", phase, "--src", str(src),
           "--dst", str(dst), "--shard-bytes", str(shard_bytes)]
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
               TORCH_COMPILE_DISABLE="1")
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True, check=True,
                          cwd=Path(__file__).resolve().parents[1])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def verify(a: Path, b: Path) -> dict[str, Any]:
    """Tensor-by-tensor comparison of two HF checkpoint directories (streaming)."""
    import torch

    from megatron_vlm.convert.hf_io import SafetensorsDir

    x, y = SafetensorsDir(a), SafetensorsDir(b)
    if set(x.keys()) != set(y.keys()):
        return {"bit_exact": False, "reason": "different tensor names"}
    for k in x.keys():
        s, t = x.read(k), y.read(k)
        if s.dtype != t.dtype or s.shape != t.shape or not torch.equal(s, t):
            return {"bit_exact": False, "reason": f"{k} differs"}
    return {"bit_exact": True, "num_tensors": len(x.keys())}


def int4_size(hf: Path, bf16: Path, int4: Path) -> dict[str, Any]:
    """Bytes of the INT4 export against the bf16 one; its non-INT4 tensors equal the input's."""
    import torch

    from megatron_vlm.convert.hf_io import SafetensorsDir

    def nbytes(d: Path) -> int:
        return sum(p.stat().st_size for p in d.glob("*.safetensors"))

    x, y = SafetensorsDir(hf), SafetensorsDir(int4)
    packed = [k for k in y.keys() if k.endswith(".weight_packed")]
    plain = [k for k in y.keys() if not k.endswith((".weight_packed", ".weight_scale",
                                                     ".weight_shape"))]
    same = all(torch.equal(x.read(k), y.read(k)) for k in plain) and set(plain) | {
        k.removesuffix("_packed") for k in packed} == set(x.keys())
    return {"bf16_bytes": nbytes(bf16), "int4_bytes": nbytes(int4),
            "bf16_over_int4": nbytes(bf16) / nbytes(int4), "num_int4_weights": len(packed),
            "other_tensors_bit_exact": same}


def _summary(phase: dict[str, Any], sizes: dict[str, Any]) -> dict[str, Any]:
    # The kernel's high-water mark also sees spikes between two samples (it covers the imports
    # before the baseline too, which stay below it): the larger of the two is the peak.
    used = max(phase["peak_rss_bytes"], phase["max_rss_bytes_kernel"]) - phase["baseline_rss_bytes"]
    return {**phase, "gb_per_s": sizes["checkpoint_bytes"] / 1e9 / phase["seconds"],
            "conversion_rss_bytes": used,
            "conversion_rss_over_checkpoint": used / sizes["checkpoint_bytes"],
            "conversion_rss_over_shard_plus_layer": used / (
                sizes["largest_shard_bytes"] + sizes["largest_layer_bytes"])}


def main(argv: list[str] | None = None) -> Path | None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="a few MB, in-process (seconds)")
    p.add_argument("--out-dir", default=None, help=f"result directory (default {RESULTS_DIR})")
    p.add_argument("--size-gb", type=float, default=3.0, help="synthetic checkpoint size")
    p.add_argument("--shard-gb", type=float, default=0.5, help="HF shard size (input, output)")
    p.add_argument("--work-dir", default=None, help="scratch directory (default: a temp dir)")
    p.add_argument("--phase", choices=["import", "export", "export_int4"], help=argparse.SUPPRESS)
    p.add_argument("--src", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--dst", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--shard-bytes", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.phase:  # child process: one measured conversion, JSON on the last stdout line
        print(json.dumps(run_phase(args.phase, args.src, args.dst, args.shard_bytes)))
        return None

    size_gb = 0.004 if args.smoke else args.size_gb
    shard_bytes = int((0.001 if args.smoke else args.shard_gb) * 1e9)
    work = Path(tempfile.mkdtemp(prefix="convert_hf_", dir=args.work_dir))
    try:
        cfg = synthetic_config(size_gb, args.smoke)
        print(f"generating {size_gb} GB ({cfg['num_hidden_layers']} layers) in {work}")
        sizes = generate(work / "hf", cfg, shard_bytes)
        phases = {}
        for phase, src, dst in (("import", work / "hf", work / "ours"),
                                ("export", work / "ours", work / "exported"),
                                ("export_int4", work / "ours", work / "int4")):
            print(f"{phase} ...")
            measured = (run_phase(phase, src, dst, shard_bytes) if args.smoke
                        else _child(phase, src, dst, shard_bytes))
            phases[phase] = _summary(measured, sizes)
        round_trip = verify(work / "hf", work / "exported")
        int4 = int4_size(work / "hf", work / "exported", work / "int4")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    config = {"size_gb_requested": size_gb, "shard_bytes": shard_bytes, "model": cfg,
              "isolation": "in-process" if args.smoke else "one process per conversion",
              "load_average_at_end": os.getloadavg()}
    notes = ("RSS: conversion_rss = max(RSS sampled every 5 ms, kernel high-water mark) - RSS "
             "after imports. GB/s = "
             "checkpoint bytes / wall seconds (import includes fsync and sha256 of the output for "
             "the manifest). Round trip: export compared with the input tensor by tensor.")
    return write_result("convert_hf", config, {**sizes, **phases, "round_trip": round_trip,
                                               "int4_size": int4},
                        out_dir=args.out_dir, smoke=args.smoke, notes=notes)


if __name__ == "__main__":
    main()
