"""Throughput of one SPIN training step, both opponent modes, in one run.

    python benchmarks/train_step.py                  # CPU: the tiny model (figures are CPU figures)
    python benchmarks/train_step.py --shape 1b       # GPU: a Llama-3.2-1B-shaped model, random weights

Each mode runs `spin-mega train` (the product path: Megatron-core, the data pipeline, the optimizer) on
synthetic pairs of fixed length; the first --warmup steps (cold Triton and allocator warm-up) are reported
apart from the median of the rest, and the results file is rewritten as soon as each step's row lands, so a
time limit keeps every figure measured so far.
The model is initialised at random in memory (no start checkpoint) and nothing is saved
(train.save_checkpoints=false): a 1B model's checkpoint with optimizer state would be ~15 GB of writes.
With --seq-len every sequence (prompt + response) is exactly that many tokens.

FLOPs per step (MFU): with F = forward FLOPs per token = 2 * (non-embedding params + hidden * vocab)
+ 2 * layers * seq_len * hidden (causal attention), a step costs 3F per token for the policy's forward and
backward on chosen and rejected, plus F per token for the opponent's forward in fused mode (precompute
mode pays that once before training; it is reported separately). MFU is against the nominal dense bf16
peak (H100: 989 TFLOP/s).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]

SHAPES = {
    # head_dim 64 like the demo model; small enough for a 2-core CPU step in well under a second.
    "tiny": dict(vocab_size=512, hidden_size=256, ffn_hidden_size=688, num_layers=2, num_attention_heads=4,
                 num_query_groups=2, head_dim=64, max_position_embeddings=512),
    # Llama-3.2-1B's shape.
    "1b": dict(vocab_size=128256, hidden_size=2048, ffn_hidden_size=8192, num_layers=16, num_attention_heads=32,
               num_query_groups=8, head_dim=64, max_position_embeddings=4096, rope_theta=500000.0, tie_word_embeddings=True),
}


def _peak_rss(proc: subprocess.Popen, stop: threading.Event, out: list) -> None:
    peak = 0
    while not stop.is_set():
        try:
            root = psutil.Process(proc.pid)
            rss = root.memory_info().rss + sum(c.memory_info().rss for c in root.children(recursive=True))
            peak = max(peak, rss)
        except psutil.Error:
            pass
        time.sleep(0.05)
    out.append(peak)


def _write_pairs(path: Path, n: int, prompt_words: int, response_words: int, seed: int = 0) -> None:
    rng = random.Random(seed)
    words = [f"w{i}" for i in range(200)]
    with open(path, "w") as handle:
        for i in range(n):
            handle.write(json.dumps({
                "prompt_id": str(i),
                "prompt": " ".join(rng.choices(words, k=prompt_words)),
                "chosen": " ".join(rng.choices(words, k=response_words)),
                "rejected": " ".join(rng.choices(words, k=response_words)),
            }) + "\n")


def summarize(rows: list[dict], warmup: int) -> dict:
    """One mode's figures from its metrics rows so far: the first `warmup` steps (cold compiles, first
    allocations) reported apart, the medians over the rest."""
    warm, timed = rows[:warmup], rows[warmup:]
    result = {
        "warmup_steps": len(warm),
        "warmup_step_time_s": [m["step_time_s"] for m in warm],
        "steps_timed": len(timed),
        "step_time_s": statistics.median(m["step_time_s"] for m in timed) if timed else None,
        "tokens_per_s": statistics.median(m["tokens_per_s"] for m in timed) if timed else None,
        "padding_fraction": statistics.median(m["padding_fraction"] for m in timed) if timed else None,
    }
    if timed and "mfu" in timed[0]:
        result["mfu"] = statistics.median(m["mfu"] for m in timed)
    # torch's peak allocation on the device (telemetry samples it with CUDA, NVML or not): over every step.
    peaks = [m["torch_max_allocated_gib"] for m in rows if m.get("torch_max_allocated_gib") is not None]
    result["peak_gpu_allocated_gib"] = max(peaks) if peaks else None
    return result


def _read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            break  # a line being written
    return rows


def run_mode(root: Path, config: Path, mode: str, steps: int, nproc: int, warmup: int, publish) -> dict:
    """Runs one mode; calls publish(figures so far) as soon as each step's metrics row lands."""
    workdir = root / f"run_{mode}"
    args = ["train", str(config), "--workdir", str(workdir), "--max-steps", str(steps), "--set", f"train.opponent={mode}"]
    if nproc > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "-m", "spin_mega", *args]
    else:
        cmd = [sys.executable, "-m", "spin_mega", *args]
    t0 = time.perf_counter()
    # A session of its own: a time limit on this script takes the trainer down with it (see main).
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    _RUNNING.append(proc)
    stop, peak = threading.Event(), []
    watcher = threading.Thread(target=_peak_rss, args=(proc, stop, peak))
    watcher.start()
    stderr_lines: list[str] = []
    reader = threading.Thread(target=lambda: stderr_lines.extend(proc.stderr))
    reader.start()
    metrics_path, seen, first_row_s = workdir / "metrics.jsonl", 0, None
    result: dict = {}
    while True:
        done = proc.poll() is not None
        rows = _read_rows(metrics_path)
        if len(rows) > seen:
            seen = len(rows)
            if first_row_s is None:
                first_row_s = time.perf_counter() - t0
            result = summarize(rows, warmup)
            # Process start, imports, model build and the opponent precompute, up to the first step's end.
            result["startup_s_to_first_step"] = round(first_row_s, 1)
            publish(mode, result)
        if done:
            break
        time.sleep(0.2)
    reader.join()
    stop.set()
    watcher.join()
    _RUNNING.remove(proc)
    stderr = "".join(stderr_lines)
    if proc.returncode != 0:
        raise SystemExit(f"{mode} run failed:\n{stderr[-3000:]}")
    result["peak_host_rss_gib"] = peak[0] / 2**30 if peak else None
    result["wall_s_including_startup"] = time.perf_counter() - t0
    # The trainer's one-line account of which per-step savings were active (response rows only, host
    # label checks, gradient-reduce overlap).
    result["performance_paths"] = next((l.split("performance paths: ", 1)[1].strip() for l in stderr.splitlines() if "performance paths: " in l), None)
    publish(mode, result)
    return result


