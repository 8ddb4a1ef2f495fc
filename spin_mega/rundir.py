"""The run directory: the one module that knows its layout and the stage protocol (markers, pointers, exit
codes). Every other module asks it for names instead of spelling them.

A run of `spin-mega run --workdir WORKDIR`:

    WORKDIR/config.yaml                    the resolved config (a re-run must not change it silently)
    WORKDIR/start_mcore/                   theta_0 imported into Megatron format (when it starts from HF)
    WORKDIR/start_hf/                      theta_0 exported to HF (when it starts from a Megatron checkpoint)
    WORKDIR/heldout.jsonl                  the held-out rows every evaluation reads
    WORKDIR/baseline_eval.json             evaluation of theta_0
    WORKDIR/iter_<t>/prompts.jsonl         this iteration's SFT prompts (+ held-out prompts)
    WORKDIR/iter_<t>/prompts_counts.json   what loading the SFT data kept and skipped
    WORKDIR/iter_<t>/all_generations.jsonl every generation of theta_t, before the held-out ones are split off
    WORKDIR/iter_<t>/generations.jsonl     prompt_id, prompt, chosen (human), rejected (theta_t), meta
    WORKDIR/iter_<t>/heldout_generations.jsonl
    WORKDIR/iter_<t>/pairs.jsonl           this iteration's pairs plus earlier iterations' (mixing)
    WORKDIR/iter_<t>/train/                spin-mega train's work directory (below)
    WORKDIR/iter_<t>/hf/                   theta_(t+1) exported for vLLM, evaluation and the user
    WORKDIR/iter_<t>/eval.json             evaluation of theta_(t+1)
    WORKDIR/iter_<t>/logs/, WORKDIR/logs/  the stages' output
    WORKDIR/summary.json                   one entry per finished iteration
    WORKDIR/report/                        plots and report.md
    <stage directory>/.done.<stage>        the stage finished (its outputs were renamed into place before)

A training work directory (`spin-mega train --workdir`, or iter_<t>/train/ of a run):

    start_mcore/                           start_model imported into Megatron format (when it is an HF model)
    metrics.jsonl                          one line per optimizer step
    train_summary.json                     written when training ends
    checkpoints/step_<n>/                  one complete checkpoint (training/checkpoint.py)
    checkpoints/latest                     name of the newest complete checkpoint
    unhealthy.json                         training stopped on a non-finite value or a collapse
    preempted.json                         training checkpointed and stopped after a signal
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Optional

from spin_mega.errors import SpinMegaError, TrainingUnhealthy
from spin_mega.io import atomic_write_json

# ---- exit codes: what a stage's status tells the loop and the Slurm scripts (launch/common.sh) -------------
EXIT_BAD_INPUT = SpinMegaError.exit_code  # 2: config or data refused; nothing was started
EXIT_UNHEALTHY = TrainingUnhealthy.exit_code  # 3: training stopped before an unhealthy update
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: a checkpoint was saved after a signal; run the same command to resume

# ---- a run of the loop -----------------------------------------------------------------------------------
CONFIG = "config.yaml"
START_MCORE = "start_mcore"
START_HF = "start_hf"
HELDOUT = "heldout.jsonl"
BASELINE_EVAL = "baseline_eval.json"
SUMMARY = "summary.json"
REPORT_DIR = "report"
LOGS_DIR = "logs"

ITERATION_DIR = re.compile(r"^iter_(\d+)$")
PROMPTS = "prompts.jsonl"
PROMPT_COUNTS = "prompts_counts.json"
ALL_GENERATIONS = "all_generations.jsonl"
GENERATIONS = "generations.jsonl"
HELDOUT_GENERATIONS = "heldout_generations.jsonl"
PAIRS = "pairs.jsonl"
TRAIN_DIR = "train"
HF_DIR = "hf"
EVAL = "eval.json"

# ---- a training work directory -----------------------------------------------------------------------------
METRICS = "metrics.jsonl"
TRAIN_SUMMARY = "train_summary.json"
CHECKPOINTS_DIR = "checkpoints"
LATEST_POINTER = "latest"
UNHEALTHY_MARKER = "unhealthy.json"
# Left beside the exit status 75: torchrun reports a worker's 75 as its own exit 1.
PREEMPTED_MARKER = "preempted.json"

_DONE_PREFIX = ".done."

# What each stage leaves in its stage directory (the run directory, or iter_<t>/) before its marker.
STAGE_OUTPUTS = {
    "import_start": (START_MCORE,),
    "export_start": (START_HF,),
    "baseline_eval": (BASELINE_EVAL,),
    "prompts": (PROMPTS, PROMPT_COUNTS),
    "generate": (ALL_GENERATIONS, GENERATIONS, HELDOUT_GENERATIONS),
    "pairs": (PAIRS,),
    "train": (TRAIN_DIR,),
    "export": (HF_DIR,),
    "eval": (EVAL,),
}


def iteration_dir(workdir: Path, t: int) -> Path:
    return Path(workdir) / f"iter_{t}"


def done_marker(stage: str) -> str:
    """The file name that marks `stage` finished in its stage directory."""
    return _DONE_PREFIX + stage


def stage_files(stage: str) -> tuple[str, ...]:
    """Everything a finished `stage` leaves in its stage directory, its marker last."""
    return (*STAGE_OUTPUTS[stage], done_marker(stage))


def is_done(stage_dir: Path, stage: str) -> bool:
    return (Path(stage_dir) / done_marker(stage)).is_file()


def mark_done(stage_dir: Path, stage: str, seconds: float) -> None:
    atomic_write_json(Path(stage_dir) / done_marker(stage), {"seconds": round(seconds, 2), "finished": time.time()})


def read_stop(workdir: Path) -> Optional[dict]:
    """The record of a training stopped unhealthy in WORKDIR (training/health.py writes it), or None."""
    path = Path(workdir) / UNHEALTHY_MARKER
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        record = {}
    if not isinstance(record, dict):
        record = {}
    record.setdefault("step", "?")
    record.setdefault("cause", "an unhealthy value")
    record.setdefault("last_good", "unknown")
    record.setdefault("advice", "lower optim.lr in a new --workdir")
    return record
