"""Work the output layer and the log-prob kernel skip by seeing only labelled (response) rows.

Before, every position of every padded [2B, T] micro-batch went through the output GEMM (2 * H * V FLOPs
per row forward, 3x that for forward + backward unfused, 4x fused-linear, whose backward recomputes the
logits) and the log-prob kernel (V logits read forward, read + written backward: 3 * V * 2 bytes per row in
bf16). Now only the rows carrying a label do. This script counts both on CPU:

- the demo: the real prompts and responses of the demo's training set, tokenized by the demo's tokenizer
  and cut into micro-batches by the trainer's own sampler (configs/tiny-cpu.yaml shapes);
- the 7B recipe (configs/zephyr-7b-spin.yaml: Mistral-7B, H 4096, V 32000, one pair per micro-batch,
  prompts up to 1024 tokens, generated responses up to 256): UltraChat is not on this machine, so a grid of
  prompt and response lengths; pass `--lengths FILE` (JSON lines with prompt, chosen, rejected token
  counts) to count a real tokenized set;
- and it checks the row arithmetic against torch's FLOP counter on the real `sequence_logprobs`.

    python benchmarks/response_rows.py [--lengths FILE] [--out benchmarks/results/response_rows_cpu.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

PAD_MULTIPLE = 8


def micro_batch_rows(prompt: np.ndarray, chosen: np.ndarray, rejected: np.ndarray, micro_batch_size: int, seed: int = 0) -> tuple[int, int]:
    """(rows the output layer saw before: 2B x padded T per micro-batch, labelled rows now) for one
    epoch of micro-batches cut by the trainer's sampler. A sequence of prompt p and response r has r
    labelled positions (each response token is predicted once)."""
    from spin_mega.data.batching import PairBatchSampler

    pair_len = prompt + np.maximum(chosen, rejected)
    n_global = (len(pair_len) // micro_batch_size) * micro_batch_size
    sampler = PairBatchSampler(pair_len[:n_global], micro_batch_size, n_global, 0, 1, seed)
    before = now = 0
    for batch in sampler.microbatches_for_step(0):
        batch = np.asarray(batch)
        t = int(np.ceil(pair_len[batch].max() / PAD_MULTIPLE) * PAD_MULTIPLE)
        before += 2 * len(batch) * t
        now += int(chosen[batch].sum() + rejected[batch].sum())
    return before, now


def costs(rows: int, hidden: int, vocab: int) -> dict:
    gemm = 2 * rows * hidden * vocab
    return {
        "rows": rows,
        "gemm_flops_unfused_fwd_bwd": 3 * gemm,
        "gemm_flops_fused_fwd_bwd": 4 * gemm,
        "logits_bytes_bf16_fwd_bwd": 3 * rows * vocab * 2,
    }


def compare(name: str, before: int, now: int, hidden: int, vocab: int) -> dict:
    b, n = costs(before, hidden, vocab), costs(now, hidden, vocab)
    return {
        "case": name,
        "hidden": hidden,
        "vocab": vocab,
        "rows_before": before,
        "rows_now": now,
        "fraction_saved": round(1 - now / before, 4),
        "gemm_tflops_saved_unfused": (b["gemm_flops_unfused_fwd_bwd"] - n["gemm_flops_unfused_fwd_bwd"]) / 1e12,
        "gemm_tflops_saved_fused": (b["gemm_flops_fused_fwd_bwd"] - n["gemm_flops_fused_fwd_bwd"]) / 1e12,
        "logits_gb_saved": (b["logits_bytes_bf16_fwd_bwd"] - n["logits_bytes_bf16_fwd_bwd"]) / 1e9,
    }


def demo_lengths() -> tuple[np.ndarray, np.ndarray]:
    from transformers import AutoTokenizer

    from spin_mega.demo.build import build_tokenizer, encode_sft_example, load_demo_rows

    rows = load_demo_rows("train")
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = AutoTokenizer.from_pretrained(str(build_tokenizer(Path(tmp) / "tok")))
        prompt, response = [], []
        for row in rows:
            ids, labels = encode_sft_example(tokenizer, row["prompt"], row["response"])
            r = sum(label != -100 for label in labels)
            prompt.append(len(ids) - r)
            response.append(r)
    return np.asarray(prompt), np.asarray(response)


def measured_gemm_flops(n_rows_labelled: int, s: int, b: int, hidden: int, vocab: int, impl: str) -> tuple[float, float]:
    """torch's FLOP counter over `sequence_logprobs` forward + backward, with every position as a row
    (before) and with the labelled rows only (now)."""
    from torch.utils.flop_counter import FlopCounterMode

    from spin_mega.training.logprobs import sequence_logprobs

    class Head:
        config = type("C", (), {"sequence_parallel": False})()

        def __init__(self, w):
            self.w = w

        def output_weight(self):
            return self.w

    g = torch.Generator().manual_seed(0)
    labels = torch.full((b, s), -100)
    flat = labels.t().reshape(-1)
    flat[torch.randperm(s * b, generator=g)[:n_rows_labelled]] = torch.randint(0, vocab, (n_rows_labelled,), generator=g)
    labels = flat.view(s, b).t().contiguous()
    out = []
    for rows in (torch.arange(s * b), None):
        hidden_states = torch.randn(s, b, hidden, generator=g, requires_grad=True)
        weight = torch.randn(vocab, hidden, generator=g, requires_grad=True)
        with FlopCounterMode(display=False) as counter:
            sequence_logprobs(Head(weight), hidden_states, labels, vocab, impl, rows).sum().backward()
        out.append(counter.get_total_flops())
    return out[0], out[1]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lengths", type=Path, help="JSON lines of {prompt, chosen, rejected} token counts")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "response_rows_cpu.json")
    args = parser.parse_args(argv)

    from spin_mega.parallel import distributed

    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(distributed.free_port()))
    distributed.initialize()

    results = []
    prompt, response = demo_lengths()
    # The demo's rejected responses are the model's own completions of the same templates; counted here
    # with the human response's length.
    before, now = micro_batch_rows(prompt, response, response, micro_batch_size=4)
    results.append(compare("demo (tiny-cpu: H 256, V 512, 4 pairs per micro-batch)", before, now, 256, 512))

    # torch's FLOP counter on the real code, at the demo's mean shape: the output-layer FLOPs scale with the
    # rows kept (it does not see the out= / in-place GEMMs of the fused backward, so it is used for the
    # ratio only).
    s, b = int(np.ceil((prompt.mean() + response.mean()) / 8) * 8), 8
    labelled = int(round(response.mean() * b))
    for impl in ("fused_linear", "triton"):
        full, gathered = measured_gemm_flops(labelled, s, b, 256, 512, impl)
        results.append({
            "case": f"FLOP counter, sequence_logprobs[{impl}] fwd+bwd, s={s} b={b}",
            "flops_all_rows": full, "flops_labelled_rows": gathered,
            "flop_ratio": gathered / full, "row_ratio": labelled / (s * b),
        })

    if args.lengths:
        rows = [json.loads(line) for line in args.lengths.read_text().splitlines() if line.strip()]
        p, c, r = (np.asarray([row[k] for row in rows]) for k in ("prompt", "chosen", "rejected"))
        before, now = micro_batch_rows(p, c, r, micro_batch_size=1)
        results.append(compare(f"7B recipe on {args.lengths.name}", before, now, 4096, 32000))
    else:
        for p in (128, 256, 512, 1024):
            for c in (128, 256, 512):
                n = np.full(64, p)
                before, now = micro_batch_rows(n, np.full(64, c), np.full(64, 256), micro_batch_size=1)
                results.append(compare(f"7B recipe, prompt {p}, chosen {c}, rejected 256 (per 64-pair step)", before, now, 4096, 32000))

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"device": "cpu (counted, not timed)", "results": results}, indent=1) + "\n")
    for r in results:
        if "fraction_saved" in r:
            print(f"{r['case']}: rows {r['rows_before']} -> {r['rows_now']} ({100 * r['fraction_saved']:.1f}% saved), "
                  f"GEMM {r['gemm_tflops_saved_unfused']:.4g} TFLOP saved unfused / {r['gemm_tflops_saved_fused']:.4g} fused, "
                  f"logits traffic {r['logits_gb_saved']:.4g} GB saved")
        else:
            print(f"{r['case']}: {r['flops_all_rows']:.4g} -> {r['flops_labelled_rows']:.4g} FLOPs "
                  f"(ratio {r['flop_ratio']:.4f}; rows kept {r['row_ratio']:.4f})")
    distributed.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
