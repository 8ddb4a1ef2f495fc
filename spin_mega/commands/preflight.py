"""`spin-mega env --check`: every call that only runs on CUDA, exercised in seconds before a GPU job spends
its hours (also benchmarks/gpu/run.sh's first step after naming the device).

One line per check, in this order: `NAME: ok (what was found)`, `NAME: failed: why` or `NAME: not run here:
why` (a GPU check on a machine without the GPU it needs). Every check runs in a process of its own under its
own time limit, so a crash or a hang in one (a CUDA fault, a collective that never returns) still lets the
others report; the exit status is 1 when any failed. With --json the results are rewritten after each check.

  cuda                      a CUDA device is visible (otherwise the GPU checks below are not run)
  transformer-engine        `import transformer_engine.pytorch` (not installed: not run)
  flash-attn                `flash_attn_func` on bf16 CUDA tensors against torch SDPA (not installed: not run)
  converted forward         a random HF Llama converted by `spin-mega convert hf-to-mcore`, loaded into the
                            layers training uses here (Transformer Engine's when importable with CUDA, else the
                            local ones) on this device, logits against transformers'; runs on CPU too
  fp32 accumulation         which float32-accumulating GEMM the fused-linear backward uses on CUDA for bf16
                            (kernels/fused_linear.py; torch.addmm with out_dtype first), and a bf16 fused-linear
                            forward and backward against float64
  nvml                      NVML opens this process's GPU by the PCI bus id torch reports, and samples it
  triton log-probs          compiled Triton token_logprobs, forward and backward, bf16, against float64
  triton fused linear       compiled Triton fused_linear_token_logprobs, forward and backward, against float64
  tp2 step                  one bf16 `spin-mega train` step at TP 2 with sequence parallelism and the
                            distributed optimizer, under torchrun on 2 GPUs
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

OK, FAILED, NOT_RUN = "ok", "failed", "not run here"


@dataclass
class Result:
    name: str
    status: str  # OK | FAILED | NOT_RUN
    detail: str = ""
    seconds: float = 0.0

    def line(self) -> str:
        if self.status == OK:
            return f"{self.name}: ok" + (f" ({self.detail})" if self.detail else "")
        return f"{self.name}: {self.status}: {self.detail}"


class NotRunHere(Exception):
    """Raised by a check whose GPU, library or device count this machine lacks."""


_CHILDREN: list[subprocess.Popen] = []


def _run_group(cmd: list[str], timeout: int, grace: int) -> subprocess.CompletedProcess:
    """Runs cmd in a session of its own. At the time limit the session gets SIGTERM, and `grace` seconds later
    SIGKILL: torchrun needs the SIGTERM to stop its workers (which it starts in sessions of their own), and
    nothing may keep the GPU busy after a check gave up."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env=dict(os.environ, PYTHONWARNINGS="ignore"))
    _CHILDREN.append(proc)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _signal_group(proc, signal.SIGTERM)
        try:
            proc.communicate(timeout=grace)
        except subprocess.TimeoutExpired:
            _signal_group(proc, signal.SIGKILL)
            proc.communicate()
        raise
    finally:
        _CHILDREN.remove(proc)
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def _stop_children(signum, frame) -> None:
    """SIGTERM to the preflight or to a check (benchmarks/gpu/run.py's time limit) is passed on to the check or
    torchrun under way, so that it stops its own processes too."""
    for proc in list(_CHILDREN):
        _signal_group(proc, signal.SIGTERM)
    sys.exit(128 + signum)


# ---------------------------------------------------------------------------------------- the checks


def _cuda_or_not_run():
    import torch

    if not torch.cuda.is_available():
        raise NotRunHere("no CUDA device visible")
    return torch.device("cuda", torch.cuda.current_device())


def check_cuda(work: Path) -> str:
    import torch

    _cuda_or_not_run()
    props = torch.cuda.get_device_properties(0)
    return (f"{torch.cuda.device_count()} visible, cuda:0 {props.name}, compute capability {props.major}.{props.minor}, "
            f"torch {torch.__version__}, CUDA {torch.version.cuda}")


def _installed(distribution: str) -> Optional[str]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(distribution)
    except PackageNotFoundError:
        return None


