"""Ahead-of-time compile of the log-prob kernels for a GPU architecture, on any machine (no GPU needed).

`triton.compile` with an explicit `GPUTarget` produces the same cubin a GPU run would JIT-compile for the
same arguments; the CUDA tools bundled with Triton read it: `cuobjdump --dump-resource-usage` gives
registers and local-memory (spill) bytes, `nvdisasm` the SASS. Every build uses the launch configuration
`logprobs_kernel.launch_config` returns, the function the launchers call, so what is checked here is what
runs. Used by tests/kernels/test_kernels_aot.py (no spills, everything compiles) and by

    python -m spin_mega.kernels.aot [--arch 80 90] [--vocab 32000 128256 152064] [--json]

which prints registers, spills and SASS instructions per element of each kernel's steady-state
vocabulary loop. Kernels must be compiled, not interpreted: run it without TRITON_INTERPRET=1.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field

import torch

ARCHS = (80, 90)
LLM_VOCABS = (32000, 128256, 152064)
# Megatron pads the vocabulary to a multiple of 128 (spin_mega.models.gpt.VOCAB_DIVISIBLE_BY).
_PAD_MULTIPLE = 128

_TRITON_TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}


@dataclass(frozen=True)
class Build:
    """One compiled variant: a kernel, the logits dtype, a target and the integer arguments that decide
    Triton's specialisation (an int divisible by 16 compiles differently from one that is not)."""

    kernel: str  # "fwd_logprob" (token_logprobs), "fwd_stats" (vocab-parallel, fused-linear) or "bwd"
    dtype: str
    arch: int
    n_cols: int  # columns of the logits tensor (and its row stride)
    n_valid: int  # columns inside the softmax

    @property
    def width(self) -> int:
        """The column count the launcher picks its configuration from."""
        return self.n_cols if self.kernel == "bwd" else self.n_valid


@dataclass
class BuildReport:
    build: Build
    config: dict
    registers: int
    spill_bytes: int  # local memory + stack: anything but 0 is a register spill
    shared_bytes: int
    loop_instructions: int  # SASS instructions in the steady-state vocabulary loop's body
    elements_per_thread: int  # logits elements each thread handles per loop iteration
    loop_mix: dict = field(default_factory=dict)

    @property
    def instructions_per_element(self) -> float:
        return self.loop_instructions / self.elements_per_thread

    def row(self) -> dict:
        return {
            **asdict(self.build),
            **self.config,
            "registers": self.registers,
            "spill_bytes": self.spill_bytes,
            "shared_bytes": self.shared_bytes,
            "loop_instructions": self.loop_instructions,
            "elements_per_thread": self.elements_per_thread,
            "instructions_per_element": round(self.instructions_per_element, 2),
            "loop_mix": self.loop_mix,
        }


def _tool(name: str) -> str:
    import triton

    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{name} is not bundled with this Triton ({path})")
    return path


def _int_attr(value: int) -> str:
    # Triton's JIT specialisation of integer arguments (and of 16-byte-aligned pointers): "D" marks
    # divisibility by 16, which lets loads and stores vectorise.
    return "D" if value % 16 == 0 else ""


def _kernel_arguments(build: Build) -> tuple[object, dict, dict, object]:
    """(jit function, {arg: (type, value)}, constexprs, LaunchConfig) for a build, mirroring the launchers' calls."""
    from spin_mega.kernels import logprobs_kernel as lk

    config = lk.launch_config(build.width, "bwd" if build.kernel == "bwd" else "fwd", interpreted=False)
    logits = f"*{build.dtype}"
    # label_offset is 0 for the plain kernel and a shard or chunk start otherwise: use an offset that
    # is not a multiple of 16 so the generic variant is the one checked.
    offset = 0 if build.kernel == "fwd_logprob" else 1000
    if build.kernel == "bwd":
        fn = lk._logprob_bwd_kernel
        args = {
            "X": (logits, None), "stride_x": ("i32", build.n_cols), "GX": (logits, None), "stride_gx": ("i32", build.n_cols),
            "LABELS": ("*i64", None), "LSE": ("*fp32", None), "G": ("*fp32", None), "n_rows": ("i32", 16383),
            "n_valid": ("i32", build.n_valid), "n_cols": ("i32", build.n_cols), "label_offset": ("i32", offset),
            "ignore_index": ("i32", -100),
        }
        constexprs = {"BLOCK_N": config.block_n, "BLOCK_V": config.block_v}
    else:
        fn = lk._logprob_fwd_kernel
        args = {
            "X": (logits, None), "stride_x": ("i32", build.n_cols), "LABELS": ("*i64", None), "LSE": ("*fp32", None),
            "OUT": ("*fp32", None), "n_rows": ("i32", 16383), "n_valid": ("i32", build.n_valid),
            "label_offset": ("i32", offset), "ignore_index": ("i32", -100),
        }
        constexprs = {"WRITE_LOGPROB": build.kernel == "fwd_logprob", "BLOCK_N": config.block_n, "BLOCK_V": config.block_v}
    return fn, args, constexprs, config


