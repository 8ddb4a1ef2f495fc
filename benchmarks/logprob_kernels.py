#!/usr/bin/env python
"""Benchmark of spin_mega.kernels' per-token log-prob kernels against PyTorch eager, torch.compile and
Liger-Kernel, and of the fused-linear path against lm-head matmul + the unfused kernels.

GPU (one command):  python benchmarks/logprob_kernels.py --out benchmarks/results/
    bf16 logits, N in {4096, 16384, 32768} x V in {32000, 128256, 151936}: forward, backward and
    forward+backward time (CUDA events, median of repeats), achieved GB/s and % of the nominal HBM
    bandwidth, peak memory; fused-linear at H=4096.
CPU: the same script on small shapes (N=256, V in {4096, 8192}, H=256), through the PyTorch fallback by
    default (logprob_kernels_cpu.json) or Triton's interpreter with --interpret (a correctness-only path,
    minutes; logprob_kernels_cpu-triton-interpreter.json); the device is recorded as CPU and the figures
    are not GPU performance (no roofline is computed).

Bytes model (DESIGN.md), for bf16 logits [N, V]: forward reads them once, 2*N*V bytes; backward reads
them and writes the gradient, 4*N*V; forward+backward 6*N*V, since spin_mega computes the gradient in
the backward pass (the upstream per-token gradient is only known then). Designs that compute the
gradient inside the forward pass (Liger) have a 4*N*V floor for forward+backward; the JSON reports the
6*N*V-model bandwidth for every implementation and the 4*N*V floor percentage beside it.
Writes benchmarks/results/logprob_kernels_<device>.json and .png.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import re
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

IGNORE = -100
GPU_TOKENS = (4096, 16384, 32768)
GPU_VOCABS = (32000, 128256, 151936)
GPU_FUSED_SHAPES = ((4096, 128256), (16384, 128256), (16384, 32000))  # (N, V) at H = 4096
GPU_HIDDEN = 4096
CPU_TOKENS = (256,)
CPU_VOCABS = (4096, 8192)
CPU_FUSED_SHAPES = ((256, 4096),)
CPU_HIDDEN = 256
H100_BF16_DENSE_TFLOPS = 989.0

# Nominal HBM bandwidth (bytes/s) by device-name fragment, most specific first (vendor data sheets).
NOMINAL_HBM_BANDWIDTH = (
    ("H100 PCIe", 2.0e12),
    ("H100 NVL", 3.9e12),
    ("H100", 3.35e12),
    ("H200", 4.8e12),
    ("GH200", 4.0e12),
    ("B200", 8.0e12),
    ("A100-SXM4-80GB", 2.039e12),
    ("A100 80GB", 1.935e12),
    ("A100", 1.555e12),
    ("L40S", 0.864e12),
)


@dataclass
class Measurement:
    section: str
    impl: str
    n_tokens: int
    vocab: int
    hidden: int | None = None
    fwd_ms: float | None = None
    bwd_ms: float | None = None
    fwd_bwd_ms: float | None = None
    # The first call of each timed function, apart from the warm-up and the median: torch.compile's and
    # Triton's cold compiles land here, so a slow compile shows as such and never as a slow kernel.
    first_call_ms: dict[str, float] = field(default_factory=dict)
    fwd_gbps: float | None = None
    bwd_gbps: float | None = None
    fwd_bwd_gbps: float | None = None
    fwd_roofline_pct: float | None = None
    bwd_roofline_pct: float | None = None
    fwd_bwd_roofline_pct: float | None = None
    fwd_bwd_pct_of_4nv_floor: float | None = None
    fwd_bwd_model_tflops: float | None = None
    peak_extra_bytes_fwd_bwd: int | None = None
    peak_extra_bytes_fwd: int | None = None
    max_abs_diff_vs_eager: float | None = None
    error: str | None = None
    notes: list[str] = field(default_factory=list)


# ----------------------------------------------------------------------------------------------- timing


class Clock:
    """Median wall time of a callable: CUDA events on GPU (kernel time, no host jitter), perf_counter on CPU."""

    def __init__(self, device: torch.device, warmup: int, repeats: int) -> None:
        self.device, self.warmup, self.repeats = device, warmup, repeats

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def median_ms(
        self, run: Callable[[object], None], setup: Callable[[], object] = lambda: None, first_call: dict | None = None, label: str = ""
    ) -> float:
        """Median of `repeats` timed runs after `warmup` untimed ones; the very first run's time goes to
        first_call[label] (it pays any compile)."""
        samples = []
        for i in range(1 + self.warmup + self.repeats):
            state = setup()
            self._sync()
            if self.device.type == "cuda":
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                run(state)
                end.record()
                torch.cuda.synchronize()
                elapsed = start.elapsed_time(end)
            else:
                t0 = time.perf_counter()
                run(state)
                elapsed = (time.perf_counter() - t0) * 1e3
            if i == 0 and first_call is not None:
                first_call[label] = round(elapsed, 3)
            if i > self.warmup:
                samples.append(elapsed)
            del state
        return statistics.median(samples)

    def peak_extra_bytes(self, run: Callable[[object], None], setup: Callable[[], object] = lambda: None) -> int | None:
        """Peak allocation above what was live before `run` (inputs and setup excluded); GPU only."""
        if self.device.type != "cuda":
            return None
        state = setup()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        run(state)
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - before
        del state
        return int(peak)


# --------------------------------------------------------------------------------------- implementations


def eager_token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """The textbook path: upcast, log_softmax over V, gather the label, mask ignored tokens."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    picked = logprobs.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return picked.masked_fill(labels == IGNORE, 0.0)