def check_transformer_engine(work: Path) -> str:
    _cuda_or_not_run()
    installed = _installed("transformer-engine") or _installed("transformer_engine")
    if installed is None:
        raise NotRunHere("transformer-engine is not installed (training uses megatron-core's local layers)")
    import transformer_engine.pytorch  # noqa: F401

    return f"transformer-engine {installed}"


def check_flash_attn(work: Path) -> str:
    import torch
    import torch.nn.functional as F

    device = _cuda_or_not_run()
    installed = _installed("flash-attn") or _installed("flash_attn")
    if installed is None:
        raise NotRunHere("flash-attn is not installed (attention uses torch SDPA or Transformer Engine)")
    from flash_attn import flash_attn_func

    gen = torch.Generator(device=device).manual_seed(0)
    q, k, v = (torch.randn(2, 64, 4, 64, device=device, dtype=torch.bfloat16, generator=gen) for _ in range(3))
    out = flash_attn_func(q, k, v, causal=True).float()
    ref = F.scaled_dot_product_attention(*(t.transpose(1, 2).float() for t in (q, k, v)), is_causal=True).transpose(1, 2)
    error = (out - ref).abs().max().item()
    if not error < 2e-2:
        raise AssertionError(f"flash_attn_func differs from SDPA by {error:.3g}")
    return f"flash-attn {installed}, causal bf16 within {error:.1e} of SDPA"


def tiny_converted_checkpoint(work: Path) -> tuple[Path, Path]:
    """(HF directory, its conversion): a random 2-layer Llama with the demo's tokenizer, built once per run."""
    from spin_mega.conversion import hf_to_mcore
    from spin_mega.demo.build import build_tiny_model, build_tokenizer

    hf_dir, mcore_dir = work / "hf", work / "mcore"
    if not (mcore_dir / "model").is_dir():
        tokenizer = work / "tokenizer"
        if not tokenizer.is_dir():
            build_tokenizer(tokenizer)
        if not hf_dir.is_dir():
            build_tiny_model(hf_dir, tokenizer, seed=0)
        hf_to_mcore(hf_dir, mcore_dir)
    return hf_dir, mcore_dir


def check_converted_forward(work: Path) -> str:
    import torch
    from transformers import AutoModelForCausalLM

    from spin_mega.models.checkpoint import load_model, read_meta
    from spin_mega.models.chunks import build_model_chunks
    from spin_mega.models.gpt import have_transformer_engine, padded_vocab_size, transformer_config
    from spin_mega.parallel import distributed

    hf_dir, mcore_dir = tiny_converted_checkpoint(work)
    os.environ.setdefault("MASTER_PORT", str(distributed.free_port()))
    distributed.initialize(1, 1)
    try:
        model_cfg, _, _ = read_meta(mcore_dir)
        config = transformer_config(model_cfg, 1, 1, dtype=torch.float32)
        chunks = build_model_chunks(model_cfg, config, vocab_size=padded_vocab_size(model_cfg.vocab_size, 1))
        load_model(chunks, mcore_dir)
        model = chunks[0].eval()
        device = next(model.parameters()).device
        tokens = torch.randint(3, model_cfg.vocab_size, (2, 48), generator=torch.Generator().manual_seed(0)).to(device)
        positions = torch.arange(tokens.shape[1], device=device).expand_as(tokens)
        with torch.no_grad():
            logits = model.vocab_parallel_logits(model(tokens, positions, None)).transpose(0, 1)[..., : model_cfg.vocab_size]
            reference = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32).to(device).eval()(tokens).logits
    finally:
        distributed.shutdown()
    error = (logits.float() - reference.float()).abs().max().item() / reference.abs().max().item()
    layers = "Transformer Engine" if have_transformer_engine() else "local"
    # float32 weights; on GPU the GEMMs may run in TF32 (10-bit mantissa): a mapping error is of order 1.
    if not error < 2e-2:
        raise AssertionError(f"{layers} layers on {device.type}: logits differ from transformers' by {error:.3g} (relative)")
    return f"{layers} layers on {device.type}, logits within {error:.1e} of transformers' (relative)"


