"""`spin-mega report WORKDIR`: plots and a Markdown summary of a (possibly unfinished) run."""

from __future__ import annotations


def add_parser(sub) -> None:
    parser = sub.add_parser(
        "report",
        help="write plots and a Markdown summary of a work directory to WORKDIR/report/",
        description=(
            "Read WORKDIR/summary.json and each iteration's training metrics and generations, and write "
            "PNG plots (loss, rewards, held-out metrics, response lengths) and report.md into WORKDIR/report/. "
            "An unfinished run is reported as far as it got."
        ),
    )
    parser.add_argument("workdir", metavar="WORKDIR", help="work directory written by `spin-mega run` or `spin-mega demo`")
    parser.set_defaults(handler=run)


def run(args) -> int:
    # Imported here so that `spin-mega --help` and other commands do not pay for matplotlib.
    from spin_mega.report import write_report

    path = write_report(args.workdir)
    print(f"wrote {path}")
    return 0
