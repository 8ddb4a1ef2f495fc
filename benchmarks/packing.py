"""Packed against padded SPIN training steps: same process, same model, same pairs, alternating.

    python benchmarks/packing.py                          # CPU: the tiny model, lengths scaled by 1/4
    python benchmarks/packing.py --shape 1b --scale 1     # GPU: a Llama-3.2-1B-shaped model, full lengths

One `Trainer` (the product path: Megatron-core, the data pipeline, the optimizer) is set up once; every
optimizer step's global batch is then trained twice, once in padded micro-batches (the length-bucketed
sampler: `train.micro_batch_size` pairs per micro-batch, each row padded to the micro-batch's longest
sequence; `--length-buckets 1` makes it plain random batching, as trainers without length grouping do) and once packed (data/packing.py: the same pairs in rows of at most `data.pack_tokens` tokens),
in alternating order so that a drift in the machine's load falls on both. A step is zeroed gradients,
forward and backward over the step's micro-batches and the optimizer update. The first `--warmup` steps
are dropped; the report gives median step times, real tokens per second (padding excluded, the same
numerator for both: the pairs' tokens), the padding fraction of each layout over the timed steps and the
ratio packed / padded of real tokens per second: the median over steps of the two layouts' time ratio
(same pairs, run back to back), beside the ratio over all timed steps and the ratio of process CPU time,
which a machine shared with other jobs disturbs least.

Lengths (tokens), like UltraChat's, as SPIN uses it (the first user turn as the prompt, the human reply as
chosen, the model's own reply as rejected): each drawn from a log-normal whose mean is 309.3 tokens, the
mean utterance length UltraChat's paper publishes (Ding et al. 2023, "Enhancing Chat Language Models by
Scaling High-quality Instructional Conversations", Table 5; UltraChat-200k is a filtered subset of those
dialogues and publishes no length figures of its own), with sigma 0.75 (an assumption: no spread is
published; it puts the 90th percentile at 2.2x the median), then cut the way the paper's recipe cuts them:
prompts kept to their last 512 tokens, sequences to 1024, generated (rejected) replies to 256 new tokens
(configs/zephyr-7b-spin-paper.yaml). `--scale 4` divides every figure by 4 (CPU: a tiny model at full
lengths spends its time in attention, which it does not at 7B); the padding fractions do not depend on the
scale, the speed-up does.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

from train_step import SHAPES  # noqa: E402  (the shapes the other training benchmarks use)

MEAN_UTTERANCE_TOKENS = 309.3  # Ding et al. 2023, Table 5 (UltraChat: average utterance length in tokens)
SIGMA = 0.75
PAPER_LIMITS = {"max_prompt_length": 512, "max_length": 1024, "max_new_tokens": 256}


def draw_lengths(n: int, scale: float, seed: int) -> dict[str, np.ndarray]:
    """Token counts of n (prompt, chosen, rejected) triples before the tokenizer's cuts."""
    rng = np.random.default_rng(seed)
    mu = math.log(MEAN_UTTERANCE_TOKENS / scale) - SIGMA**2 / 2  # a log-normal's mean is exp(mu + sigma^2 / 2)
    draw = lambda: np.maximum(1, np.rint(rng.lognormal(mu, SIGMA, n))).astype(int)  # noqa: E731
    prompt, chosen, rejected = draw(), draw(), draw()
    rejected = np.minimum(rejected, int(PAPER_LIMITS["max_new_tokens"] / scale))
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def single_token_words(tokenizer) -> list[str]:
    """Words that the tokenizer encodes as one token after a space, so n words are about n tokens."""
    words = []
    for piece in tokenizer.get_vocab():
        if piece.startswith("Ġ") and piece[1:].isalpha():
            word = piece[1:]
            if len(tokenizer(" " + word, add_special_tokens=False)["input_ids"]) == 1:
                words.append(word)
    return sorted(words)