def _liger_token_logprobs() -> tuple[Callable | None, Callable | None, str | None]:
    """Liger's cross-entropy and fused-linear cross-entropy with reduction='none' (log-prob = -loss),
    when liger_kernel is importable; its per-token losses come back in the input dtype."""
    try:
        from liger_kernel.transformers import LigerCrossEntropyLoss, LigerFusedLinearCrossEntropyLoss
    except ImportError as err:
        return None, None, f"liger_kernel not importable: {err}"
    ce = LigerCrossEntropyLoss(ignore_index=IGNORE, reduction="none")
    flce = LigerFusedLinearCrossEntropyLoss(ignore_index=IGNORE, reduction="none")
    return (lambda logits, labels: -ce(logits, labels)), (lambda h, w, labels: -flce(w, h, labels)), None


# ------------------------------------------------------------------------------------------- benchmarks


def _gbps(nbytes: float, ms: float | None) -> float | None:
    return None if ms is None else nbytes / (ms * 1e-3) / 1e9


def _pct(gbps: float | None, peak: float | None) -> float | None:
    return None if gbps is None or peak is None else 100.0 * gbps * 1e9 / peak


def _is_oom(err: BaseException) -> bool:
    oom = getattr(torch, "OutOfMemoryError", getattr(torch.cuda, "OutOfMemoryError", RuntimeError))
    return isinstance(err, oom) or "out of memory" in str(err).lower()


def bench_logprobs(
    clock: Clock, device: torch.device, n: int, v: int, impls: dict[str, Callable], peak_bw: float | None,
    record: Callable[[Measurement], None] = lambda m: None,
) -> list[Measurement]:
    gen = torch.Generator(device=device).manual_seed(0)
    logits = torch.randn(n, v, device=device, dtype=torch.bfloat16, generator=gen)
    # Every token scored: ignored rows are skipped by the kernel and would inflate the bandwidth.
    labels = torch.randint(v, (n,), device=device, generator=gen)
    grad_out = torch.randn(n, device=device, generator=gen)
    results = []
    eager_out = None
    for name, fn in impls.items():
        m = Measurement(section="logprobs", impl=name, n_tokens=n, vocab=v)
        try:
            # A fresh leaf per run, made outside the timed region: the in-place variants (ours with
            # inplace_backward, Liger in its forward) overwrite their input, which must not leak into
            # the next run.
            def fresh_leaf() -> torch.Tensor:
                return logits.clone().requires_grad_()

            def fresh_graph() -> torch.Tensor:
                return fn(fresh_leaf(), labels)

            def fwd(x: torch.Tensor) -> None:
                with torch.no_grad():
                    fn(x, labels)

            def bwd(out: torch.Tensor) -> None:
                out.backward(grad_out)

            def fwd_bwd(x: torch.Tensor) -> None:
                fn(x, labels).backward(grad_out)

            m.fwd_ms = clock.median_ms(fwd, fresh_leaf, m.first_call_ms, "fwd")
            m.bwd_ms = clock.median_ms(bwd, fresh_graph, m.first_call_ms, "bwd")
            m.fwd_bwd_ms = clock.median_ms(fwd_bwd, fresh_leaf, m.first_call_ms, "fwd_bwd")
            m.peak_extra_bytes_fwd = clock.peak_extra_bytes(fwd, fresh_leaf)
            m.peak_extra_bytes_fwd_bwd = clock.peak_extra_bytes(fwd_bwd, fresh_leaf)
            with torch.no_grad():
                value = fn(logits.clone(), labels).float()
            if name == "torch_eager":
                eager_out = value
            elif eager_out is not None:
                m.max_abs_diff_vs_eager = float((value - eager_out).abs().max())
        except Exception as err:  # one failing baseline (OOM, missing compiler) must not lose the others
            m.error = "out of memory" if _is_oom(err) else f"{type(err).__name__}: {err}"[:300]
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()
        nv = n * v
        m.fwd_gbps, m.bwd_gbps, m.fwd_bwd_gbps = _gbps(2 * nv, m.fwd_ms), _gbps(4 * nv, m.bwd_ms), _gbps(6 * nv, m.fwd_bwd_ms)
        m.fwd_roofline_pct, m.bwd_roofline_pct = _pct(m.fwd_gbps, peak_bw), _pct(m.bwd_gbps, peak_bw)
        m.fwd_bwd_roofline_pct = _pct(m.fwd_bwd_gbps, peak_bw)
        m.fwd_bwd_pct_of_4nv_floor = _pct(_gbps(4 * nv, m.fwd_bwd_ms), peak_bw)
        if name == "liger_ce":
            m.notes.append("Liger writes its gradient into the logits during forward (grad-in-forward, 4NV floor)")
        results.append(m)
        record(m)
        print(_summary(m), flush=True)
    return results


