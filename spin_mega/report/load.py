"""Reading a run directory for the report: whatever exists, never requiring a finished run. An iteration
counts as finished once its evaluation is known (from summary.json, or from iter_<t>/eval.json written just
before the summary entry); everything else is reported as unfinished with what it has so far."""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from spin_mega.errors import SpinMegaError
from spin_mega.io import read_jsonl
from spin_mega.rundir import (
    BASELINE_EVAL, EVAL, GENERATIONS, ITERATION_DIR, METRICS, SUMMARY, TRAIN_DIR, TRAIN_SUMMARY, UNHEALTHY_MARKER,
    iteration_dir, read_stop,
)


@dataclass
class Lengths:
    """Per-row response lengths of one generations file, in both units, so one unit can be chosen for
    the whole run (comparing generated tokens with human words would be meaningless)."""

    chosen_words: list[int] = field(default_factory=list)
    rejected_words: list[int] = field(default_factory=list)
    rejected_tokens: list[Optional[int]] = field(default_factory=list)
    chosen_tokens: list[Optional[int]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.rejected_words)


@dataclass
class Iteration:
    t: int
    entry: dict = field(default_factory=dict)  # this iteration's summary.json entry, {} if none yet
    eval: Optional[dict] = None
    metrics: list[dict] = field(default_factory=list)
    lengths: Optional[Lengths] = None  # None when generations.jsonl does not exist
    health: Optional[dict] = None  # train_summary.json's health entry
    stopped: Optional[dict] = None  # the record of a training stopped unhealthy (training/health.py)

    @property
    def finished(self) -> bool:
        return self.eval is not None

    @property
    def steps(self) -> Optional[int]:
        train = self.entry.get("train") or {}
        if isinstance(train.get("steps"), (int, float)):
            return int(train["steps"])
        return int(self.metrics[-1]["step"]) if self.metrics else None

    def final(self, key: str) -> Optional[float]:
        """The summary's final_<key>, else the last logged value, so a running iteration shows progress."""
        train = self.entry.get("train") or {}
        value = train.get(f"final_{key}")
        if value is None and self.metrics:
            value = self.metrics[-1].get(key)
        return as_number(value)

    def mean_generated_length(self, unit: str) -> tuple[Optional[float], bool]:
        """Mean generated-response length in the run's length unit, from generations.jsonl so that it
        matches the length plot; (value, True) when only summary.json's figure is available."""
        if self.lengths:
            values = self.lengths.rejected_tokens if unit == "tokens" else self.lengths.rejected_words
            return sum(values) / len(values), False
        gen = self.entry.get("generation") or {}
        return as_number(gen.get("mean_response_tokens")), True


@dataclass
class RunData:
    workdir: Path
    iterations: list[Iteration]
    baseline: Optional[dict]  # EVAL of theta_0
    sft_control: Optional[dict]  # {"steps": int, "eval": EVAL}
    demo: Optional[dict] = None  # the demo's model selection (summary.json "demo"), when present


def as_number(value) -> Optional[float]:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    by_step: dict[int, dict] = {}
    for row in read_jsonl(path):
        step = as_number(row.get("step"))
        if step is not None:
            by_step[int(step)] = row  # a resumed run may repeat a step; the later line is the kept one
    return [by_step[s] for s in sorted(by_step)]


def _count(value) -> Optional[int]:
    number = as_number(value)
    return int(number) if number is not None else None


def _read_lengths(path: Path) -> Optional[Lengths]:
    if not path.is_file():
        return None
    lengths = Lengths()
    for row in read_jsonl(path):
        chosen, rejected = row.get("chosen"), row.get("rejected")
        if not isinstance(chosen, str) or not isinstance(rejected, str):
            continue
        meta = row.get("meta") if isinstance(row.get("meta"), dict) else {}
        lengths.chosen_words.append(len(chosen.split()))
        lengths.rejected_words.append(len(rejected.split()))
        lengths.rejected_tokens.append(_count(meta.get("num_tokens")))
        lengths.chosen_tokens.append(_count(meta.get("chosen_num_tokens")))
    return lengths


def _read_json(path: Path, what: str):
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SpinMegaError(f"cannot read {what} {path} ({exc})") from None


def _eval_or_none(value) -> Optional[dict]:
    return value if isinstance(value, dict) and value else None


def load_run(workdir: str | Path) -> RunData:
    workdir = Path(workdir)
    if not workdir.exists():
        raise SpinMegaError(f"work directory {workdir} does not exist")
    if not workdir.is_dir():
        raise SpinMegaError(f"work directory {workdir} is not a directory")
    summary = {}
    summary_path = workdir / SUMMARY
    if summary_path.is_file():
        summary = _read_json(summary_path, "the run summary")
        if not isinstance(summary, dict):
            raise SpinMegaError(f"{summary_path} is not a JSON object")

    entries: dict[int, dict] = {}
    for entry in summary.get("iterations") or []:
        if isinstance(entry, dict) and as_number(entry.get("iteration")) is not None:
            entries[int(entry["iteration"])] = entry
    on_disk = {int(m.group(1)) for p in workdir.iterdir() if p.is_dir() and (m := ITERATION_DIR.match(p.name))}

    iterations = []
    for t in sorted(set(entries) | on_disk):
        it = Iteration(t=t, entry=entries.get(t, {}))
        it.eval = _eval_or_none(it.entry.get("eval"))
        eval_path = iteration_dir(workdir, t) / EVAL
        if it.eval is None and eval_path.is_file():
            with contextlib.suppress(SpinMegaError):
                it.eval = _eval_or_none(_read_json(eval_path, "the evaluation"))
        it.metrics = _read_metrics(iteration_dir(workdir, t) / TRAIN_DIR / METRICS)
        it.lengths = _read_lengths(iteration_dir(workdir, t) / GENERATIONS)
        it.health, it.stopped = read_health(iteration_dir(workdir, t) / TRAIN_DIR, it.entry)
        iterations.append(it)

    if not summary_path.is_file() and not any(it.metrics for it in iterations):
        raise SpinMegaError(f"{workdir} has no summary.json and no training metrics, so there is nothing to report")
    baseline = _eval_or_none((summary.get("baseline") or {}).get("eval"))
    if baseline is None and (workdir / BASELINE_EVAL).is_file():
        # The loop evaluates theta_0 before any summary entry exists; show it while iteration 0 runs.
        with contextlib.suppress(SpinMegaError):
            baseline = _eval_or_none(_read_json(workdir / BASELINE_EVAL, "the baseline evaluation"))
    control = summary.get("sft_control")
    control = control if isinstance(control, dict) and _eval_or_none(control.get("eval")) else None
    demo = summary.get("demo") if isinstance(summary.get("demo"), dict) else None
    return RunData(workdir, iterations, baseline, control, demo)


def read_health(train_dir: Path, entry: dict) -> tuple[Optional[dict], Optional[dict]]:
    """(train_summary.json's health entry, the stop record) of one iteration's training directory."""
    health = (entry.get("train") or {}).get("health")
    summary = train_dir / TRAIN_SUMMARY
    if health is None and summary.is_file():
        try:
            health = json.loads(summary.read_text()).get("health")
        except (OSError, json.JSONDecodeError, AttributeError):
            health = None
    stopped = read_stop(train_dir) if (train_dir / UNHEALTHY_MARKER).is_file() else None
    return (health if isinstance(health, dict) else None), stopped