def write_pairs(path: Path, lengths: dict[str, np.ndarray], words: list[str], seed: int) -> None:
    rng = np.random.default_rng(seed + 1)
    with open(path, "w") as handle:
        for i in range(len(lengths["prompt"])):
            text = {k: " ".join(rng.choice(words, size=int(lengths[k][i]))) for k in ("prompt", "chosen", "rejected")}
            handle.write(json.dumps({"prompt_id": str(i), **text}) + "\n")


def _step(trainer, data, forward_step) -> tuple[float, float]:
    """(wall seconds, this process's CPU seconds) of one optimizer step."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    t0, c0 = time.perf_counter(), time.process_time()
    trainer.forward_backward(data, forward_step)
    trainer.optimizer.step()
    sync()
    return time.perf_counter() - t0, time.process_time() - c0


def run(args) -> dict:
    from spin_mega.config import config_from_dict
    from spin_mega.data import pair_lengths
    from spin_mega.demo.build import build_tokenizer
    from spin_mega.parallel import distributed
    from spin_mega.training.forward import make_forward_step
    from spin_mega.training.trainer import Trainer
    from transformers import AutoTokenizer

    gpu = torch.cuda.is_available()
    n_pairs = args.global_batch * (args.steps + args.warmup)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        tokenizer_dir = build_tokenizer(root / "tokenizer")
        words = single_token_words(AutoTokenizer.from_pretrained(str(tokenizer_dir)))
        drawn = draw_lengths(n_pairs, args.scale, args.seed)
        write_pairs(root / "pairs.jsonl", drawn, words, args.seed)
        config = yaml.safe_load((REPO / "configs" / "tiny-cpu.yaml").read_text())
        config["start_model"] = None
        config["model"] = dict(SHAPES[args.shape], max_position_embeddings=max(512, int(2048 / args.scale)))
        config["data"].update(
            train_path=str(root / "pairs.jsonl"), tokenizer=str(tokenizer_dir), packing=True, pack_tokens=args.pack_tokens,
            max_prompt_length=int(PAPER_LIMITS["max_prompt_length"] / args.scale), max_length=int(PAPER_LIMITS["max_length"] / args.scale),
        )
        config["train"].update(
            micro_batch_size=args.micro_batch, global_batch_size=args.global_batch, epochs=1, seed=args.seed,
            precision="bf16" if gpu else "fp32", save_checkpoints=False, opponent="precompute",
        )
        if args.length_buckets is not None:
            config["train"]["length_buckets"] = args.length_buckets
        config["optim"].update(lr=1e-6, warmup_ratio=0.0)
        cfg = config_from_dict(config)
        trainer = Trainer(cfg, root / "work")
        try:
            trainer.setup()
            tokenized = {k: np.asarray(trainer.dataset.with_format("arrow")[c].combine_chunks().value_lengths())
                         for k, c in (("prompt", "prompt_ids"), ("chosen", "chosen_ids"), ("rejected", "rejected_ids"))}
            # The opponent's log-probs only enter the loss's arithmetic: zeros time the same work.
            opponent = {"chosen": [0.0] * len(trainer.dataset), "rejected": [0.0] * len(trainer.dataset)}
            forward_step = make_forward_step(cfg.loss, fused=False)
            modes = ("padded", "packed")
            timed = {m: {"seconds": [], "cpu_seconds": [], "real_tokens": 0, "stream_tokens": 0, "micro_batches": []} for m in modes}
            for step in range(args.warmup + args.steps):
                order = modes if step % 2 == 0 else modes[::-1]
                for mode in order:
                    data = trainer.step_data(step, opponent, packed=mode == "packed")
                    seconds, cpu_seconds = _step(trainer, data, forward_step)
                    if step >= args.warmup:
                        t = timed[mode]
                        t["seconds"].append(seconds)
                        t["cpu_seconds"].append(cpu_seconds)
                        t["real_tokens"] += data.tokens
                        t["stream_tokens"] += data.padded_tokens
                        t["micro_batches"].append(len(data.batches))
            performance_paths = trainer.performance_paths
        finally:
            distributed.shutdown()

    results = {}
    for mode, t in timed.items():
        total = sum(t["seconds"])
        results[mode] = {
            "median_step_s": statistics.median(t["seconds"]),
            "real_tokens_per_s": t["real_tokens"] / total,
            "real_tokens_per_cpu_s": t["real_tokens"] / sum(t["cpu_seconds"]),
            "padding_fraction": 1.0 - t["real_tokens"] / t["stream_tokens"],
            "micro_batches_per_step": statistics.mean(t["micro_batches"]),
            "step_seconds": [round(s, 4) for s in t["seconds"]],
        }

    def stats(a) -> dict:
        return {"mean": float(np.mean(a)), "p50": float(np.median(a)), "p90": float(np.percentile(a, 90)), "max": int(np.max(a))}
    from spin_mega.data.packing import resolve_pack_tokens

    return {
        "benchmark": "packing",
        "device": torch.cuda.get_device_name() if gpu else f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
        "is_gpu": gpu,
        "date": datetime.date.today().isoformat(),
        "versions": {"torch": torch.__version__, "python": platform.python_version()},
        "shape": args.shape,
        "model": SHAPES[args.shape],
        "precision": "bf16" if gpu else "fp32",
        "global_batch_pairs": args.global_batch,
        "padded_micro_batch_pairs": args.micro_batch,
        "length_buckets": cfg.train.length_buckets,
        "pack_tokens": resolve_pack_tokens(args.pack_tokens, args.micro_batch, cfg.data.max_length),
        "steps_timed": args.steps,
        "lengths": {
            "law": f"log-normal, mean {MEAN_UTTERANCE_TOKENS / args.scale:.1f} tokens (309.3 / scale), sigma {SIGMA}; "
                   "rejected capped at max_new_tokens; then the tokenizer's cuts",
            "source": "mean utterance length of UltraChat, Ding et al. 2023, Table 5; sigma assumed",
            "scale": args.scale,
            "limits": {k: int(v / args.scale) for k, v in PAPER_LIMITS.items()},
            "tokenized": {k: stats(v) for k, v in tokenized.items()},
        },
        "performance_paths": performance_paths,
        "results": results,
        # Both layouts of a step train the same pairs, back to back: the per-step time ratio is the ratio of
        # real tokens/s under the same load, and its median shrugs off other jobs' bursts on a shared machine.
        "packed_over_padded_real_tokens_per_s": statistics.median(
            a / b for a, b in zip(timed["padded"]["seconds"], timed["packed"]["seconds"])
        ),
        "packed_over_padded_over_all_timed_steps": results["packed"]["real_tokens_per_s"] / results["padded"]["real_tokens_per_s"],
        "packed_over_padded_cpu_time": sum(timed["padded"]["cpu_seconds"]) / sum(timed["packed"]["cpu_seconds"]),
        "load_average": os.getloadavg(),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="tiny")
    parser.add_argument("--scale", type=float, default=4.0, help="divide every length by this")
    parser.add_argument("--steps", type=int, default=12, help="timed steps per layout")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--global-batch", type=int, default=32)
    parser.add_argument("--micro-batch", type=int, default=4, help="pairs per padded micro-batch")
    parser.add_argument("--pack-tokens", type=int, default=None, help="data.pack_tokens (default: 2 x micro-batch x max_length)")
    parser.add_argument("--length-buckets", type=int, default=None,
                        help="train.length_buckets of the padded baseline (default: the trainer's; 1 is random batching)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="default: benchmarks/results/packing_<cpu|gpu>.json")
    args = parser.parse_args(argv)
    record = run(args)
    path = args.json or REPO / "benchmarks" / "results" / f"packing_{'gpu' if record['is_gpu'] else 'cpu'}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps({k: record[k] for k in ("device", "results", "packed_over_padded_real_tokens_per_s")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
