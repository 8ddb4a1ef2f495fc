"""The per-step metrics of one training run: one row per optimizer step, appended to WORKDIR/metrics.jsonl
(the record the report, the loop's summary and a resumed run's health guard read) and sent with the same
step to the enabled experiment trackers (training/trackers.py). Only the rank that owns the metrics (last
pipeline stage, tensor- and data-parallel rank 0) writes; the functions marked collective are called by all.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional

from spin_mega.config import SpinConfig
from spin_mega.errors import ConfigError
from spin_mega.io import atomic_write_text, read_jsonl
from spin_mega.rundir import METRICS
from spin_mega.training import trackers
from spin_mega.training.health import finite_json_line

def truncate_after(path: Path, step: int) -> None:
    """Drops metrics logged after the checkpoint being resumed, so the file reads as one clean run."""
    if not path.is_file():
        return
    keep = [row for row in read_jsonl(path) if row.get("step", 0) <= step]
    atomic_write_text(path, "".join(finite_json_line(row) + "\n" for row in keep))


class MetricsWriter:
    def __init__(self, path: Path, tracker_list: list = ()):
        self.path = path
        self.trackers = trackers.TrackerFanout(tracker_list)

    def write(self, row: dict) -> None:
        """Appends the row (NaN and infinities as null, see health.finite_json_line) and gives the trackers
        its scalars, non-finite ones as they are."""
        with open(self.path, "a") as handle:
            handle.write(finite_json_line(row) + "\n")
        self.trackers.log(row)

    def close(self) -> None:
        self.trackers.close()


def _agreed(attempt: Callable[[], object], is_writer: bool, device):
    """Runs `attempt` on the writer rank and agrees on its outcome with every rank, so a tracker that cannot
    start stops all of them at once with its sentence (exit 2) instead of leaving the others waiting."""
    import torch
    import torch.distributed as dist

    error: Optional[ConfigError] = None
    result = None
    if is_writer:
        try:
            result = attempt()
        except ConfigError as exc:
            error = exc
    failed = torch.tensor([1.0 if error is not None else 0.0], device=device)
    dist.all_reduce(failed, op=dist.ReduceOp.MAX)
    if error is not None:
        raise error
    if failed.item():
        raise ConfigError("an experiment tracker could not start on the rank that writes the metrics; its message says why")
    return result


def check_trackers(cfg: SpinConfig, is_writer: bool, device) -> None:
    """Collective. At start-up, before the opponent pass: a tracker that cannot work is refused in seconds."""
    _agreed(lambda: trackers.check(cfg.logging), is_writer, device)


def open_metrics(cfg: SpinConfig, workdir: Path, start_step: int, is_writer: bool, device) -> Optional[MetricsWriter]:
    """Collective. The writer rank's MetricsWriter (None elsewhere), its trackers continuing from `start_step`."""
    return _agreed(
        lambda: MetricsWriter(workdir / METRICS, trackers.open_trackers(cfg, workdir, start_step)), is_writer, device
    )
