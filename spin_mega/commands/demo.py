"""`spin-mega demo [--workdir DIR]`: the embedded CPU demo."""

from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    parser = sub.add_parser(
        "demo",
        help="run SPIN end to end on a tiny model on CPU (the embedded default)",
        description=(
            "Builds a tiny Llama and SFT data shipped with the package, fine-tunes it to a validation plateau "
            "(theta_0), runs SPIN iterations through the same loop as `spin-mega run` (vLLM on CPU when installed, "
            "else transformers), trains an SFT control for the same number of steps, each arm's learning rate "
            "chosen on a validation split, and writes WORKDIR/report/report.md with a paired test on the test "
            "split. Re-running resumes."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--workdir", default="spin-mega-demo", help="where the demo writes everything")
    parser.add_argument("--iterations", type=int, default=2, help="SPIN iterations (at least 2 show the self-play)")
    parser.add_argument("--backend", choices=["vllm", "hf"], default=None, help="generation backend (default: vllm if installed)")
    parser.add_argument("--size", choices=["full", "smoke"], default="full",
                        help="full: the fair comparison (about 10 minutes on 2 idle cores); smoke: the same steps at toy sizes, for tests")
    parser.add_argument("--seed", type=int, default=0, help="seed of the model init, SFT order, sampling and training")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="override a config value")
    parser.set_defaults(handler=run)


def run(args) -> int:
    from pathlib import Path

    from spin_mega.demo.run_demo import run_demo
    from spin_mega.errors import SpinMegaError

    if args.iterations < 1:
        raise SpinMegaError("--iterations must be at least 1")
    return run_demo(Path(args.workdir), iterations=args.iterations, backend=args.backend, overrides=args.overrides,
                    size=args.size, seed=args.seed)
