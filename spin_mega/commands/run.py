"""`spin-mega run`."""


def add_parser(sub) -> None:
    parser = sub.add_parser("run", help="(not yet available)")
    parser.set_defaults(handler=run)


def run(args) -> int:
    from spin_mega.errors import SpinMegaError

    raise SpinMegaError("spin-mega run is not available in this build yet")
