#!/usr/bin/env python
"""The prepared GPU benchmark run: every step in its own process under its own timeout, results written
after each step, so that a crash or a timeout in one step keeps the steps before it.

    python benchmarks/gpu/run.py [--out DIR] [--only STEP ...]    # on the GPU (run.sh installs first)
    python benchmarks/gpu/run.py --smoke --out DIR                # CPU, tiny shapes: CI runs this

Steps (GPU shapes; the smoke mode runs the same scripts on tiny shapes):
  environment      device, driver, versions, the nominal peaks the figures are quoted against
  preflight        `spin-mega env --check`: every CUDA-only call once, one line each (ok / failed: why /
                   not run here: why), before any figure is measured (spin_mega/commands/preflight.py)
  logprob_kernels  benchmarks/logprob_kernels.py: bf16 logits, N in {16384, 4096} x V in {32000, 128256,
                   152064}; forward and forward+backward of spin_mega's kernels against PyTorch eager,
                   torch.compile and Liger-Kernel; % of the nominal HBM bandwidth
  fused_linear     the same script: the fused linear + log-prob path against lm-head matmul + kernel
                   (time, peak memory), H = 4096
  train_step       benchmarks/train_step.py: a Llama-3.2-1B-shaped model initialised in memory, sequence
                   length 2048, both opponent modes (tokens/s, MFU against the nominal bf16 peak, peak
                   GPU memory); nothing is saved
  packing          benchmarks/packing.py: the same model, packed against padded steps on the same pairs
                   (UltraChat-like lengths at the paper's limits), ratio of real tokens/s, padding fractions

Every step counts its warm-up (cold torch.compile and Triton compiles, the first training steps) apart
from its timed figures, and rewrites its results file as soon as each figure exists: a step stopped by its
time limit keeps what it measured.

Writes OUT/gpu_run_<device>.json and .md (default OUT: benchmarks/results), plus each step's own JSON
under OUT/gpu_run_<device>_steps/. Exit status: 0 when every step passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BENCH = REPO / "benchmarks"

# Nominal data-sheet peaks the figures are quoted against: (name fragment, HBM bytes/s, dense bf16 FLOP/s),
# most specific first. Measured ceilings are lower (an H100's copy ~3.0 TB/s, its 8192^3 matmul ~800 TFLOP/s).
NOMINAL_PEAKS = (
    ("H100 PCIe", 2.0e12, 756e12, "H100 PCIe"),
    ("H100 NVL", 3.9e12, 835e12, "H100 NVL"),
    ("H100", 3.35e12, 989e12, "H100 SXM"),
    ("GH200", 4.0e12, 989e12, "GH200"),
    ("H200", 4.8e12, 989e12, "H200"),
    ("B200", 8.0e12, 2250e12, "B200"),
    ("A100-SXM4-80GB", 2.04e12, 312e12, "A100 SXM 80GB"),
    ("A100 80GB", 2.04e12, 312e12, "A100 80GB"),
    ("A100", 1.555e12, 312e12, "A100 40GB"),
)

STEP_NAMES = ("environment", "preflight", "logprob_kernels", "fused_linear", "train_step", "packing")


def nominal_peaks(device_name: str) -> dict:
    for fragment, bandwidth, flops, label in NOMINAL_PEAKS:
        if fragment.lower() in device_name.lower():
            return {"name": label, "hbm_bytes_per_s": bandwidth, "bf16_flops": flops, "source": "nominal data sheet"}
    return {"name": None, "hbm_bytes_per_s": None, "bf16_flops": None, "source": f"no nominal peak known for {device_name!r}"}


# ------------------------------------------------------------------------------------ the step processes


def environment(path: Path) -> None:
    """Device, driver and versions; importing every carried package here makes a failed install show up in
    the first seconds, not in the middle of the training step."""
    from importlib.metadata import PackageNotFoundError, version

    import torch

    record: dict = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    for dist in ("triton", "transformers", "megatron-core", "datasets", "liger-kernel", "nvidia-ml-py", "spin-mega"):
        try:
            record[dist] = version(dist)
        except PackageNotFoundError:
            record[dist] = None
    imports = {}
    for module in ("megatron.core", "datasets", "liger_kernel", "spin_mega.kernels", "spin_mega.training.trainer"):
        try:
            __import__(module)
            imports[module] = "ok"
        except Exception as err:  # recorded, not fatal: a step that needs it fails on its own
            imports[module] = f"{type(err).__name__}: {err}"[:200]
    record["imports"] = imports
    try:
        record["git_commit"] = subprocess.run(
            ["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        ).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        record["git_commit"] = None
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        device = {"kind": "cuda", "name": props.name, "memory_bytes": props.total_memory,
                  "multiprocessors": props.multi_processor_count, "capability": f"{props.major}.{props.minor}",
                  "count": torch.cuda.device_count()}
        try:
            import pynvml

            pynvml.nvmlInit()
            driver = pynvml.nvmlSystemGetDriverVersion()
            device["driver"] = driver.decode() if isinstance(driver, bytes) else driver
        except Exception as err:
            device["driver"] = f"unknown ({type(err).__name__})"
        peaks = nominal_peaks(props.name)
    else:
        device = {"kind": "cpu", "name": f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
                  "driver": None}
        peaks = {"name": None, "hbm_bytes_per_s": None, "bf16_flops": None,
                 "source": "CPU run: no roofline; these figures are not GPU performance"}
    _write_json(path, {"device": device, "versions": record, "peaks": peaks})


def injected(kind: str) -> None:
    """Failures injected by tests, to show that the run keeps what the steps before had written."""
    print(f"injected failure: {kind}", file=sys.stderr, flush=True)
    if kind == "crash":
        os.abort()
    if kind == "hang":
        time.sleep(3600)
    if kind == "kill-run":
        # The whole run dies (the device tool's limit, a lost machine): only what is on disk survives.
        os.kill(int(os.environ["SPIN_MEGA_BENCH_RUN_PID"]), signal.SIGKILL)
        time.sleep(60)


# ------------------------------------------------------------------------------------------ the plan


def step_commands(smoke: bool, steps_dir: Path) -> list[tuple[str, list[str], int]]:
    """(name, command, timeout in seconds) of each step. GPU timeouts sum to 440 s, 530 s with the packing step:
    with run.sh's install (under a minute), within the 10 minutes one device command may run (15 minutes in all,
    a machine's start of 3-4 minutes included). Typical times are well under the limits; the limits bound a hang."""
    py = sys.executable
    kernels = [py, str(BENCH / "logprob_kernels.py"), "--no-plot"]
    if smoke:
        # aot_eager: torch.compile traces the baseline without the minutes of C++ code generation on CPU.
        kernels += ["--device", "cpu", "--warmup", "0", "--repeats", "1", "--compile-backend", "aot_eager"]
        logprobs = ["--tokens", "64", "--vocabs", "512", "1024"]
        fused = ["--fused-shapes", "64x512", "--hidden", "64"]
        train = ["--shape", "tiny", "--seq-len", "128", "--steps", "2", "--warmup", "1", "--micro-batch", "2", "--global-batch", "4"]
        # Generous: CI machines are shared, and a smoke run checks that the steps work, not how fast.
        timeouts = {"environment": 120, "preflight": 600, "logprob_kernels": 240, "fused_linear": 240, "train_step": 480}
    else:
        kernels += ["--device", "cuda"]
        # Most important shape first: a timeout then loses the least (the script writes after every shape).
        logprobs = ["--tokens", "16384", "4096", "--vocabs", "128256", "32000", "152064"]
        fused = ["--fused-shapes", "16384x128256", "4096x128256", "16384x32000", "--hidden", "4096"]
        # 8 pairs of 2 x 2048 tokens per optimizer step; 2 warm-up steps reported apart, 3 timed.
        train = ["--shape", "1b", "--seq-len", "2048", "--steps", "5", "--warmup", "2", "--micro-batch", "2", "--global-batch", "8"]
        timeouts = {"environment": 30, "preflight": 150, "logprob_kernels": 110, "fused_linear": 50, "train_step": 100}
    return [
        ("environment", [py, __file__, "--environment", str(steps_dir / "environment.json")], timeouts["environment"]),
        ("preflight", [py, "-m", "spin_mega", "env", "--check", "--json", str(steps_dir / "preflight.json")], timeouts["preflight"]),
        ("logprob_kernels", kernels + ["--sections", "logprobs", *logprobs, "--json", str(steps_dir / "logprob_kernels.json")],
         timeouts["logprob_kernels"]),
        ("fused_linear", kernels + ["--sections", "fused_linear", *fused, "--json", str(steps_dir / "fused_linear.json")],
         timeouts["fused_linear"]),
        ("train_step", [py, str(BENCH / "train_step.py"), *train, "--json", str(steps_dir / "train_step.json")],
         timeouts["train_step"]),
        packing_step(smoke, steps_dir),
    ]