def check_fp32_accumulation(work: Path, device=None) -> str:
    import torch

    from spin_mega.kernels import fused_linear
    from spin_mega.kernels import fused_linear_token_logprobs, reference_fused_linear_token_logprobs

    device = device or _cuda_or_not_run()
    chosen = fused_linear.fp32_accumulation(torch.device(device), torch.bfloat16)
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(64, 128, generator=gen).bfloat16().to(device).requires_grad_()
    weight = (torch.randn(1000, 128, generator=gen) / 8).bfloat16().to(device).requires_grad_()
    labels = torch.randint(1000, (64,), generator=gen).to(device)
    grad = torch.randn(64, generator=gen).to(device)
    # Several vocabulary chunks: the backward accumulates d hidden across them in float32.
    out = fused_linear_token_logprobs(hidden, weight, labels, chunk_size=256)
    out.backward(grad)
    h64, w64 = hidden.detach().double().requires_grad_(), weight.detach().double().requires_grad_()
    ref = reference_fused_linear_token_logprobs(h64, w64, labels)
    ref.backward(grad.double())
    _close("fused-linear bf16 log-probs", out, ref, 2.0**-6)
    _close("fused-linear bf16 d hidden", hidden.grad, h64.grad, 2.0**-6)
    _close("fused-linear bf16 d weight", weight.grad, w64.grad, 2.0**-6)
    refused = "; ".join(f"{name} refused: {why}" for name, why in chosen.rejected)
    return chosen.name + (f"; {refused}" if refused else "")


def _close(what: str, actual, expected, relative: float) -> float:
    error = (actual.double() - expected.double()).abs().max().item()
    scale = expected.double().abs().max().item() or 1.0
    if not error <= relative * scale:
        raise AssertionError(f"{what}: off by {error:.3g} (largest value {scale:.3g}, allowed {relative:g} of it)")
    return error / scale


def check_nvml(work: Path, nvml=None, identity=None) -> str:
    from spin_mega.training.telemetry import GpuTelemetry

    if identity is None:
        _cuda_or_not_run()
    lines = []
    telemetry = GpuTelemetry(identity=identity, nvml=nvml, log=lines.append)
    sample = telemetry.sample()
    if not telemetry.enabled or "gpu_mem_used_gib" not in sample:
        raise AssertionError(lines[0] if lines else "NVML returned no sample")
    return (f"opened by {telemetry.identity[0]} {telemetry.identity[1]}; {sample['gpu_mem_used_gib']:.1f} GiB used, "
            f"{sample['gpu_util_pct']:.0f}% busy, {sample['gpu_power_w']:.0f} W")


def _expect_compiled_triton(device) -> None:
    import torch

    from spin_mega.kernels import backend_for, interpreter_enabled

    probe = torch.zeros(1, device=device)
    if backend_for(probe) != "triton" or interpreter_enabled():
        raise AssertionError(f"the kernels would take the {'interpreter' if interpreter_enabled() else 'PyTorch path'} here, not compiled Triton")


def check_triton_logprobs(work: Path, device=None, compiled: bool = True) -> str:
    import torch

    from spin_mega.kernels import reference_token_logprobs, token_logprobs

    device = device or _cuda_or_not_run()
    if compiled:
        _expect_compiled_triton(device)
    gen = torch.Generator().manual_seed(1)
    # A vocabulary past one 4096-column block and not a multiple of it, some tokens ignored.
    logits = (torch.randn(96, 9000, generator=gen) * 3).bfloat16().to(device)
    labels = torch.randint(9000, (96,), generator=gen)
    labels[::7] = -100
    labels = labels.to(device)
    grad = torch.randn(96, generator=gen).to(device)
    leaf = logits.clone().requires_grad_()
    out = token_logprobs(leaf, labels)
    out.backward(grad)
    ref_leaf = logits.double().requires_grad_()
    ref = reference_token_logprobs(ref_leaf, labels)
    ref.backward(grad.double())
    # float32 arithmetic on bf16 logits: the log-probs to 1e-5 of their size, the gradient (rounded to bf16) to 2^-7.
    f = _close("log-probs", out, ref, 1e-5)
    g = _close("d logits", leaf.grad, ref_leaf.grad, 2.0**-7)
    return f"bf16 [96, 9000]: log-probs within {f:.1e}, gradient within {g:.1e} of float64 (relative)"


