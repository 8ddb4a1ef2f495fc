"""The report of a run directory (`spin-mega report`): plots and report.md."""

from spin_mega.report.markdown import write_report

__all__ = ["write_report"]
