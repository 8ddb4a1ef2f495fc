"""The run directory: the one module that knows its layout and the stage protocol (names, markers, exit
codes, the lock, resolved configs and the rules for resuming). Every other module asks it instead of
spelling them; docs/run-directory.md is the user's version of this docstring.

A run of `spin-mega run --workdir WORKDIR`:

    WORKDIR/config.yaml                    the run's resolved config (binds a resume, see check_resume)
    WORKDIR/.lock                          held while a spin-mega process works here (hold_lock)
    WORKDIR/start_mcore/                   theta_0 imported into Megatron format (when it starts from HF)
    WORKDIR/start_hf/                      theta_0 exported to HF (when it starts from a Megatron checkpoint)
    WORKDIR/heldout.jsonl                  the held-out rows every evaluation reads
    WORKDIR/baseline_eval.json             evaluation of theta_0 (+ baseline_eval.config.yaml)
    WORKDIR/iter_<t>/prompts.jsonl         this iteration's SFT prompts (+ held-out prompts)
    WORKDIR/iter_<t>/prompts_counts.json   what loading the SFT data kept and skipped
    WORKDIR/iter_<t>/all_generations.jsonl every generation of theta_t (+ all_generations.config.yaml)
    WORKDIR/iter_<t>/generations.jsonl     prompt_id, prompt, chosen (human), rejected (theta_t), meta
    WORKDIR/iter_<t>/heldout_generations.jsonl
    WORKDIR/iter_<t>/pairs.jsonl           this iteration's pairs plus earlier iterations' (mixing)
    WORKDIR/iter_<t>/train/                spin-mega train's work directory (below)
    WORKDIR/iter_<t>/hf/                   theta_(t+1) exported for vLLM, evaluation and the user
    WORKDIR/iter_<t>/eval.json             evaluation of theta_(t+1) (+ eval.config.yaml)
    WORKDIR/iter_<t>/logs/, WORKDIR/logs/  the stages' output
    WORKDIR/summary.json                   one entry per finished iteration
    WORKDIR/report/                        plots and report.md
    <stage directory>/.done.<stage>        the stage finished: its outputs (STAGE_OUTPUTS) are in place

A training work directory (`spin-mega train --workdir`, or iter_<t>/train/ of a run):

    config.yaml                            the training's resolved config (binds a resume)
    .lock                                  (for iter_<t>/train/ of a run: the run's WORKDIR/.lock instead)
    start_mcore/                           start_model imported into Megatron format (when it is an HF model)
    opponent_logps.json                    the opponent's log-probs of every pair (computed once, reused on resume)
    metrics.jsonl                          one line per optimizer step
    train_summary.json                     written when training ends
    checkpoints/step_<n>/                  one complete checkpoint (training/checkpoint.py)
    checkpoints/latest                     name of the newest complete checkpoint
    unhealthy.json                         training stopped on a non-finite value or a collapse
    preempted.json                         training checkpointed and stopped after a signal
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import secrets
import shlex
import socket
import sys
import time
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional

import yaml

from spin_mega.errors import SpinMegaError, TrainingUnhealthy
from spin_mega.io import atomic_write_json, atomic_write_text

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
# The opponent's log-probs of every pair, computed once before the first update; a resume reuses them.
OPPONENT_LOGPS = "opponent_logps.json"
TRAIN_SUMMARY = "train_summary.json"
CHECKPOINTS_DIR = "checkpoints"
LATEST_POINTER = "latest"
UNHEALTHY_MARKER = "unhealthy.json"
# Left beside the exit status 75: torchrun reports a worker's 75 as its own exit 1.
PREEMPTED_MARKER = "preempted.json"
# The reference model's log-probs of the pairs, computed once before the first step (with the prompt ids).
OPPONENT_LOGPS = "opponent_logps.json"

LOCK = ".lock"
# The lock's token, handed to the stages a holder starts: a `spin-mega train` that finds the lock held by the
# process that started it goes on under its parent's lock instead of refusing it.
LOCK_TOKEN_ENV = "SPIN_MEGA_LOCK_TOKEN"
RESOLVED_CONFIG_SUFFIX = ".config.yaml"

_DONE_PREFIX = ".done."

# ---- the stage protocol --------------------------------------------------------------------------------------
# What each stage leaves in its stage directory (the run directory, or iter_<t>/) before its marker, paths
# relative to it. A stage is done when its marker exists and so do these: a marker without them is refused
# (is_done), never taken as done. The marker of a stage with nothing to do says so (`skipped`) instead.
STAGE_OUTPUTS = {
    "import_start": (START_MCORE,),
    "export_start": (START_HF,),
    "baseline_eval": (BASELINE_EVAL,),
    "prompts": (PROMPTS, PROMPT_COUNTS),
    "generate": (ALL_GENERATIONS, GENERATIONS, HELDOUT_GENERATIONS),
    "pairs": (PAIRS,),
    "train": (TRAIN_DIR, f"{TRAIN_DIR}/{TRAIN_SUMMARY}"),
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


def _missing_outputs(stage_dir: Path, stage: str) -> list[str]:
    return [name for name in STAGE_OUTPUTS[stage] if not (Path(stage_dir) / name).exists()]


def is_done(stage_dir: Path, stage: str) -> bool:
    """Whether `stage` finished in `stage_dir`: its marker and every output it leaves are there. A marker
    whose outputs are gone (deleted to save space, a partial copy) is refused with the way out, rather than
    taken as done (later stages would read what is missing) or silently redone (they may have used it)."""
    marker = Path(stage_dir) / done_marker(stage)
    if not marker.is_file():
        return False
    try:
        record = json.loads(marker.read_text())
    except (OSError, ValueError):
        record = {}
    if isinstance(record, dict) and record.get("skipped"):
        return True
    missing = _missing_outputs(stage_dir, stage)
    if missing:
        raise SpinMegaError(
            f"{marker} marks the stage finished but its output {Path(stage_dir) / missing[0]} is missing; restore "
            f"it, or delete {marker.name} (and the later stages' markers that used it) to run that stage again"
        )
    return True


def mark_done(stage_dir: Path, stage: str, seconds: float, skipped: bool = False) -> None:
    """Marks `stage` finished; its outputs must be in place already (or `skipped`: it had nothing to do)."""
    if not skipped:
        missing = _missing_outputs(stage_dir, stage)
        if missing:
            raise RuntimeError(f"stage {stage} ended without its output {Path(stage_dir) / missing[0]}")
    record = {"seconds": round(seconds, 2), "finished": time.time()}
    if skipped:
        record["skipped"] = True
    atomic_write_json(Path(stage_dir) / done_marker(stage), record)


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


# ---- resolved configs ----------------------------------------------------------------------------------------
def config_beside(output: Path) -> Path:
    """Where a stage that writes the file OUTPUT records the config it ran with: OUTPUT's name up to its first
    dot, then .config.yaml (iter_0/eval.json -> iter_0/eval.config.yaml). Training records its config as
    config.yaml in its work directory, the loop as WORKDIR/config.yaml."""
    output = Path(output)
    return output.with_name(output.name.split(".")[0] + RESOLVED_CONFIG_SUFFIX)


def write_resolved_config(path: Path, config: dict) -> None:
    """The config a stage ran with, every key resolved (spin_mega.config.config_to_dict), as YAML that
    `spin-mega` reads back as a config file."""
    atomic_write_text(path, yaml.safe_dump(config, sort_keys=False))


def read_resolved_config(path: Path) -> Optional[dict]:
    """A recorded config, or None when there is none; an unreadable record is refused with the way out."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        record = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise SpinMegaError(f"{path} cannot be read ({type(exc).__name__}); repair it, or delete it to record the config anew") from None
    if not isinstance(record, dict):
        raise SpinMegaError(f"{path} does not hold a config mapping; repair it, or delete it to record the config anew")
    return record