def packing_step(smoke: bool, steps_dir: Path) -> tuple[str, list[str], int]:
    """Packed against padded SPIN steps (benchmarks/packing.py), its own step so that it runs, times out or
    fails on its own. GPU: the 1B shape in bf16 at the paper's lengths (prompt 512, sequence 1024, replies
    256), 32 pairs a step, 4 timed steps per layout after 2 of warm-up, in 90 s."""
    script = [sys.executable, str(BENCH / "packing.py"), "--json", str(steps_dir / "packing.json")]
    if smoke:
        return "packing", script + ["--shape", "tiny", "--scale", "8", "--steps", "1", "--warmup", "1",
                                    "--global-batch", "8", "--micro-batch", "2"], 480
    return "packing", script + ["--shape", "1b", "--scale", "1", "--steps", "4", "--warmup", "2",
                                "--global-batch", "32", "--micro-batch", "2"], 90


def run_step(name: str, command: list[str], timeout_s: int, out_json: Path) -> dict:
    # coreutils timeout: TERM at the limit, KILL 10 s later; it exits 124 on a timeout.
    started = time.perf_counter()
    proc = subprocess.run(
        ["timeout", "--kill-after=10", str(timeout_s), *command], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        text=True, errors="replace", env={**os.environ, "PYTHONUNBUFFERED": "1", "SPIN_MEGA_BENCH_RUN_PID": str(os.getpid())},
    )
    seconds = time.perf_counter() - started
    if proc.returncode == 0:
        status = "ok"
    elif proc.returncode in (124, 137) and seconds >= timeout_s:
        status = f"timed out after {timeout_s} s"
    elif proc.returncode < 0 or proc.returncode > 128:  # timeout(1) re-raises its child's signal on itself
        status = f"killed by signal {abs(proc.returncode) % 128}"
    else:
        status = f"failed with exit status {proc.returncode}"
    print(proc.stdout, end="", flush=True)
    result = None
    if out_json.is_file():  # also what a step stopped midway had written (the kernel script writes per shape)
        try:
            result = json.loads(out_json.read_text())
        except json.JSONDecodeError:
            result = None
    return {"name": name, "status": status, "exit_status": proc.returncode, "seconds": round(seconds, 1),
            "timeout_s": timeout_s, "command": " ".join(command[1:]), "output_tail": proc.stdout[-2000:],
            "result": result}


