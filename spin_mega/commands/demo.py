"""`spin-mega demo [--workdir DIR]`: the embedded CPU demo."""

from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    parser = sub.add_parser(
        "demo",
        help="run SPIN end to end on a tiny model on CPU (the embedded default)",
        description=(
            "Builds a tiny Llama and SFT data shipped with the package, runs SPIN iterations through the same "
            "loop as `spin-mega run` (vLLM on CPU when installed, else transformers), trains an SFT control for "
            "the same number of steps and writes WORKDIR/report/report.md. Re-running resumes."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--workdir", default="spin-mega-demo", help="where the demo writes everything")
    parser.add_argument("--iterations", type=int, default=2, help="SPIN iterations (at least 2 show the self-play)")
    parser.add_argument("--backend", choices=["vllm", "hf"], default=None, help="generation backend (default: vllm if installed)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    parser.set_defaults(handler=run)


def run(args) -> int:
    from pathlib import Path

    from spin_mega.demo.run_demo import run_demo
    from spin_mega.errors import SpinMegaError

    if args.iterations < 1:
        raise SpinMegaError("--iterations must be at least 1")
    return run_demo(Path(args.workdir), iterations=args.iterations, backend=args.backend, overrides=args.overrides)