# ---- resuming with a changed config ------------------------------------------------------------------------
# Keys a resume may change (a key, or a section with everything under it), and why: they decide what is
# observed, where or how fast, or how long the run is, not what each step computes. Any other difference
# between a work directory's recorded config and the one given is refused (check_resume).
RESUME_MAY_CHANGE = {
    "logging": "trackers only receive the metrics",
    "train.log_interval": "how often progress is shown",
    "train.save_interval": "when checkpoints are written, not what is trained",
    "train.save_checkpoints": "whether checkpoints are written, not what is trained",
    "train.peak_tflops": "only the MFU column of metrics.jsonl",
    "train.recompute": "trades memory for compute on the same arithmetic",
    "train.opponent": "precompute or fused: the same opponent log-probs, computed once or in each step",
    "parallel": "the layout: checkpoints reshard to it (training/checkpoint.py refuses the one case that cannot)",
    "train.max_steps": "the run's length: from the resumed step on, the learning rate follows the schedule of a "
                       "run of the new length",
    "train.epochs": "the run's length, as train.max_steps",
    "iterations.num_iterations": "more (or fewer) iterations: the finished ones keep their results",
}
# Keys `spin-mega train` does not read: a training directory's resume ignores them.
NOT_READ_BY_TRAINING = ("generation", "iterations", "eval", "data.eval_path")


