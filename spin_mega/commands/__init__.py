"""One module per `spin-mega` subcommand, each with `add_parser(subparsers)` and `run(args) -> int`."""

import argparse

COMMANDS = ("demo", "run", "generate", "train", "convert", "report", "plan", "env")


def add_config_arguments(parser: argparse.ArgumentParser, config_required: bool = True) -> None:
    """The config file and `--set dotted.key=value` overrides, shared by every command that takes one."""
    if config_required:
        parser.add_argument("config", help="YAML run configuration (see configs/)")
    else:
        parser.add_argument("config", nargs="?", default=None, help="YAML run configuration (see configs/)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config value, e.g. --set optim.lr=1e-7 (repeatable)",
    )
