"""`spin-mega env [CONFIG] [--set k=v] [--check]`: what this machine would use for training, and why; with
--check, the preflight of every CUDA-only call (spin_mega/commands/preflight.py)."""

from __future__ import annotations

from pathlib import Path


def add_parser(sub) -> None:
    from spin_mega.commands import add_config_arguments

    parser = sub.add_parser(
        "env",
        help="print the device, library versions and the implementations a training run would use",
        description=(
            "Print the CUDA devices (or their absence), the versions of torch, Triton, megatron-core, Transformer "
            "Engine, flash-attn, Liger and vLLM, and which precision, attention, norm, log-prob kernel, sequence "
            "parallelism and optimizer sharding `spin-mega train` would pick for CONFIG (default: the built-in "
            "defaults) on this machine, with the reason for each. Run it on a GPU node before the first job."
        ),
    )
    add_config_arguments(parser, config_required=False)
    parser.add_argument(
        "--check", action="store_true",
        help="then run every CUDA-only call once, in seconds, one line each: ok, failed: why, or not run here: why "
        "(exit status 1 when any failed)",
    )
    parser.add_argument("--json", type=Path, default=None, help="with --check: also write the results here, after each check")
    parser.set_defaults(handler=run)


def run(args) -> int:
    from spin_mega.config import load_config

    cfg = load_config(args.config, list(args.overrides))
    from spin_mega.training.environment import report

    print(report(cfg), end="", flush=True)
    if not args.check:
        return 0
    import tempfile

    from spin_mega.commands.preflight import FAILED, run_all

    print("preflight (one line per check):", flush=True)
    with tempfile.TemporaryDirectory(prefix="spin-mega-preflight-") as work:
        results = run_all(Path(work), args.json, emit=lambda line: print(line, flush=True))
    return 1 if any(r.status == FAILED for r in results) else 0