def check_triton_fused_linear(work: Path, device=None, compiled: bool = True) -> str:
    import torch

    from spin_mega.kernels import fused_linear_token_logprobs, reference_fused_linear_token_logprobs

    device = device or _cuda_or_not_run()
    if compiled:
        _expect_compiled_triton(device)
    gen = torch.Generator().manual_seed(2)
    hidden = torch.randn(80, 256, generator=gen).bfloat16().to(device)
    weight = (torch.randn(5000, 256, generator=gen) / 16).bfloat16().to(device)
    labels = torch.randint(5000, (80,), generator=gen).to(device)
    grad = torch.randn(80, generator=gen).to(device)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    out = fused_linear_token_logprobs(h, w, labels, chunk_size=2048)
    out.backward(grad)
    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    ref = reference_fused_linear_token_logprobs(h64, w64, labels)
    ref.backward(grad.double())
    # bf16 logits (the matmul's output) carry 2^-8 relative error into the log-probs and gradients.
    f = _close("log-probs", out, ref, 2.0**-6)
    gh = _close("d hidden", h.grad, h64.grad, 2.0**-6)
    gw = _close("d weight", w.grad, w64.grad, 2.0**-6)
    return f"bf16 [80, 256] x [5000, 256]: log-probs {f:.1e}, d hidden {gh:.1e}, d weight {gw:.1e} from float64 (relative)"


def check_tp2_step(work: Path, nproc: Optional[int] = None, timeout: int = 120) -> str:
    """One `spin-mega train` step under torchrun: bf16, TP 2, sequence parallelism, distributed optimizer."""
    import torch

    from spin_mega import rundir
    from spin_mega.demo.build import load_demo_rows
    from spin_mega.parallel.distributed import free_port

    if nproc is None:
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count < 2:
            raise NotRunHere(f"needs 2 CUDA GPUs, {count} visible")
        nproc = 2
    _, mcore_dir = tiny_converted_checkpoint(work)
    rows = load_demo_rows("train")[:9]
    pairs = work / rundir.PAIRS
    pairs.write_text("".join(
        json.dumps({"prompt_id": str(i), "prompt": a["prompt"], "chosen": a["response"], "rejected": b["response"]}) + "\n"
        for i, (a, b) in enumerate(zip(rows, rows[1:]))
    ))
    workdir = work / "tp2_run"
    settings = {
        "start_model": mcore_dir, "data.train_path": pairs, "parallel.tensor_parallel": 2, "parallel.sequence_parallel": "true",
        "parallel.distributed_optimizer": "true", "train.precision": "bf16", "train.micro_batch_size": 2,
        "train.global_batch_size": 4, "train.save_checkpoints": "false",
    }
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", f"--master-port={free_port()}",
           "-m", "spin_mega", "train", "tiny-cpu", "--workdir", str(workdir), "--max-steps", "1"]
    for key, value in settings.items():
        cmd += ["--set", f"{key}={value}"]
    # 35 s after a SIGTERM is time for torchrun to stop its workers (it escalates to SIGKILL after 30 s).
    result = _run_group(cmd, timeout, grace=35)
    if result.returncode != 0:
        errors = [line for line in result.stderr.splitlines() if "error" in line.lower()]
        raise AssertionError(f"exit {result.returncode}: {(errors or result.stderr.splitlines() or ['no output'])[-1][:300]}")
    row = json.loads((workdir / rundir.METRICS).read_text().splitlines()[0])
    if not (math.isfinite(row.get("loss") or math.nan) and math.isfinite(row.get("grad_norm") or math.nan)):
        raise AssertionError(f"step 1 was not finite: loss {row.get('loss')}, grad norm {row.get('grad_norm')}")
    # theta = theta_t at the first step: the logistic SPIN loss is ln 2 up to bf16 rounding.
    if abs(row["loss"] - math.log(2)) > 1e-2:
        raise AssertionError(f"step 1's loss is {row['loss']:.4f}, not ln 2: the policy and the opponent differ")
    return f"loss {row['loss']:.4f} (ln 2), grad norm {row['grad_norm']:.3g}, {nproc} ranks"


