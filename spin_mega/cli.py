"""The `spin-mega` command line (also `python -m spin_mega`)."""

from __future__ import annotations

import argparse
import importlib
import sys
import warnings

from spin_mega.commands import COMMANDS
from spin_mega.errors import SpinMegaError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="spin-mega",
        description="SPIN (Self-Play Fine-Tuning) on Megatron-core. Start with `spin-mega demo`.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for name in COMMANDS:
        importlib.import_module(f"spin_mega.commands.{name}").add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> None:
    # megatron-core warns at import that Apex / Transformer Engine are absent; that is the expected state on
    # CPU machines and on GPU images without them, and the warnings would bury the command's own output.
    warnings.filterwarnings("ignore", message=r".*(Apex|Transformer Engine).* not installed.*")
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code = args.handler(args)
    except SpinMegaError as exc:
        print(f"spin-mega {args.command}: error: {exc}", file=sys.stderr)
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        print(f"spin-mega {args.command}: interrupted", file=sys.stderr)
        sys.exit(130)
    sys.exit(code or 0)