def bench_fused_linear(
    clock: Clock, device: torch.device, n: int, v: int, h: int, impls: dict[str, Callable],
    record: Callable[[Measurement], None] = lambda m: None,
) -> list[Measurement]:
    gen = torch.Generator(device=device).manual_seed(1)
    hidden = torch.randn(n, h, device=device, dtype=torch.bfloat16, generator=gen)
    weight = (torch.randn(v, h, device=device, generator=gen) * h**-0.5).to(torch.bfloat16)
    labels = torch.randint(v, (n,), device=device, generator=gen)
    grad_out = torch.randn(n, device=device, generator=gen)
    results = []
    for name, fn in impls.items():
        m = Measurement(section="fused_linear", impl=name, n_tokens=n, vocab=v, hidden=h)
        try:
            def fresh_leaves() -> tuple[torch.Tensor, torch.Tensor]:
                return hidden.clone().requires_grad_(), weight.clone().requires_grad_()

            def fwd(leaves: tuple[torch.Tensor, torch.Tensor]) -> None:
                with torch.no_grad():
                    fn(*leaves, labels)

            def fwd_bwd(leaves: tuple[torch.Tensor, torch.Tensor]) -> None:
                fn(*leaves, labels).backward(grad_out)

            m.fwd_ms = clock.median_ms(fwd, fresh_leaves, m.first_call_ms, "fwd")
            m.fwd_bwd_ms = clock.median_ms(fwd_bwd, fresh_leaves, m.first_call_ms, "fwd_bwd")
            m.peak_extra_bytes_fwd = clock.peak_extra_bytes(fwd, fresh_leaves)
            m.peak_extra_bytes_fwd_bwd = clock.peak_extra_bytes(fwd_bwd, fresh_leaves)
            # Useful work of one forward+backward: 3 lm-head-sized matmuls (logits, d hidden, d weight).
            m.fwd_bwd_model_tflops = 6 * n * v * h / (m.fwd_bwd_ms * 1e-3) / 1e12
        except Exception as err:
            m.error = "out of memory" if _is_oom(err) else f"{type(err).__name__}: {err}"[:300]
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()
        if name == "fused_spin_mega":
            m.notes.append("4 matmuls: the backward recomputes each vocabulary chunk's logits")
        results.append(m)
        record(m)
        print(_summary(m), flush=True)
    return results


