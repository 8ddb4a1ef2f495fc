"""`spin-mega report`."""


def add_parser(sub) -> None:
    parser = sub.add_parser("report", help="(not yet available)")
    parser.set_defaults(handler=run)


def run(args) -> int:
    from spin_mega.errors import SpinMegaError

    raise SpinMegaError("spin-mega report is not available in this build yet")
