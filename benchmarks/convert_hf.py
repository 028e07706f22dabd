"""Benchmark: HF <-> megatron_vlm checkpoint conversion of a synthetic checkpoint, against a
safetensors read + write + fsync loop over the same shards, with 1 and N processes.

A DeepSeek-V3-shaped text model (Moonlight widths: hidden 2048, MLA 512 kv-latent, 16 experts of
1408) with as many layers as ``--size-gb`` asks is written as bf16 safetensors shards, then,
in ``--repeats`` interleaved rounds (one process per measurement; each times its work after its
imports, so process start-up is not counted):

1. ``loop``: the baseline -- every input shard ``safetensors.torch.load_file`` -> ``save_file``
   -> fsync (the same bytes read and written, no conversion);
2. ``import``: HF -> our megatron checkpoint, bf16 (``convert.import_hf``), one process;
3. ``import_N``: the same as ``--workers N`` runs it: N slice processes started together
   (``import_slice``), then the joining step (``finish_import``); time = slices + join;
4. ``export`` / ``export_N``: ours -> HF release names, bf16, one process / N slices + join;

then once: the export compared with the input tensor by tensor (bit-exact round trip), the N-process
export compared byte for byte with the one-process export, and ``export_int4`` (routed experts
as compressed-tensors INT4): time, memory, size against the bf16 export.

Reported: per phase the median seconds and GB/s (checkpoint bytes / seconds), the ratios of the
medians (``ours/loop``: >= 0.8 is the target; ``N/1``: >= 0.7 N) and host memory: peak RSS
(sampled every 5 ms) minus the RSS after imports, against the checkpoint and the largest tensor
plus the largest layer.

    python -m benchmarks.convert_hf --size-gb 0.6 --workers 2  # results/convert_hf_*.json
    python -m benchmarks.convert_hf --smoke                    # a few MB, in-process
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS_DIR, write_result

INDEX_NAME = "model.safetensors.index.json"

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
    largest = 0
    for name, shape, dtype in hf_tensors(cfg):
        largest = max(largest, _nbytes(shape, dtype))
        t = torch.randn(shape, generator=gen).mul_(0.02)
        writer.add(name, t if dtype == "fp32" else t.to(torch.bfloat16))
        layer = ".".join(name.split(".")[:3]) if ".layers." in name else name
        layer_bytes[layer] = layer_bytes.get(layer, 0) + _nbytes(shape, dtype)
    writer.close()
    (hf_dir / "config.json").write_text(json.dumps(cfg, indent=2))
    shards = [p.stat().st_size for p in hf_dir.glob("*.safetensors")]
    return {"checkpoint_bytes": sum(shards), "num_shards": len(shards),
            "largest_shard_bytes": max(shards), "largest_layer_bytes": max(layer_bytes.values()),
            "largest_tensor_bytes": largest,
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


def safetensors_loop(src: Path, dst: Path) -> None:
    """The baseline: each shard of ``src`` read with safetensors and written to ``dst``, fsynced."""
    from safetensors.torch import load_file, save_file

    dst.mkdir(parents=True)
    for path in sorted(src.glob("*.safetensors")):
        out = dst / path.name
        save_file(load_file(path), str(out), metadata={"format": "pt"})
        fd = os.open(out, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)


def _convert(phase: str, src: Path, dst: Path, shard_bytes: int, index: int, count: int) -> None:
    from megatron_vlm.convert import export_hf, import_hf
    from megatron_vlm.convert.exporter import export_slice, finish_export
    from megatron_vlm.convert.importer import finish_import, import_slice

    if phase == "loop":
        safetensors_loop(src, dst)
    elif phase == "import":
        import_hf(src, dst, params_dtype="bf16", progress=False)
    elif phase == "import_slice":
        import_slice(src, dst, index, count, params_dtype="bf16")
    elif phase == "import_finish":
        finish_import(src, dst, count, params_dtype="bf16")
    elif phase == "export_slice":
        export_slice(src, dst, index, count, dtype="bf16", max_shard_bytes=shard_bytes)
    elif phase == "export_finish":
        finish_export(src, dst, count, dtype="bf16", max_shard_bytes=shard_bytes)
    else:
        export_hf(src, dst, dtype="bf16", max_shard_bytes=shard_bytes, progress=False,
                  int4_experts=phase == "export_int4")


def _cpu_seconds() -> float:
    """User + system CPU time of this process (all its threads)."""
    u = resource.getrusage(resource.RUSAGE_SELF)
    return u.ru_utime + u.ru_stime


def run_phase(phase: str, src: Path, dst: Path, shard_bytes: int, index: int = 0,
              count: int = 1, wait: bool = False) -> dict[str, Any]:
    """One measured conversion (``_convert``), timed after the imports (and, with ``wait``,
    after a ``go`` line on stdin: the parent starts the slices of one run together)."""
    from megatron_vlm.convert.mcore import ensure_single_process_groups

    ensure_single_process_groups()  # process groups and imports before the baseline
    baseline = _rss_bytes()
    if wait:
        print("ready", flush=True)
        sys.stdin.readline()
    t0, c0 = time.perf_counter(), _cpu_seconds()
    with PeakRss() as rss:
        _convert(phase, src, dst, shard_bytes, index, count)
    seconds = time.perf_counter() - t0
    return {"seconds": seconds, "cpu_seconds": _cpu_seconds() - c0,
            "baseline_rss_bytes": baseline, "peak_rss_bytes": rss.peak,
            "max_rss_bytes_kernel": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def _cmd(phase: str, src: Path, dst: Path, shard_bytes: int, index: int = 0,
         count: int = 1, wait: bool = False) -> list[str]:
    return [sys.executable, "-m", "benchmarks.convert_hf", "--phase", phase, "--src", str(src),
            "--dst", str(dst), "--shard-bytes", str(shard_bytes), "--index", str(index),
            "--count", str(count)] + (["--wait"] if wait else [])


def _env() -> dict[str, str]:
    return dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
                TORCH_COMPILE_DISABLE="1")


def _child(phase: str, src: Path, dst: Path, shard_bytes: int, count: int = 1) -> dict[str, Any]:
    proc = subprocess.run(_cmd(phase, src, dst, shard_bytes, 0, count), env=_env(),
                          stdout=subprocess.PIPE,
                          text=True, check=True, cwd=Path(__file__).resolve().parents[1])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _sliced(kind: str, src: Path, dst: Path, shard_bytes: int, count: int) -> dict[str, Any]:
    """``count`` slice processes started together (each after its imports), then the join:
    what ``--workers count`` runs, without the process start-up."""
    root = Path(__file__).resolve().parents[1]
    procs = [subprocess.Popen(_cmd(f"{kind}_slice", src, dst, shard_bytes, i, count, True),
                              env=_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              text=True, cwd=root) for i in range(count)]
    for p in procs:
        assert p.stdout.readline().strip() == "ready"
    t0 = time.perf_counter()
    for p in procs:
        p.stdin.write("go\n")
        p.stdin.flush()
    outs = [json.loads(p.communicate()[0].strip().splitlines()[-1]) for p in procs]
    wall = time.perf_counter() - t0
    if any(p.returncode for p in procs):
        raise RuntimeError(f"a {kind} slice failed")
    joined = _child(f"{kind}_finish", src, dst, shard_bytes, count)
    join = joined["seconds"]
    # All slices start at "go" (within milliseconds): the slowest one's own time is the run's,
    # as for the one-process run (the wall time also holds the processes' exit, ~1 s each).
    slices = max(o["seconds"] for o in outs)
    return {"seconds": slices + join, "slices_seconds": slices, "join_seconds": join,
            "slice_seconds": [o["seconds"] for o in outs], "wall_until_exit_seconds": wall,
            "cpu_seconds": sum(o["cpu_seconds"] for o in outs) + joined["cpu_seconds"],
            "slice_peak_rss_bytes": [o["peak_rss_bytes"] - o["baseline_rss_bytes"]
                                     for o in outs]}


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
    out = {**phase, "gb_per_s": sizes["checkpoint_bytes"] / 1e9 / phase["seconds"]}
    if "peak_rss_bytes" not in phase:
        return out
    # The sampled peak: the kernel's high-water mark (kept in the JSON) is inherited across
    # exec from the parent, which held the generated checkpoint, so it says nothing here.
    used = phase["peak_rss_bytes"] - phase["baseline_rss_bytes"]
    return {**out, "conversion_rss_bytes": used,
            "conversion_rss_over_checkpoint": used / sizes["checkpoint_bytes"],
            "conversion_rss_over_shard_plus_layer": used / (
                sizes["largest_shard_bytes"] + sizes["largest_layer_bytes"]),
            "conversion_rss_over_largest_tensor_plus_layer": used / (
                sizes["largest_tensor_bytes"] + sizes["largest_layer_bytes"])}


def _rounds(work: Path, sizes: dict, shard_bytes: int, repeats: int, workers: int,
            smoke: bool) -> dict[str, list[dict]]:
    """``repeats`` interleaved rounds of loop, import, import_N, export, export_N."""
    runs: dict[str, list[dict]] = {}
    hf = work / "hf"
    for r in range(repeats):
        for name in ("loop", "import", f"import_{workers}", "export", f"export_{workers}"):
            kind = name.split("_")[0]
            src = work / "ours" if kind == "export" else hf
            dst = work / f"{name}_{r}"
            if smoke and name.endswith(f"_{workers}"):  # in-process, one slice after the other
                t0 = time.perf_counter()
                for i in range(workers):
                    _convert(f"{kind}_slice", src, dst, shard_bytes, i, workers)
                _convert(f"{kind}_finish", src, dst, shard_bytes, 0, workers)
                measured = {"seconds": time.perf_counter() - t0}
            elif name.endswith(f"_{workers}"):
                measured = _sliced(kind, src, dst, shard_bytes, workers)
            else:
                measured = (run_phase(name, src, dst, shard_bytes) if smoke
                            else _child(name, src, dst, shard_bytes))
            runs.setdefault(name, []).append(_summary(measured, sizes))
            if name == "import" and not (work / "ours").exists():
                os.replace(dst, work / "ours")  # the export's input
            elif r < repeats - 1 or name.startswith("import") or name == "loop":
                shutil.rmtree(dst, ignore_errors=True)
            print(f"round {r} {name}: {measured['seconds']:.2f} s", flush=True)
    return runs


def _medians(runs: dict[str, list[dict]], workers: int) -> dict[str, Any]:
    med = {k: statistics.median(x["seconds"] for x in v) for k, v in runs.items()}
    ratios = {}
    for kind in ("import", "export"):
        n = f"{kind}_{workers}"
        ratios[f"{kind}_over_loop"] = med["loop"] / med[kind]
        ratios[f"{n}_over_{kind}"] = med[kind] / med[n]
        ratios[f"{n}_over_{kind}_per_worker"] = med[kind] / med[n] / workers
        ratios[f"{n}_over_loop"] = med["loop"] / med[n]
    # paired: each round's own ratio, then the median of those
    paired = {}
    for kind in ("import", "export", f"import_{workers}", f"export_{workers}"):
        paired[f"{kind}_over_loop"] = statistics.median(
            a["seconds"] / b["seconds"] for a, b in zip(runs["loop"], runs[kind]))
    cores = {k: statistics.median(x["cpu_seconds"] / x["seconds"] for x in v)
             for k, v in runs.items() if all("cpu_seconds" in x for x in v)}
    return {"median_seconds": med, "ratio_of_medians": ratios, "median_of_paired_ratios": paired,
            "median_cores_busy": cores}


def main(argv: list[str] | None = None) -> Path | None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--smoke", action="store_true", help="a few MB, in-process (seconds)")
    p.add_argument("--out-dir", default=None, help=f"result directory (default {RESULTS_DIR})")
    p.add_argument("--size-gb", type=float, default=3.0, help="synthetic checkpoint size")
    p.add_argument("--shard-gb", type=float, default=0.5, help="HF shard size (input, output)")
    p.add_argument("--workers", type=int, default=2, help="N of the N-process runs")
    p.add_argument("--repeats", type=int, default=5, help="interleaved rounds (medians)")
    p.add_argument("--work-dir", default=None, help="scratch directory (default: a temp dir)")
    p.add_argument("--phase", help=argparse.SUPPRESS)
    p.add_argument("--src", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--dst", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--shard-bytes", type=int, help=argparse.SUPPRESS)
    p.add_argument("--index", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--count", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--wait", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.phase:  # child process: one measured conversion, JSON on the last stdout line
        print(json.dumps(run_phase(args.phase, args.src, args.dst, args.shard_bytes, args.index,
                                   args.count, args.wait)))
        return None

    size_gb = 0.002 if args.smoke else args.size_gb
    shard_bytes = int((0.001 if args.smoke else args.shard_gb) * 1e9)
    repeats = 1 if args.smoke else args.repeats
    work = Path(tempfile.mkdtemp(prefix="convert_hf_", dir=args.work_dir))
    load_start = os.getloadavg()
    try:
        cfg = synthetic_config(size_gb, args.smoke)
        print(f"generating {size_gb} GB ({cfg['num_hidden_layers']} layers) in {work}")
        sizes = generate(work / "hf", cfg, shard_bytes)
        runs = _rounds(work, sizes, shard_bytes, repeats, args.workers, args.smoke)
        last = repeats - 1
        exported, exported_n = work / f"export_{last}", work / f"export_{args.workers}_{last}"
        round_trip = verify(work / "hf", exported)
        same = sorted(x.name for x in exported.iterdir()) == sorted(
            x.name for x in exported_n.iterdir()) and all(
            (exported / n).read_bytes() == (exported_n / n).read_bytes()
            for n in [x.name for x in exported.glob("*.safetensors")] + [INDEX_NAME])
        int4_run = (run_phase("export_int4", work / "ours", work / "int4", shard_bytes)
                    if args.smoke else _child("export_int4", work / "ours", work / "int4",
                                              shard_bytes))
        int4 = int4_size(work / "hf", exported, work / "int4")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    config = {"size_gb_requested": size_gb, "shard_bytes": shard_bytes, "model": cfg,
              "workers": args.workers, "repeats": repeats, "threads_per_process": 2,
              "isolation": "in-process" if args.smoke else "one process per measurement, "
                           "timed after its imports",
              "load_average_at_start": load_start, "load_average_at_end": os.getloadavg()}
    notes = ("GB/s = checkpoint bytes / seconds (import and export include fsync; import the "
             "sha256 of every file for the manifest, taken while writing). loop = safetensors "
             "load_file + save_file + fsync of every input shard. N-process runs: N slice "
             "processes released together after their imports, then the join (its own process). "
             "RSS: peak RSS sampled every 5 ms - RSS after imports (the kernel's high-water mark "
             "is inherited from the parent across exec). N-process seconds = the slowest slice "
             "(all released together) + the join; the wall time until the slices exited is "
             "kept. Round trip: export compared "
             "with the input tensor by tensor; "
             "export_N_bytes_identical: the N-process export's shards and index equal the "
             "one-process export's byte for byte.")
    results = {**sizes, **_medians(runs, args.workers), "runs": runs,
               "export_int4": _summary(int4_run, sizes), "round_trip": round_trip,
               f"export_{args.workers}_bytes_identical": same, "int4_size": int4}
    return write_result("convert_hf", config, results, out_dir=args.out_dir, smoke=args.smoke,
                        notes=notes)


if __name__ == "__main__":
    main()