def _summary(m: Measurement) -> str:
    if m.error:
        return f"  {m.section:12s} {m.impl:24s} N={m.n_tokens:6d} V={m.vocab:6d}  ERROR {m.error}"
    parts = [f"fwd {m.fwd_ms:9.3f} ms", f"fwd+bwd {m.fwd_bwd_ms:9.3f} ms",
             f"first call {max(m.first_call_ms.values(), default=0.0):9.1f} ms"]
    if m.bwd_ms is not None:
        parts.insert(1, f"bwd {m.bwd_ms:9.3f} ms")
    if m.fwd_bwd_roofline_pct is not None:
        parts.append(f"{m.fwd_bwd_gbps:7.1f} GB/s ({m.fwd_bwd_roofline_pct:5.1f}% HBM)")
    if m.peak_extra_bytes_fwd_bwd is not None:
        parts.append(f"peak +{m.peak_extra_bytes_fwd_bwd / 2**30:.2f} GiB")
    return f"  {m.section:12s} {m.impl:24s} N={m.n_tokens:6d} V={m.vocab:6d}  " + "  ".join(parts)


# ------------------------------------------------------------------------------------------------ output


def _device_info(device: torch.device, peak_override: float | None) -> tuple[dict, str, float | None]:
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak, source = peak_override, "--peak-bw-tbs"
        if peak is None:
            peak = next((bw for frag, bw in NOMINAL_HBM_BANDWIDTH if frag.lower() in name.lower()), None)
            source = "nominal data-sheet HBM bandwidth" if peak else "unknown device: no roofline"
        slug = re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
        props = torch.cuda.get_device_properties(device)
        info = {"kind": "cuda", "name": name, "memory_bytes": props.total_memory,
                "peak_hbm_bytes_per_s": peak, "peak_source": source}
        return info, slug, peak
    info = {"kind": "cpu", "name": f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
            "peak_hbm_bytes_per_s": None, "peak_source": "CPU run: no HBM roofline; not GPU performance"}
    return info, "cpu", None


def _versions() -> dict:
    versions = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    try:
        import triton

        versions["triton"] = triton.__version__
    except ImportError:
        versions["triton"] = None
    try:
        from importlib.metadata import version

        versions["liger_kernel"] = version("liger-kernel")
    except Exception:
        versions["liger_kernel"] = None
    return versions


