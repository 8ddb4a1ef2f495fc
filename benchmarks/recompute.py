"""Memory effect of activation recomputation (train.recompute: none | selective | full), measured on CPU.

    python benchmarks/recompute.py [--out benchmarks/results/recompute_cpu.json]

Each mode runs in a fresh single-rank process: the spin-mega Megatron model (models/gpt.py, SDPA attention)
of a small Llama shape, one forward and backward of a fixed batch through the policy's final hidden states.
Two figures per mode:

  saved_activation_mb  bytes of the tensors autograd keeps for the backward pass (counted with
                       torch.autograd.graph.saved_tensors_hooks, each storage once, parameters excluded):
                       exactly the activation memory recomputation trades for compute
  peak_rss_mb          the process's peak resident set minus its resident set just before the forward
                       (getrusage; includes gradients, temporaries and allocator slack, so it is noisier)

and the forward+backward wall time. Ratios are against mode "none" measured in the same run.
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

SHAPE = dict(
    vocab_size=1024,
    hidden_size=512,
    ffn_hidden_size=1376,
    num_layers=4,
    num_attention_heads=8,
    num_query_groups=4,
    head_dim=64,
    max_position_embeddings=2048,
)
BATCH, SEQ = 4, 512
MODES = ("none", "selective", "full")


def _child(mode: str) -> None:
    import torch

    from spin_mega.config import ModelConfig
    from spin_mega.models.gpt import build_model, transformer_config
    from spin_mega.parallel import distributed

    distributed.initialize(1, 1, seed=0)
    model_cfg = ModelConfig(**SHAPE)
    model = build_model(model_cfg, transformer_config(model_cfg, recompute=mode))
    model.train()
    tokens = torch.randint(0, SHAPE["vocab_size"], (BATCH, SEQ), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(SEQ).expand(BATCH, SEQ)
    params = {p.data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(tensor):
        ptr = tensor.untyped_storage().data_ptr()
        if ptr not in params and ptr not in seen:
            seen[ptr] = tensor.untyped_storage().nbytes()
        return tensor

    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    start = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        hidden = model(tokens, positions, None)
    # A loss on the final hidden states (what the log-prob head consumes): every layer's backward runs.
    hidden.float().pow(2).mean().backward()
    seconds = time.perf_counter() - start
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    grad = sum(p.grad.double().norm().item() ** 2 for p in model.parameters() if p.grad is not None) ** 0.5
    print(
        json.dumps(
            {
                "saved_activation_bytes": sum(seen.values()),
                "peak_rss_delta_bytes": (peak_rss - base_rss) * 1024,
                "seconds": seconds,
                "grad_norm": grad,
            }
        )
    )
    distributed.shutdown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "recompute_cpu.json")
    parser.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _child(args.child)
        return

    import megatron.core
    import psutil
    import torch

    results = {}
    for mode in MODES:
        run = subprocess.run(
            [sys.executable, "-W", "ignore", __file__, "--child", mode], capture_output=True, text=True, cwd=REPO
        )
        if run.returncode != 0:
            raise SystemExit(f"mode {mode} failed:\n{run.stderr[-3000:]}")
        results[mode] = json.loads(run.stdout.strip().splitlines()[-1])
        print(mode, results[mode], flush=True)
    none = results["none"]
    # Recomputation must not change the gradients: the same seed and batch give the same norm.
    for mode in MODES:
        r = results[mode]
        r["saved_activation_mb"] = round(r.pop("saved_activation_bytes") / 2**20, 2)
        r["peak_rss_mb"] = round(r.pop("peak_rss_delta_bytes") / 2**20, 1)
        r["seconds"] = round(r["seconds"], 2)
    for mode in MODES:
        r = results[mode]
        r["saved_activation_ratio"] = round(r["saved_activation_mb"] / results["none"]["saved_activation_mb"], 3)
        r["peak_rss_ratio"] = round(r["peak_rss_mb"] / max(results["none"]["peak_rss_mb"], 1e-9), 3)
        r["time_ratio"] = round(r["seconds"] / results["none"]["seconds"], 3)
        r["grad_norm_rel_diff"] = abs(r["grad_norm"] - none["grad_norm"]) / none["grad_norm"]
    report = {
        "benchmark": "activation memory of one forward+backward, train.recompute none / selective / full",
        "device": f"CPU ({platform.processor() or platform.machine()}, {psutil.cpu_count()} cores, "
        f"{psutil.virtual_memory().total / 2**30:.0f} GiB RAM, shared with other jobs)",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "megatron_core": megatron.core.__version__},
        "model": dict(SHAPE, dtype="float32", attention="torch SDPA (no Transformer Engine)"),
        "batch": {"micro_batch_sequences": BATCH, "seq_length": SEQ},
        "results": results,
        "notes": "Each mode in a fresh process. megatron-core's selective mode recomputes the core attention "
        "only; with a fused attention (SDPA here, flash-attn or Transformer Engine on GPU) the [s, s] scores "
        "are never stored, so selective saves little; full keeps one input per layer.",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