def compile_build(build: Build):
    """The compiled kernel (with .asm["cubin"]) and its LaunchConfig."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from spin_mega.kernels._backend import interpreter_enabled

    if interpreter_enabled():
        raise RuntimeError("the kernels were defined for the Triton interpreter; run without TRITON_INTERPRET=1")
    fn, args, constexprs, config = _kernel_arguments(build)
    signature = {name: kind for name, (kind, _) in args.items()}
    signature.update({name: "constexpr" for name in constexprs})
    attrs = {}
    for name, (kind, value) in args.items():
        spec = "D" if kind.startswith("*") else _int_attr(value)
        if spec:
            attrs[(fn.arg_names.index(name),)] = [["tt.divisibility", 16]]
    src = ASTSource(fn, signature, constexprs=constexprs, attrs=attrs)
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages}
    return triton.compile(src, target=GPUTarget("cuda", build.arch, 32), options=options), config


def resource_usage(cubin: bytes) -> dict[str, int]:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", f.name], capture_output=True, text=True, check=True).stdout
    fields = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", text.split("Function", 1)[1]))
    return {k: int(v) for k, v in fields.items()}


def disassemble(cubin: bytes) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([_tool("nvdisasm"), "-c", f.name], capture_output=True, text=True, check=True).stdout


_INSTRUCTION = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z0-9_]+)(?:\.[A-Z0-9_.]+)?\b")
_LABEL = re.compile(r"^(\.L_x_\d+):")
_BRANCH = re.compile(r"\bBRA\b.*`\((\.L_x_\d+)\)")


def steady_state_loop(sass: str) -> list[str]:
    """Opcodes of the first loop in the kernel (the steady-state vocabulary sweep): from a label to the
    last backward branch to it."""
    labels: dict[str, int] = {}
    opcodes: list[str] = []
    loops: list[tuple[int, int]] = []
    for line in sass.splitlines():
        label = _LABEL.match(line.strip())
        if label:
            labels[label.group(1)] = len(opcodes)
            continue
        op = _INSTRUCTION.search(line)
        if not op:
            continue
        opcodes.append(op.group(1))
        branch = _BRANCH.search(line)
        if branch and branch.group(1) in labels:
            loops.append((labels[branch.group(1)], len(opcodes)))
    if not loops:
        raise ValueError("no loop found in the SASS")
    first = min(start for start, _ in loops)
    end = max(stop for start, stop in loops if start == first)
    return [op for op in opcodes[first:end] if op != "NOP"]


def inspect(build: Build) -> BuildReport:
    kernel, config = compile_build(build)
    cubin = kernel.asm["cubin"]
    usage = resource_usage(cubin)
    loop = steady_state_loop(disassemble(cubin))
    per_thread = config.block_n * config.block_v // (32 * config.num_warps)
    return BuildReport(
        build=build,
        config=asdict(config),
        registers=usage["REG"],
        spill_bytes=usage.get("LOCAL", 0) + usage.get("STACK", 0),
        shared_bytes=usage.get("SHARED", 0),
        loop_instructions=len(loop),
        elements_per_thread=per_thread,
        loop_mix=dict(collections.Counter(loop).most_common()),
    )


def padded(vocab: int) -> int:
    return -(-vocab // _PAD_MULTIPLE) * _PAD_MULTIPLE


def _specialisation(build: Build) -> tuple:
    """What decides the compiled code: two builds with the same key compile to the same cubin."""
    fn, args, constexprs, config = _kernel_arguments(build)
    ints = tuple(_int_attr(value) for kind, value in args.values() if not kind.startswith("*"))
    return (build.kernel, build.dtype, build.arch, config, ints)


def every_launch_build(archs=ARCHS) -> list[Build]:
    """Every (kernel, launch configuration, target) the code can launch on a GPU, each with the generic
    (not 16-divisible) column count that selects it, in bf16; plus the LLM vocabularies with the
    specialisation they really get, in every supported dtype. Builds that would compile to the same
    cubin are listed once."""
    from spin_mega.kernels import logprobs_kernel as lk

    builds = []
    for arch in archs:
        for kernel in ("fwd_logprob", "fwd_stats", "bwd"):
            for width, _ in lk.gpu_launch_configs("bwd" if kernel == "bwd" else "fwd"):
                generic = width if width % 16 else width - 1 if width > 16 else width + 1
                builds.append(Build(kernel, "bf16", arch, generic, generic))
        for vocab in LLM_VOCABS:
            for dtype in ("bf16", "fp16", "fp32"):
                for kernel in ("fwd_logprob", "fwd_stats", "bwd"):
                    builds.append(Build(kernel, dtype, arch, padded(vocab), vocab))
    unique: dict[tuple, Build] = {}
    for build in builds:
        unique.setdefault(_specialisation(build), build)
    return list(unique.values())


def _inspect_row(build: Build) -> dict:
    try:
        return inspect(build).row()
    except Exception as exc:  # reported per build: one failure must not hide the others
        return {**asdict(build), "error": f"{type(exc).__name__}: {exc}"}


def inspect_all(builds: list[Build], jobs: int = 1) -> list[dict]:
    if jobs <= 1:
        return [_inspect_row(b) for b in builds]
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(jobs) as pool:
        return list(pool.map(_inspect_row, builds))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=list(ARCHS), help="SM versions (80 = A100, 90 = H100/H200)")
    parser.add_argument("--vocab", type=int, nargs="+", default=list(LLM_VOCABS))
    parser.add_argument("--dtype", default="bf16", choices=sorted(set(_TRITON_TYPES.values())))
    parser.add_argument("--all", action="store_true", help="every launch configuration the code can use (what the test checks)")
    parser.add_argument("--json", action="store_true", help="one JSON list instead of the table")
    parser.add_argument("--jobs", type=int, default=1, help="compile in this many processes")
    parser.add_argument("--mix", action="store_true", help="also print each steady-state loop's opcode counts")
    args = parser.parse_args(argv)
    if args.all:
        builds = every_launch_build(tuple(args.arch))
    else:
        builds = [
            Build(kernel, args.dtype, arch, padded(v), v)
            for arch in args.arch
            for v in args.vocab
            for kernel in ("fwd_logprob", "fwd_stats", "bwd")
        ]
    reports = inspect_all(builds, args.jobs)
    if args.json:
        json.dump(reports, sys.stdout)
        return 0
    header = f"{'kernel':12} {'dtype':5} {'sm':>3} {'V':>7} {'BN':>3} {'BV':>5} {'warps':>5} {'st':>2} {'regs':>4} {'spill':>5} {'loop':>5} {'/elem':>6}"
    print(header)
    for r in reports:
        if "error" in r:
            print(f"{r['kernel']:12} {r['dtype']:5} {r['arch']:>3} {r['n_valid']:>7} ERROR {r['error']}")
            continue
        print(
            f"{r['kernel']:12} {r['dtype']:5} {r['arch']:>3} {r['n_valid']:>7} {r['block_n']:>3} {r['block_v']:>5} "
            f"{r['num_warps']:>5} {r['num_stages']:>2} {r['registers']:>4} {r['spill_bytes']:>5} "
            f"{r['loop_instructions']:>5} {r['instructions_per_element']:>6.2f}"
        )
        if args.mix:
            print("    " + " ".join(f"{op}:{n}" for op, n in r["loop_mix"].items()))
    return 1 if any("error" in r for r in reports) else 0


if __name__ == "__main__":
    raise SystemExit(main())