# ------------------------------------------------------------------------------------------ the report


def _write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)


def _write_text(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _fmt(value, spec: str = ".3f", scale: float = 1.0) -> str:
    return "–" if value is None else format(value * scale, spec)


def _pct(value: float | None, peak: float | None) -> str:
    return "n/a" if value is None or not peak else f"{100.0 * value / peak:.1f}%"


def _first_call(m: dict) -> str:
    first = m.get("first_call_ms") or {}
    return _fmt(max(first.values()), ".1f") if first else "–"


def markdown(report: dict) -> str:
    env = report.get("environment") or {}
    device, versions, peaks = env.get("device", {}), env.get("versions", {}), env.get("peaks", {})
    bw, flops = peaks.get("hbm_bytes_per_s"), peaks.get("bf16_flops")
    lines = [f"# spin-mega GPU benchmark run ({'SMOKE, CPU: not GPU performance' if report['smoke'] else 'GPU'})", ""]
    lines += [
        f"- date: {report['date']}",
        f"- device: {device.get('name', 'unknown')}; driver {device.get('driver')}; "
        f"{_fmt(device.get('memory_bytes'), '.0f', 2**-30)} GiB",
        "- versions: " + ", ".join(f"{k} {v}" for k, v in versions.items() if k not in ("imports",) and v),
        f"- rooflines: {peaks.get('name') or 'none'} nominal HBM {_fmt(bw, '.2f', 1e-12)} TB/s, "
        f"dense bf16 {_fmt(flops, '.0f', 1e-12)} TFLOP/s ({peaks.get('source')})",
        "",
        "| step | status | seconds (limit) |",
        "| --- | --- | --- |",
    ]
    lines += [f"| {s['name']} | {s['status']} | {s['seconds']} ({s['timeout_s']}) |" for s in report["steps"]]
    steps = {s["name"]: s for s in report["steps"]}

    checks = ((steps.get("preflight") or {}).get("result") or {}).get("checks", [])
    if checks:
        lines += ["", "## Preflight (`spin-mega env --check`)", "",
                  "| check | status | detail | seconds |", "| --- | --- | --- | --- |"]
        lines += [f"| {c['name']} | {c['status']} | {c['detail'].replace('|', '/')} | {c['seconds']} |" for c in checks]

    kernels = ((steps.get("logprob_kernels") or {}).get("result") or {}).get("results", [])
    if kernels:
        lines += ["", "## Per-token log-probs, bf16 logits [N, V]",
                  "Bytes: forward 2NV, forward+backward 6NV (gradient computed in backward); % of the nominal HBM "
                  "bandwidth. Speed-up: eager fwd+bwd time / this one's.", "",
                  "| N | V | implementation | fwd ms | fwd % HBM | fwd+bwd ms | fwd+bwd % HBM | peak extra GiB | speed-up vs eager | first call ms (compile) |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        eager = {(m["n_tokens"], m["vocab"]): m.get("fwd_bwd_ms") for m in kernels if m["impl"] == "torch_eager"}
        for m in kernels:
            base = eager.get((m["n_tokens"], m["vocab"]))
            if m.get("error"):
                lines.append(f"| {m['n_tokens']} | {m['vocab']} | {m['impl']} | error: {m['error'][:80]} | | | | | | |")
                continue
            fwd_bw = None if m.get("fwd_ms") is None else 2 * m["n_tokens"] * m["vocab"] / (m["fwd_ms"] * 1e-3)
            both_bw = None if m.get("fwd_bwd_ms") is None else 6 * m["n_tokens"] * m["vocab"] / (m["fwd_bwd_ms"] * 1e-3)
            speedup = f"{base / m['fwd_bwd_ms']:.2f}×" if base and m.get("fwd_bwd_ms") else "–"
            lines.append(
                f"| {m['n_tokens']} | {m['vocab']} | {m['impl']} | {_fmt(m.get('fwd_ms'))} | {_pct(fwd_bw, bw)} | "
                f"{_fmt(m.get('fwd_bwd_ms'))} | {_pct(both_bw, bw)} | {_fmt(m.get('peak_extra_bytes_fwd_bwd'), '.2f', 2**-30)} | {speedup} | "
                f"{_first_call(m)} |"
            )

    fused = ((steps.get("fused_linear") or {}).get("result") or {}).get("results", [])
    if fused:
        lines += ["", "## Fused linear + log-probs against lm-head matmul + kernel",
                  "Model FLOPs 6NVH per forward+backward (the fused path does 8NVH: its backward recomputes the logits); "
                  "ratios against matmul+spin_mega_inplace in the same run.", "",
                  "| N | V | H | implementation | fwd+bwd ms | model TFLOP/s (% of bf16 peak) | peak extra GiB | time ratio | memory ratio | first call ms (compile) |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        unfused = {(m["n_tokens"], m["vocab"]): m for m in fused if m["impl"] == "matmul+spin_mega_inplace"}
        for m in fused:
            if m.get("error"):
                lines.append(f"| {m['n_tokens']} | {m['vocab']} | {m['hidden']} | {m['impl']} | error: {m['error'][:80]} | | | | | |")
                continue
            base = unfused.get((m["n_tokens"], m["vocab"])) or {}
            time_ratio = f"{m['fwd_bwd_ms'] / base['fwd_bwd_ms']:.2f}" if base.get("fwd_bwd_ms") and m.get("fwd_bwd_ms") else "–"
            mem_ratio = (f"{m['peak_extra_bytes_fwd_bwd'] / base['peak_extra_bytes_fwd_bwd']:.3f}"
                         if base.get("peak_extra_bytes_fwd_bwd") and m.get("peak_extra_bytes_fwd_bwd") is not None else "–")
            tflops = m.get("fwd_bwd_model_tflops")
            lines.append(
                f"| {m['n_tokens']} | {m['vocab']} | {m['hidden']} | {m['impl']} | {_fmt(m.get('fwd_bwd_ms'))} | "
                f"{_fmt(tflops, '.1f')} ({_pct(None if tflops is None else tflops * 1e12, flops)}) | "
                f"{_fmt(m.get('peak_extra_bytes_fwd_bwd'), '.2f', 2**-30)} | {time_ratio} | {mem_ratio} | {_first_call(m)} |"
            )

    train = (steps.get("train_step") or {}).get("result") or {}
    if train.get("results"):
        lines += ["", f"## SPIN training step, {train.get('shape')} model, sequence length {train.get('seq_len')}, "
                  f"{train.get('global_batch_pairs')} pairs per step ({train.get('micro_batch_pairs')} per micro-batch)",
                  "MFU: model FLOPs (policy 3F per token, +F for the fused opponent) / (step time × nominal bf16 peak). "
                  "Timed steps exclude the warm-up steps (cold compiles), listed apart with the start-up (imports, model "
                  "build, opponent precompute) up to the end of the first step.", "",
                  "| opponent | step s | timed steps | tokens/s | MFU (% of nominal peak) | peak GPU GiB | peak host RSS GiB | warm-up step s | start-up to first step s |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for mode, r in train["results"].items():
            mfu = r.get("mfu")
            warmup = ", ".join(f"{t:.2f}" for t in r.get("warmup_step_time_s", [])) or "–"
            lines.append(
                f"| {mode} | {_fmt(r.get('step_time_s'))} | {r.get('steps_timed', '–')} | {_fmt(r.get('tokens_per_s'), '.0f')} | "
                f"{'n/a' if mfu is None else f'{100 * mfu:.1f}%'} | {_fmt(r.get('peak_gpu_allocated_gib'), '.1f')} | "
                f"{_fmt(r.get('peak_host_rss_gib'), '.1f')} | {warmup} | {_fmt(r.get('startup_s_to_first_step'), '.1f')} |"
            )
    lines += packing_markdown((steps.get("packing") or {}).get("result") or {})
    failed = [s for s in report["steps"] if s["status"] != "ok"]
    for s in failed:
        lines += ["", f"### {s['name']}: {s['status']}", "```", s["output_tail"][-1200:].rstrip(), "```"]
    return "\n".join(lines) + "\n"


def packing_markdown(result: dict) -> list[str]:
    if not result.get("results"):
        return []
    lines = ["", f"## Packed against padded steps, {result.get('shape')} model, {result.get('global_batch_pairs')} pairs per step",
             f"Same pairs, same process, alternating; padded: {result.get('padded_micro_batch_pairs')} pairs per micro-batch, "
             f"length-bucketed; packed: rows of at most {result.get('pack_tokens')} tokens. Lengths: {result['lengths']['law']}.", "",
             "| layout | step s | real tokens/s | padding | micro-batches per step |", "| --- | --- | --- | --- | --- |"]
    for mode, r in result["results"].items():
        lines.append(f"| {mode} | {_fmt(r.get('median_step_s'))} | {_fmt(r.get('real_tokens_per_s'), '.0f')} | "
                     f"{_fmt(r.get('padding_fraction'), '.1%')} | {_fmt(r.get('micro_batches_per_step'), '.1f')} |")
    lines.append(f"\nreal tokens/s, packed / padded: {_fmt(result.get('packed_over_padded_real_tokens_per_s'), '.2f')}")
    return lines


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny shapes: the same steps end to end (CI)")
    parser.add_argument("--out", type=Path, default=BENCH / "results")
    parser.add_argument("--only", nargs="+", choices=STEP_NAMES, default=None,
                        help="run these steps only (environment always runs)")
    parser.add_argument("--inject-failure", nargs=2, metavar=("AFTER_STEP", "KIND"), action="append", default=[],
                        help="tests: after AFTER_STEP insert a step that fails: crash | hang | kill-run (repeatable)")
    parser.add_argument("--environment", type=Path, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--injected", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.environment is not None:
        environment(args.environment)
        return 0
    if args.injected is not None:
        injected(args.injected)
        return 1
    if os.environ.get("SMOKE") == "1":
        args.smoke = True
    if not args.smoke:
        os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

    report = {"benchmark": "gpu_run", "smoke": args.smoke,
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              "environment": None, "steps": []}
    total = time.perf_counter()
    # The environment step names the device, and so the result files of the steps after it.
    args.out.mkdir(parents=True, exist_ok=True)
    probe = args.out / ".gpu_run_environment.json"
    probe.unlink(missing_ok=True)
    env_step = step_commands(args.smoke, args.out)[0]
    print(f"== environment (limit {env_step[2]} s)", flush=True)
    env_record = run_step("environment", env_step[1][:-1] + [str(probe)], env_step[2], probe)
    probe.unlink(missing_ok=True)
    report["environment"] = env_record["result"]
    device_name = (env_record["result"] or {}).get("device", {}).get("name", "unknown-device")
    tag = "smoke" if args.smoke else _slug(device_name)
    json_path, md_path = args.out / f"gpu_run_{tag}.json", args.out / f"gpu_run_{tag}.md"
    steps_dir = args.out / f"gpu_run_{tag}_steps"
    steps_dir.mkdir(exist_ok=True)
    for stale in steps_dir.glob("*.json"):  # a previous run's figures must not pass for this run's
        stale.unlink()
    if env_record["result"]:
        _write_json(steps_dir / "environment.json", env_record["result"])

    plan = step_commands(args.smoke, steps_dir)[1:]
    if args.only:
        plan = [p for p in plan if p[0] in args.only]
    for after, kind in args.inject_failure:
        names = ["environment"] + [p[0] for p in plan]
        if kind not in ("crash", "hang", "kill-run") or after not in names:
            parser.error("--inject-failure takes one of the planned steps and crash | hang | kill-run")
        plan.insert(names.index(after), (f"injected_{kind}", [sys.executable, __file__, "--injected", kind], 5))

    def record(step: dict) -> None:
        report["steps"].append(step)
        report["wall_seconds"] = round(time.perf_counter() - total, 1)
        _write_json(json_path, report)
        _write_text(md_path, markdown(report))
        print(f"== {step['name']}: {step['status']} in {step['seconds']} s; results so far in {json_path}", flush=True)

    record(env_record)
    for name, command, timeout_s in plan:
        print(f"== {name} (limit {timeout_s} s)", flush=True)
        record(run_step(name, command, timeout_s, steps_dir / f"{name}.json"))
    failed = [s["name"] for s in report["steps"] if s["status"] != "ok"]
    print(f"wrote {json_path} and {md_path} in {report['wall_seconds']} s" + (f"; failed: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
