"""Throughput and peak memory of checkpoint conversion, both directions, on a random 1B-class Llama.

    python benchmarks/conversion.py [--dtype bfloat16] [--workdir DIR] [--out benchmarks/results/conversion_cpu.json]
    python benchmarks/conversion.py --scaling    # memory against the shard count: conversion_scaling_cpu.json

The source is a TinyLlama-shaped model cut to 16 layers (hidden 2048, 32 heads in 4 key/value groups, ffn
5632, vocab 32000, untied), written with random weights straight to sharded safetensors (1 GB shards) so
building it needs no model in memory either. Each direction runs in a fresh process that reports:

  seconds      wall time of the conversion call alone (imports excluded)
  cpu_seconds  user + system CPU time of that call (the machine is shared: wall time includes waiting)
  gb_per_s     weight bytes converted (the HF tensors, 1e9 bytes per GB) per second
  peak_rss_gb  the process's peak resident set (getrusage), which also counts pages of memory-mapped
               input files that were touched; baseline_rss_gb is the same process before converting
  peak_anon_gb peak of resident memory that is not file-backed (sampled every 20 ms); minus
               baseline_anon_gb (imports) it is what the conversion itself holds

The round trip is then checked bit-exact, tensor by tensor.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

SHAPE = dict(
    vocab_size=32000,
    hidden_size=2048,
    ffn_hidden_size=5632,
    num_layers=16,
    num_attention_heads=32,
    num_query_groups=4,
    head_dim=64,
    max_position_embeddings=2048,
)
INPUT_SHARD_BYTES = 1 << 30


def _write_source(path: Path, dtype_name: str, shape: dict = SHAPE, shard_bytes: int = INPUT_SHARD_BYTES) -> int:
    """Random weights, generated and written one tensor at a time. Returns the weight bytes."""
    import torch

    from spin_mega.config import ModelConfig
    from spin_mega.conversion.mappings import ARCHITECTURES, Dims
    from spin_mega.conversion.safetensors_io import INDEX_NAME, StreamingShardWriter, plan_shards, shard_name
    from spin_mega.models.hf_config import hf_config_from_model_config

    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}[dtype_name]
    model = ModelConfig(architecture="llama", **shape)
    dims = Dims.of(model, model.vocab_size)
    tensors = []
    for rule in ARCHITECTURES["llama"].active_rules(model):
        for index in rule.stack_indices(dims):
            tensors += list(zip(rule.hf_names(*index), rule.hf_shapes(dims), strict=True))
    element = torch.empty((), dtype=dtype).element_size()
    sizes = [element * torch.Size(shape).numel() for _, shape in tensors]
    path.mkdir(parents=True)
    generator = torch.Generator().manual_seed(0)
    shards = plan_shards(sizes, shard_bytes)
    weight_map = {}
    for s, ids in enumerate(shards):
        name = shard_name(s, len(shards))
        writer = StreamingShardWriter(path / name, [(tensors[i][0], dtype, tensors[i][1]) for i in ids])
        for i in ids:
            tensor_name, shape = tensors[i]
            writer.write(tensor_name, (torch.randn(shape, generator=generator) * 0.02).to(dtype))
            weight_map[tensor_name] = name
        writer.close()
    (path / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": sum(sizes)}, "weight_map": weight_map}))
    (path / "config.json").write_text(json.dumps(hf_config_from_model_config(model, dtype_name)))
    return sum(sizes)


def _child(direction: str, source: str, target: str, max_shard_bytes: int) -> None:
    """Runs one conversion in this (fresh) process and prints its measurements as JSON."""
    import psutil

    from spin_mega.conversion import hf_to_mcore, mcore_to_hf
    import spin_mega.models.checkpoint  # noqa: F401  (Megatron's import cost stays out of the timing)
    import spin_mega.models.gpt  # noqa: F401

    proc = psutil.Process()
    info = proc.memory_info()
    baseline, baseline_anon = info.rss, info.rss - info.shared
    peak_anon = [0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            info = proc.memory_info()
            peak_anon[0] = max(peak_anon[0], info.rss - info.shared)
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    cpu_start = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    if direction == "hf-to-mcore":
        hf_to_mcore(source, target)
    else:
        mcore_to_hf(source, target, max_shard_bytes=max_shard_bytes)
    seconds = time.perf_counter() - start
    cpu_end = resource.getrusage(resource.RUSAGE_SELF)
    cpu = (cpu_end.ru_utime - cpu_start.ru_utime) + (cpu_end.ru_stime - cpu_start.ru_stime)
    stop.set()
    sampler.join()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(
        json.dumps(
            {
                "seconds": seconds,
                "cpu_seconds": cpu,
                "peak_rss": peak,
                "baseline_rss": baseline,
                "peak_anon": peak_anon[0],
                "baseline_anon": baseline_anon,
            }
        )
    )


def _run_child(direction: str, source: Path, target: Path, max_shard_bytes: int = 5 * 1024**3, env=None) -> dict:
    result = subprocess.run(
        [sys.executable, "-W", "ignore", __file__, "--child", direction, str(source), str(target),
         "--max-shard-bytes", str(max_shard_bytes)],
        capture_output=True,
        text=True,
        cwd=REPO,
        env=None if env is None else dict(os.environ, **env),
    )
    if result.returncode != 0:
        raise SystemExit(f"{direction} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _same_tensors(a: Path, b: Path) -> bool:
    import torch
    from safetensors import safe_open

    maps = [json.loads((d / "model.safetensors.index.json").read_text())["weight_map"] for d in (a, b)]
    if sorted(maps[0]) != sorted(maps[1]):
        return False
    for name in maps[0]:
        with safe_open(str(a / maps[0][name]), "pt") as fa, safe_open(str(b / maps[1][name]), "pt") as fb:
            x, y = fa.get_tensor(name), fb.get_tensor(name)
            if x.dtype != y.dtype or not torch.equal(x, y):
                return False
    return True


# The scaling run: a small-tensor Llama at two depths, written as one layer per ~16 MiB shard, so the shard
# count doubles while the shard and layer sizes stay fixed.
SCALING_SHAPE = dict(
    vocab_size=4096,
    hidden_size=512,
    ffn_hidden_size=1376,
    num_attention_heads=8,
    num_query_groups=4,
    head_dim=64,
    max_position_embeddings=2048,
)
SCALING_LAYERS = (24, 48)
SCALING_SHARD_BYTES = 16 * 1024**2
FIXED_MMAP_THRESHOLD = {"MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}


def _scaling(args) -> None:
    """Peak memory of both converters against the number of shards (24 and 48 layers, >= 25 shards each way):
    what they hold must be bounded by the largest shard plus one layer, not grow with the model."""
    import psutil
    import torch

    element = torch.empty((), dtype=getattr(torch, args.dtype)).element_size()
    s = SCALING_SHAPE
    one_layer = element * (
        3 * s["hidden_size"] * s["ffn_hidden_size"]
        + s["hidden_size"] * s["head_dim"] * 2 * (s["num_attention_heads"] + s["num_query_groups"])
        + 2 * s["hidden_size"]
    )
    runs = []
    for layers in SCALING_LAYERS:
        workdir = Path(tempfile.mkdtemp(prefix="spin_mega_conv_scaling_", dir=args.workdir))
        try:
            shape = dict(s, num_layers=layers)
            weight_bytes = _write_source(workdir / "hf", args.dtype, shape, SCALING_SHARD_BYTES)
            index = json.loads((workdir / "hf" / "model.safetensors.index.json").read_text())["weight_map"]
            shard_sizes = {}
            for name in set(index.values()):
                shard_sizes[name] = (workdir / "hf" / name).stat().st_size
            run = {
                "num_layers": layers,
                "weight_mb": round(weight_bytes / 2**20, 1),
                "input_shards": len(shard_sizes),
                "largest_input_shard_mb": round(max(shard_sizes.values()) / 2**20, 2),
            }
            for direction, source, target in (
                ("hf_to_mcore", workdir / "hf", workdir / "mcore"),
                ("mcore_to_hf", workdir / "mcore", workdir / "hf_out"),
            ):
                m = _run_child(direction.replace("_", "-"), source, target, SCALING_SHARD_BYTES)
                # glibc raises its mmap threshold after the first large free, after which freed tensor
                # buffers stay in the heap: a fixed threshold separates what the converter holds from that.
                shutil.rmtree(target)
                fixed = _run_child(
                    direction.replace("_", "-"), source, target, SCALING_SHARD_BYTES, env=FIXED_MMAP_THRESHOLD
                )
                run[direction] = {
                    "held_mb": round((m["peak_anon"] - m["baseline_anon"]) / 2**20, 1),
                    "held_mb_fixed_mmap_threshold": round((fixed["peak_anon"] - fixed["baseline_anon"]) / 2**20, 1),
                    "peak_rss_mb": round(m["peak_rss"] / 2**20, 1),
                    "baseline_rss_mb": round(m["baseline_rss"] / 2**20, 1),
                    "seconds": round(m["seconds"], 2),
                }
            run["output_shards"] = len(list((workdir / "hf_out").glob("model-*.safetensors")))
            run["roundtrip_bit_exact"] = _same_tensors(workdir / "hf", workdir / "hf_out")
            print(run, flush=True)
            runs.append(run)
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
    bound_mb = (SCALING_SHARD_BYTES + one_layer) / 2**20
    import megatron.core

    report = {
        "benchmark": "checkpoint conversion memory against the number of safetensors shards",
        "device": f"CPU ({platform.processor() or platform.machine()}, {psutil.cpu_count()} cores, "
        f"{psutil.virtual_memory().total / 2**30:.0f} GiB RAM, shared with other jobs)",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "megatron_core": megatron.core.__version__},
        "model": dict(s, architecture="llama", dtype=args.dtype, num_layers=list(SCALING_LAYERS)),
        "one_layer_mb": round(one_layer / 2**20, 2),
        "max_shard_mb": round(SCALING_SHARD_BYTES / 2**20, 2),
        "bound_mb": round(bound_mb, 2),
        "runs": runs,
        "held_mb_means": "peak minus start-of-call resident memory that is not file-backed (sampled every 20 ms): "
        "what the conversion itself holds; held_mb_fixed_mmap_threshold is the same with glibc's mmap threshold "
        "fixed at 128 KiB (MALLOC_MMAP_THRESHOLD_), so freed buffers go back to the system at once",
        "within_bound": {
            key: all(r[d][key] <= bound_mb for r in runs for d in ("hf_to_mcore", "mcore_to_hf"))
            for key in ("held_mb", "held_mb_fixed_mmap_threshold")
        },
    }
    out = args.out if args.out.name != "conversion_cpu.json" else args.out.with_name("conversion_scaling_cpu.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))
    if not all(r["roundtrip_bit_exact"] for r in runs):
        raise SystemExit("round trip was not bit-exact")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32", "float16"])
    parser.add_argument("--workdir", type=Path, default=None, help="scratch directory (default: a temporary one)")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "conversion_cpu.json")
    parser.add_argument("--scaling", action="store_true", help="the shard-count scaling run (see _scaling)")
    parser.add_argument("--child", nargs=3, metavar=("DIRECTION", "SOURCE", "TARGET"), help=argparse.SUPPRESS)
    parser.add_argument("--max-shard-bytes", type=int, default=5 * 1024**3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(*args.child, args.max_shard_bytes)
        return
    if args.scaling:
        _scaling(args)
        return

    import psutil
    import torch

    workdir = Path(tempfile.mkdtemp(prefix="spin_mega_conv_bench_", dir=args.workdir))
    try:
        start = time.perf_counter()
        weight_bytes = _write_source(workdir / "hf", args.dtype)
        print(f"random source: {weight_bytes / 1e9:.2f} GB in {time.perf_counter() - start:.1f} s", flush=True)
        results = {}
        for direction, source, target in (
            ("hf_to_mcore", workdir / "hf", workdir / "mcore"),
            ("mcore_to_hf", workdir / "mcore", workdir / "hf_out"),
        ):
            m = _run_child(direction.replace("_", "-"), source, target)
            results[direction] = {
                "seconds": round(m["seconds"], 2),
                "gb_per_s": round(weight_bytes / 1e9 / m["seconds"], 3),
                "cpu_seconds": round(m["cpu_seconds"], 2),
                "peak_rss_gb": round(m["peak_rss"] / 1e9, 3),
                "baseline_rss_gb": round(m["baseline_rss"] / 1e9, 3),
                "peak_anon_gb": round(m["peak_anon"] / 1e9, 3),
                "baseline_anon_gb": round(m["baseline_anon"] / 1e9, 3),
            }
            print(direction, results[direction], flush=True)
        exact = _same_tensors(workdir / "hf", workdir / "hf_out")
        import megatron.core
        import safetensors
        import transformers

        largest_layer = (
            3 * SHAPE["hidden_size"] * SHAPE["ffn_hidden_size"]
            + SHAPE["hidden_size"] * SHAPE["head_dim"] * 2 * (SHAPE["num_attention_heads"] + SHAPE["num_query_groups"])
        ) * torch.empty((), dtype=getattr(torch, args.dtype)).element_size()
        report = {
            "benchmark": "checkpoint conversion, HF safetensors <-> spin-mega Megatron torch_dist",
            "device": f"CPU ({platform.processor() or platform.machine()}, {psutil.cpu_count()} cores, "
            f"{psutil.virtual_memory().total / 2**30:.0f} GiB RAM, shared with other jobs)",
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "versions": {
                "python": platform.python_version(),
                "torch": torch.__version__,
                "megatron_core": megatron.core.__version__,
                "transformers": transformers.__version__,
                "safetensors": safetensors.__version__,
            },
            "model": dict(SHAPE, architecture="llama", tie_word_embeddings=False, dtype=args.dtype),
            "weight_gb": round(weight_bytes / 1e9, 3),
            "input_shard_gb": round(INPUT_SHARD_BYTES / 1e9, 3),
            "one_layer_gb": round(largest_layer / 1e9, 3),
            "results": results,
            "roundtrip_bit_exact": exact,
            "notes": "Each direction runs in a fresh process; timings exclude imports. The machine's 2 cores "
            "were shared with other engineers' jobs during the run, so times are upper bounds.",
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
        print(json.dumps(report, indent=2))
        if not exact:
            raise SystemExit("round trip was not bit-exact")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
