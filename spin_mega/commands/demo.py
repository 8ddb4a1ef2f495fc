"""`spin-mega demo`."""


def add_parser(sub) -> None:
    parser = sub.add_parser("demo", help="(not yet available)")
    parser.set_defaults(handler=run)


def run(args) -> int:
    from spin_mega.errors import SpinMegaError

    raise SpinMegaError("spin-mega demo is not available in this build yet")