def _flatten(mapping: dict, prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in mapping.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(_flatten(value, dotted + "."))
        else:
            flat[dotted] = value
    return flat


def _under(key: str, prefixes: Iterable[str]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


_ABSENT = object()


def config_changes(previous: dict, current: dict, ignore: Iterable[str] = (), defaults: Optional[dict] = None) -> list[str]:
    """`key: old -> new` for every dotted key of `current` whose value differs in `previous` (two resolved
    configs), except the keys RESUME_MAY_CHANGE allows and those under `ignore`. A key `previous` lacks (a
    record written before the key existed) had its default value (from `defaults`); a key `current` lacks no
    longer exists and cannot matter."""
    old, new = _flatten(previous), _flatten(current)
    for key, value in _flatten(defaults or {}).items():
        old.setdefault(key, value)
    skipped = (*RESUME_MAY_CHANGE, *ignore)

    def show(value: Any) -> str:
        return "(absent)" if value is _ABSENT else yaml.safe_dump(value, default_flow_style=True, width=10**6).strip().removesuffix("...").strip()

    changes = []
    for key in sorted(new):
        a, b = old.get(key, _ABSENT), new.get(key, _ABSENT)
        if a != b and not _under(key, skipped):
            changes.append(f"{key}: {show(a)} -> {show(b)}")
    return changes


def holds_results(workdir: Path) -> bool:
    """Whether WORKDIR holds anything a run produced: anything besides its config record, its lock, its logs
    and empty directories. Until it does, a config record binds nothing (a run refused at start-up, or
    stopped before its first output, may be re-run with other settings)."""
    workdir = Path(workdir)
    if not workdir.is_dir():
        return False
    for entry in workdir.iterdir():
        if entry.name in (CONFIG, LOCK, LOGS_DIR):
            continue
        if entry.is_dir() and not entry.is_symlink() and not any(entry.iterdir()):
            continue
        return True
    return False


def check_resume(workdir: Path, current: dict, ignore: Iterable[str] = (), fallback: Optional[dict] = None,
                 defaults: Optional[dict] = None) -> None:
    """Refuses to resume WORKDIR with a config that changes the result: compares `current` (a resolved config)
    with WORKDIR/config.yaml, or with `fallback` (the config an older spin-mega kept elsewhere) when there is
    no record, once WORKDIR holds results (config_changes; `defaults`: every key's default value, for a
    record older than some keys). Names every changed key and the ways out."""
    workdir = Path(workdir)
    record_path = workdir / CONFIG
    previous = read_resolved_config(record_path)
    if previous is None:
        previous = fallback
    if previous is None or not holds_results(workdir):
        return
    changes = config_changes(previous, current, ignore, defaults)
    if not changes:
        return
    shown = "; ".join(changes[:6]) + (f"; and {len(changes) - 6} more" if len(changes) > 6 else "")
    delete = f"delete {record_path}" if record_path.is_file() else f"write the new settings into {record_path}"
    raise SpinMegaError(
        f"{workdir} holds results of other settings ({shown}), and resuming would mix the two in one result: use "
        f"a new --workdir for the new settings, or {delete} to continue with them anyway "
        "(docs/run-directory.md lists the keys a resume may change)"
    )


# ---- the lock ----------------------------------------------------------------------------------------------
def lock_root(workdir: Path) -> Path:
    """The directory whose lock guards WORKDIR: a run's directory for the training directory of one of its
    iterations (a `spin-mega train` there and a `spin-mega run` of the whole must exclude each other),
    WORKDIR itself otherwise."""
    workdir = Path(workdir).absolute()
    run = workdir.parent.parent
    if workdir.name == TRAIN_DIR and ITERATION_DIR.match(workdir.parent.name) and (run / CONFIG).is_file():
        return run
    return workdir


def _this_command() -> str:
    argv = list(sys.argv) or ["?"]
    first = Path(argv[0]).name
    if first == "__main__.py":  # python -m spin_mega ...
        first = "spin-mega"
    text = shlex.join([first, *argv[1:]])
    return text if len(text) <= 300 else text[:297] + "..."


def _describe_holder(record: dict) -> str:
    since = record.get("since")
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(since)) if isinstance(since, (int, float)) else "an unknown time"
    return (f"`{record.get('command', 'another spin-mega process')}` (pid {record.get('pid', '?')} on "
            f"{record.get('host', 'an unknown host')}, since {when})")


_warned_unlockable: set[str] = set()


@contextlib.contextmanager
def hold_lock(workdir: Path, command: Optional[str] = None) -> Iterator[Optional[str]]:
    """Holds WORKDIR's lock (that of lock_root(WORKDIR)) for the block; a second process is refused with one
    sentence naming the holder (command, pid, host, since when). Yields the lock's token, which the
    stages this process starts find in LOCK_TOKEN_ENV: a `spin-mega train` started by the holder goes on
    under its parent's lock (yielding None).

    flock(2) on WORKDIR/.lock: the kernel releases it when the holder dies, however it dies, so a crash
    never leaves the directory locked; the file and its record stay, and only the lock itself counts. On
    NFS, Linux maps flock to the server's byte-range locks (NFSv4, or NFSv3 with lockd): it holds across
    nodes unless the file system is mounted `nolock`/`local_lock=all`, where it guards one node only. A
    file system without locks (Lustre mounted without -o flock) gets a warning and no lock."""
    root = lock_root(workdir)
    root.mkdir(parents=True, exist_ok=True)
    path = root / LOCK
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        state = _try_lock(fd, root)
        if state == "held":
            holder = _read_holder(fd)
            token = os.environ.get(LOCK_TOKEN_ENV)
            if token and holder.get("token") == token:
                yield None  # our parent holds it, and outlives us
                return
            raise SpinMegaError(
                f"{root} is in use by {_describe_holder(holder)}; two processes in one work directory would "
                "overwrite each other's checkpoints and metrics, so wait for it to finish (or stop it), or use "
                "another --workdir"
            )
        if state == "unsupported":
            yield None
            return
        token = secrets.token_hex(16)
        record = {"command": command or _this_command(), "pid": os.getpid(), "host": socket.gethostname(),
                  "since": time.time(), "token": token}
        # Written in place: replacing the file would leave the lock on the old one.
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
        previous = os.environ.get(LOCK_TOKEN_ENV)
        os.environ[LOCK_TOKEN_ENV] = token
        try:
            yield token
        finally:
            if previous is None:
                os.environ.pop(LOCK_TOKEN_ENV, None)
            else:
                os.environ[LOCK_TOKEN_ENV] = previous
    finally:
        os.close(fd)  # releases the lock


def _try_lock(fd: int, root: Path) -> str:
    """"locked", "held" (by another open file: another process), or "unsupported" by the file system."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return "locked"
    except BlockingIOError:
        return "held"
    except OSError as exc:
        if exc.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
            raise
        if str(root) not in _warned_unlockable:
            _warned_unlockable.add(str(root))
            print(f"spin-mega: warning: the file system of {root} does not support locks (flock: "
                  f"{os.strerror(exc.errno)}); a second process in this directory will not be refused",
                  file=sys.stderr, flush=True)
        return "unsupported"


def _read_holder(fd: int) -> dict:
    try:
        holder = json.loads(os.pread(fd, 65536, 0).decode("utf-8", "replace") or "{}")
    except ValueError:  # being written this instant
        return {}
    return holder if isinstance(holder, dict) else {}