# ---------------------------------------------------------------------------------------- the runner


@dataclass(frozen=True)
class Check:
    name: str
    run: Callable[[Path], str]
    timeout_s: int  # cold Triton and Transformer Engine compiles take tens of seconds, the rest seconds
    gpus: int  # CUDA devices it needs; with fewer it is not run (decided without starting its process)


CHECKS = (
    Check("cuda", check_cuda, 60, 1),
    Check("transformer-engine", check_transformer_engine, 60, 1),
    Check("flash-attn", check_flash_attn, 60, 1),
    Check("converted forward", check_converted_forward, 120, 0),
    Check("fp32 accumulation", check_fp32_accumulation, 60, 1),
    Check("nvml", check_nvml, 30, 1),
    Check("triton log-probs", check_triton_logprobs, 90, 1),
    Check("triton fused linear", check_triton_fused_linear, 90, 1),
    Check("tp2 step", check_tp2_step, 180, 2),
)
CHECK_NAMES = tuple(c.name for c in CHECKS)


def run_one(name: str, work: Path) -> Result:
    """Runs one check in this process."""
    check = {c.name: c for c in CHECKS}[name]
    started = time.perf_counter()
    try:
        _injected_failure(name)
        detail, status = check.run(work), OK
    except NotRunHere as why:
        detail, status = str(why), NOT_RUN
    except Exception as exc:  # the line names it; the other checks still run
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        detail, status = f"{type(exc).__name__}: {message}"[:400], FAILED
    return Result(name, status, detail, round(time.perf_counter() - started, 1))


def run_isolated(check: Check, work: Path) -> Result:
    """Runs one check in a child process under its time limit; a crash or a hang becomes its `failed` line."""
    started = time.perf_counter()
    cmd = [sys.executable, "-m", "spin_mega.commands.preflight", "--one", check.name, "--work", str(work)]
    try:
        proc = _run_group(cmd, check.timeout_s, grace=10)
    except subprocess.TimeoutExpired:
        return Result(check.name, FAILED, f"no answer within {check.timeout_s} s", round(time.perf_counter() - started, 1))
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith("{"):
            return Result(**json.loads(line))
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return Result(check.name, FAILED, f"its process died (exit {proc.returncode}): {tail[:300]}", round(time.perf_counter() - started, 1))


def run_all(work: Path, json_path: Optional[Path] = None, emit: Callable[[str], None] = print) -> list[Result]:
    import torch

    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    signal.signal(signal.SIGTERM, _stop_children)
    results = []
    for check in CHECKS:
        if visible < check.gpus:
            why = "no CUDA device visible" if visible == 0 else f"needs {check.gpus} CUDA GPUs, {visible} visible"
            result = Result(check.name, NOT_RUN, why)
        else:
            result = run_isolated(check, work)
        results.append(result)
        emit(f"  {result.line()}")
        if json_path is not None:
            _write_json(json_path, results)
    return results


def _write_json(path: Path, results: list[Result]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps({"checks": [asdict(r) for r in results], "failed": sum(r.status == FAILED for r in results)}, indent=1) + "\n")
    tmp.replace(path)


def _injected_failure(name: str) -> None:
    """Tests: SPIN_MEGA_PREFLIGHT_INJECT="NAME=crash|hang|raise" makes check NAME's process abort, hang or
    raise, to show that the other checks still report."""
    target, _, kind = os.environ.get("SPIN_MEGA_PREFLIGHT_INJECT", "").partition("=")
    if target == name and kind == "crash":
        os.abort()
    if target == name and kind == "hang":
        time.sleep(3600)
    if target == name and kind == "raise":
        raise RuntimeError("injected failure")


def main(argv: Optional[list[str]] = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="one preflight check, in its own process (used by `spin-mega env --check`)")
    parser.add_argument("--one", choices=CHECK_NAMES, required=True)
    parser.add_argument("--work", type=Path, required=True)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGTERM, _stop_children)
    args.work.mkdir(parents=True, exist_ok=True)
    print(json.dumps(asdict(run_one(args.one, args.work))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
