"""One module per `spin-mega` subcommand, each with `add_parser(subparsers)` and `run(args) -> int`."""

COMMANDS = ("demo", "run", "generate", "train", "convert", "report", "plan", "env")