def _plot(results: list[Measurement], title: str, path: Path, gpu: bool) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("logprobs", "fwd_bwd_ms", "fwd+bwd time (ms)"), ("fused_linear", "fwd_bwd_ms", "fwd+bwd time (ms)")]
    if gpu:
        panels = [
            ("logprobs", "fwd_bwd_roofline_pct", "fwd+bwd, % of nominal HBM roofline (6NV bytes)"),
            ("logprobs", "peak_extra_bytes_fwd_bwd", "fwd+bwd peak extra memory (GiB)"),
            ("fused_linear", "fwd_bwd_ms", "fwd+bwd time (ms)"),
            ("fused_linear", "peak_extra_bytes_fwd_bwd", "fwd+bwd peak extra memory (GiB)"),
        ]
    fig, axes = plt.subplots(len(panels) // 2, 2, figsize=(16, 5.5 * (len(panels) // 2)), squeeze=False)
    for ax, (section, metric, label) in zip(axes.flat, panels):
        rows = [m for m in results if m.section == section]
        shapes = sorted({(m.n_tokens, m.vocab) for m in rows})
        impls = list(dict.fromkeys(m.impl for m in rows))
        width = 0.8 / max(len(impls), 1)
        for i, impl in enumerate(impls):
            values = []
            for shape in shapes:
                match = next((m for m in rows if m.impl == impl and (m.n_tokens, m.vocab) == shape), None)
                value = getattr(match, metric) if match and not match.error else None
                if value is not None and metric.startswith("peak"):
                    value /= 2**30
                values.append(math.nan if value is None else value)
            ax.bar([s + i * width for s in range(len(shapes))], values, width, label=impl)
        ax.set_xticks([s + 0.4 - width / 2 for s in range(len(shapes))])
        ax.set_xticklabels([f"N={n}\nV={v}" for n, v in shapes], fontsize=8)
        ax.set_ylabel(label)
        hidden = next((m.hidden for m in rows if m.hidden), None)
        ax.set_title(f"{section}, bf16" + (f", H={hidden}" if hidden else "") + " (missing bar: error/OOM, see JSON)")
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -------------------------------------------------------------------------------------------------- main


def _make_kernels_importable() -> None:
    """Let a bare checkout (e.g. a fresh GPU machine) run this script without `pip install -e .`:
    the installed package maps kernels/ to spin_mega.kernels, and so does adding the repository root to
    the spin_mega package's search path."""
    try:
        import spin_mega.kernels  # noqa: F401

        return
    except ModuleNotFoundError:
        pass
    repo = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(repo))
    import spin_mega

    spin_mega.__path__.append(str(repo))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results"), help="directory for the JSON and PNG")
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    parser.add_argument("--interpret", action="store_true",
                        help="CPU only: run the Triton kernels through Triton's interpreter instead of the PyTorch fallback")
    parser.add_argument("--warmup", type=int, default=None, help="untimed runs per measurement (default 3 GPU, 1 CPU)")
    parser.add_argument("--repeats", type=int, default=None, help="timed runs per measurement (default 10 GPU, 3 CPU)")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile baseline")
    parser.add_argument("--cpu-threads", type=int, default=1,
                        help="CPU runs: intra-op threads (default 1: on a shared box, spinning OpenMP workers "
                        "waiting on a descheduled peer inflate timings tenfold)")
    parser.add_argument("--peak-bw-tbs", type=float, default=None, help="HBM bandwidth in TB/s for the roofline")
    parser.add_argument("--tokens", type=int, nargs="+", default=None, help="N values (default: the device's set)")
    parser.add_argument("--vocabs", type=int, nargs="+", default=None, help="V values (default: the device's set)")
    parser.add_argument("--fused-shapes", nargs="*", default=None, metavar="NxV",
                        help="fused-linear shapes as NxV (default: the device's set; none: skip the section)")
    parser.add_argument("--hidden", type=int, default=None, help="fused-linear hidden size H")
    parser.add_argument("--sections", nargs="+", choices=("logprobs", "fused_linear"), default=("logprobs", "fused_linear"))
    parser.add_argument("--compile-backend", default="inductor",
                        help="torch.compile backend of the compiled baseline (aot_eager traces without code generation)")
    parser.add_argument("--json", type=Path, default=None, help="write the JSON here instead of --out/logprob_kernels_<device>.json")
    parser.add_argument("--no-plot", action="store_true")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    want_cuda = args.device == "cuda" or (args.device == "auto" and torch.cuda.is_available())
    if want_cuda and not torch.cuda.is_available():
        print("--device cuda was asked for but no CUDA device is visible", file=sys.stderr)
        return 2
    if args.interpret and want_cuda:
        print("--interpret is for CPU runs; GPU runs use compiled Triton", file=sys.stderr)
        return 2
    if args.interpret:
        # Must precede the first import of spin_mega.kernels: @triton.jit reads it at definition time.
        os.environ["TRITON_INTERPRET"] = "1"
    _make_kernels_importable()
    from spin_mega.kernels import backend_for, fused_linear_token_logprobs, token_logprobs

    device = torch.device("cuda" if want_cuda else "cpu")
    if not want_cuda:
        torch.set_num_threads(args.cpu_threads)
    warmup = args.warmup if args.warmup is not None else (3 if want_cuda else 1)
    # The interpreter runs every Triton op as a numpy call: seconds per call, so fewer repeats.
    repeats = args.repeats if args.repeats is not None else (10 if want_cuda else 2 if args.interpret else 5)
    clock = Clock(device, warmup, repeats)
    device_info, slug, peak_bw = _device_info(device, None if args.peak_bw_tbs is None else args.peak_bw_tbs * 1e12)
    ours = {"triton": "triton-interpreter" if args.interpret else "triton-compiled", "torch": "pytorch-fallback"}[
        backend_for(torch.zeros(1, device=device))
    ]
    print(f"device: {device_info['name']}; spin_mega path: {ours}", flush=True)

    liger_ce, liger_flce, liger_note = _liger_token_logprobs()
    impls: dict[str, Callable] = {
        "torch_eager": eager_token_logprobs,
        "spin_mega": lambda x, y: token_logprobs(x, y),
        "spin_mega_inplace_bwd": lambda x, y: token_logprobs(x, y, inplace_backward=True),
    }
    if not args.no_compile:
        impls["torch_compile"] = torch.compile(eager_token_logprobs, backend=args.compile_backend)
    if liger_ce is not None:
        impls["liger_ce"] = liger_ce

    def unfused(lp_fn: Callable) -> Callable:
        return lambda h, w, y: lp_fn(h @ w.T, y)

    fused_impls: dict[str, Callable] = {
        "fused_spin_mega": lambda h, w, y: fused_linear_token_logprobs(h, w, y),
        "matmul+spin_mega_inplace": unfused(lambda x, y: token_logprobs(x, y, inplace_backward=True)),
        "matmul+torch_eager": unfused(eager_token_logprobs),
    }
    if "torch_compile" in impls:
        fused_impls["matmul+torch_compile"] = unfused(impls["torch_compile"])
    if liger_flce is not None:
        fused_impls["liger_fused_linear_ce"] = liger_flce

    tokens, vocabs = (GPU_TOKENS, GPU_VOCABS) if want_cuda else (CPU_TOKENS, CPU_VOCABS[:1] if args.interpret else CPU_VOCABS)
    fused_shapes, hidden = (GPU_FUSED_SHAPES, GPU_HIDDEN) if want_cuda else (CPU_FUSED_SHAPES, CPU_HIDDEN)
    tokens, vocabs, hidden = args.tokens or tokens, args.vocabs or vocabs, args.hidden or hidden
    if args.fused_shapes is not None:
        fused_shapes = tuple(tuple(int(x) for x in shape.lower().split("x")) for shape in args.fused_shapes)
    started = time.perf_counter()
    load_start = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    results: list[Measurement] = []
    if args.interpret:
        slug += "-triton-interpreter"
    json_path = args.json or args.out / f"logprob_kernels_{slug}.json"
    png_path = json_path.with_suffix(".png")
    json_path.parent.mkdir(parents=True, exist_ok=True)

    def record(m: Measurement) -> None:
        """Rewrites the results file after every measurement, so a time limit keeps each one already taken."""
        results.append(m)
        tmp = json_path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(report(), indent=2) + "\n")
        tmp.replace(json_path)

    work = []
    if "logprobs" in args.sections:
        work += [lambda n=n, v=v: bench_logprobs(clock, device, n, v, impls, peak_bw, record) for v in vocabs for n in tokens]
    if "fused_linear" in args.sections:
        work += [lambda n=n, v=v: bench_fused_linear(clock, device, n, v, hidden, fused_impls, record) for n, v in fused_shapes]

    notes = [
        "bytes model: forward 2NV, backward 4NV, forward+backward 6NV bytes of bf16 logits (spin_mega computes "
        "the gradient in backward); fwd_bwd_pct_of_4nv_floor uses the 4NV grad-in-forward floor",
        "forward is timed under torch.no_grad() (the precompute / reference-model case); backward and "
        "forward+backward with autograd and an arbitrary per-token upstream gradient",
        "peak_extra_bytes_*: peak allocation above the inputs already resident (GPU only)",
        "labels: every token scored (ignored tokens would be skipped by the kernel and inflate GB/s)",
        f"spin_mega path: {ours}",
    ]
    if want_cuda and peak_bw:
        notes.append(f"roofline percentages against the nominal {peak_bw / 1e12:.2f} TB/s, not a measured copy bandwidth")
        notes.append(f"fused-linear model TFLOP/s = 6NVH / time; compare with the nominal {H100_BF16_DENSE_TFLOPS:.0f} TFLOP/s bf16 dense of an H100")
    if not want_cuda:
        notes.append(
            f"CPU run: small shapes, {torch.get_num_threads()} intra-op thread(s), timings with perf_counter on a "
            "shared machine; never quote as GPU performance"
        )
    if liger_note:
        notes.append(liger_note)
    def report() -> dict:
        return {
            "benchmark": "logprob_kernels",
            "device": device_info,
            "versions": _versions(),
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "spin_mega_path": ours,
            "timing": f"{'CUDA events' if want_cuda else 'time.perf_counter'}, median of {repeats} after the first call "
                      f"(first_call_ms: cold compiles) and {warmup} more warm-up",
            "dtype": "bfloat16",
            "wall_seconds": round(time.perf_counter() - started, 1),
            # Other jobs share the CPU box; a load above its core count makes CPU timings noisy.
            "host_load_average_1m": {"start": load_start, "end": os.getloadavg()[0]} if hasattr(os, "getloadavg") else None,
            "notes": notes,
            "results": [asdict(m) for m in results],
        }

    for shape in work:
        shape()
    if not args.no_plot:
        _plot(results, f"spin_mega log-prob kernels on {device_info['name']} (spin_mega path: {ours})", png_path, gpu=want_cuda)
    print(f"wrote {json_path} in {time.perf_counter() - started:.1f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