_RUNNING: list[subprocess.Popen] = []


def _stop_trainers(signum, frame) -> None:
    """A time limit (run.py's timeout sends SIGTERM) ends the trainer too: SIGKILL, not the SIGTERM that the
    trainer would answer with a preemption checkpoint. What was published stays on disk."""
    for proc in _RUNNING:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    sys.exit(124)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=2, help="first steps of each mode reported apart (cold compiles)")
    parser.add_argument("--micro-batch", type=int, default=4, help="pairs per micro-batch")
    parser.add_argument("--global-batch", type=int, default=16, help="pairs per optimizer step")
    parser.add_argument("--prompt-words", type=int, default=24)
    parser.add_argument("--response-words", type=int, default=48)
    parser.add_argument("--nproc", type=int, default=1)
    parser.add_argument("--seq-len", type=int, default=None,
                        help="every sequence exactly this many tokens (a quarter prompt); overrides the word counts")
    parser.add_argument("--modes", nargs="+", choices=("precompute", "fused"), default=("precompute", "fused"))
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results")
    parser.add_argument("--json", type=Path, default=None, help="write the JSON here instead of --out/train_step_<shape>_<cpu|gpu>.json")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, _stop_trainers)
    max_prompt, max_length = 512, 2048
    if args.seq_len is not None:
        # More words than tokens allowed: truncation (prompt kept at its end, response cut) makes every
        # sequence exactly seq_len tokens, so there is no padding and the FLOPs per step are known.
        max_prompt, max_length = args.seq_len // 4, args.seq_len
        args.prompt_words, args.response_words = args.seq_len, args.seq_len

    from spin_mega.demo.build import build_tokenizer
    from spin_mega.training.telemetry import peak_flops

    gpu = torch.cuda.is_available()
    device = torch.cuda.get_device_name() if gpu else f"CPU ({platform.processor() or platform.machine()}, {psutil.cpu_count()} cores)"
    record = {
        "benchmark": "spin_train_step",
        "device": device,
        "is_gpu": gpu,
        "date": datetime.date.today().isoformat(),
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "shape": args.shape,
        "model": SHAPES[args.shape],
        "micro_batch_pairs": args.micro_batch,
        "global_batch_pairs": args.global_batch,
        "sequence_words": {"prompt": args.prompt_words, "response": args.response_words},
        "seq_len": args.seq_len,
        # The peak MFU is quoted against, and the GPU it was matched to (None without a known GPU).
        "peak_bf16_flops": peak.flops if (peak := peak_flops()) else None,
        "peak_name": peak.label if peak else None,
        "nproc": args.nproc,
        "warmup_steps": args.warmup,
        "results": {},
        "fused_over_precompute_step_time": None,
        "flop_formula": "per token F = 2*(non-embedding params + hidden*vocab) + 2*layers*seq*hidden; step = (3F [policy fwd+bwd] + F [opponent fwd, fused only]) * tokens",
    }
    try:
        import megatron.core

        record["versions"]["megatron_core"] = megatron.core.__version__
    except ImportError:
        pass
    path = args.json or args.out / f"train_step_{args.shape}_{'gpu' if gpu else 'cpu'}.json"
    path.parent.mkdir(parents=True, exist_ok=True)

    def publish(mode: str, figures: dict) -> None:
        """Rewrites the results file with every figure known so far (a time limit keeps them)."""
        record["results"][mode] = figures
        times = [record["results"].get(m, {}).get("step_time_s") for m in ("fused", "precompute")]
        record["fused_over_precompute_step_time"] = times[0] / times[1] if all(times) else None
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(record, indent=2) + "\n")
        tmp.replace(path)

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tokenizer = build_tokenizer(root / "tokenizer")
        pairs = root / "pairs.jsonl"
        _write_pairs(pairs, args.global_batch * (args.steps + 1), args.prompt_words, args.response_words)
        shape = SHAPES[args.shape]
        config = yaml.safe_load((REPO / "configs" / "tiny-cpu.yaml").read_text())
        config["start_model"] = None
        config["model"] = dict(shape)
        config["data"].update(train_path=str(pairs), tokenizer=str(tokenizer), max_prompt_length=max_prompt, max_length=max_length)
        config["train"].update(micro_batch_size=args.micro_batch, global_batch_size=args.global_batch, epochs=1,
                               precision="bf16" if gpu else "fp32", length_buckets=1, save_checkpoints=False)
        config["optim"].update(lr=1e-6, warmup_ratio=0.0)
        config_path = root / "bench.yaml"
        config_path.write_text(yaml.safe_dump(config))
        for mode in args.modes:
            run_mode(root, config_path, mode, args.steps, args.nproc, args.warmup, publish)
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
