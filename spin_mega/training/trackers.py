"""Experiment trackers: TensorBoard event files and Weights & Biases runs, fed every scalar of each
metrics.jsonl row with the row's step (training/metrics.py does the fan-out; docs/tracking.md).

Both packages are optional (the `tracking` extra) and imported only when enabled. Everything that can go
wrong before training is found by `check` at start-up and said in one sentence (a missing package; for
online W&B, no API key or a server that does not answer); a tracker that fails mid-run is switched off with
one warning, since metrics.jsonl already holds everything it would have shown.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Any, Callable, Optional

import yaml

from spin_mega.config import LoggingConfig, SpinConfig, config_to_dict
from spin_mega.errors import ConfigError

TENSORBOARD_DIR = "tensorboard"  # under the training work directory
WANDB_DIR = "wandb"  # wandb's own folder, created by wandb under the training work directory
WANDB_RUN_ID = "spin-mega-run-id"  # inside WANDB_DIR: a resumed training continues the same W&B run
ONLINE_CHECK_TIMEOUT_S = 5.0


def _require(package: str, setting: str, off: str) -> None:
    if importlib.util.find_spec(package) is None:
        raise ConfigError(
            f"{setting} but the {package} package is not installed; install it with "
            f"`pip install 'spin-mega[tracking]'` (or `pip install {package}`), or set {off}"
        )


def check(logging: LoggingConfig) -> None:
    """Refuses, in one sentence, a tracker that cannot work: its package missing, or for online W&B no API
    key or a server that does not answer within a few seconds. Offline W&B needs no network."""
    if logging.tensorboard:
        _require("tensorboard", "logging.tensorboard is true", "logging.tensorboard false")
    mode = logging.wandb.mode
    if mode == "off":
        return
    _require("wandb", f"logging.wandb.mode is {mode}", "logging.wandb.mode off")
    if mode == "online":
        _check_wandb_online()


def _check_wandb_online() -> None:
    import wandb

    base_url = wandb.setup().settings.base_url
    offline_hint = "or set logging.wandb.mode offline and `wandb sync` the run files later"
    try:
        urllib.request.urlopen(base_url, timeout=ONLINE_CHECK_TIMEOUT_S).close()
    except urllib.error.HTTPError:
        pass  # the server answered; what it thinks of a bare GET does not matter
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ConfigError(
            f"logging.wandb.mode is online but the W&B server {base_url} did not answer within "
            f"{ONLINE_CHECK_TIMEOUT_S:g} s ({reason}); check the network or WANDB_BASE_URL, {offline_hint}"
        ) from None
    try:
        logged_in = wandb.login(prompt=False, verify=True)
    except Exception as exc:  # wandb's AuthenticationError and whatever its transport raises
        raise ConfigError(
            f"logging.wandb.mode is online but {base_url} refused the W&B API key ({_one_line(exc)}); run "
            f"`wandb login --relogin`, {offline_hint}"
        ) from None
    if not logged_in:
        raise ConfigError(
            f"logging.wandb.mode is online but no W&B API key is configured for {base_url}; set WANDB_API_KEY or run "
            f"`wandb login`, {offline_hint}"
        )


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def scalars(row: dict) -> dict[str, float]:
    """The scalars of one metrics row, keyed as in metrics.jsonl: numbers, booleans as 0/1 (health flags),
    nested mappings flattened as outer/inner; the step itself, strings, lists and nulls are left out. NaN and
    infinities pass through (metrics.jsonl writes them as null and lists them under non_finite)."""
    out: dict[str, float] = {}

    def visit(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, inner in value.items():
                visit(f"{prefix}/{key}", inner)
        elif isinstance(value, (bool, int, float)):
            out[prefix] = float(value)

    for key, value in row.items():
        if key != "step":
            visit(key, value)
    return out


class TensorBoardTracker:
    name = "TensorBoard"

    def __init__(self, logdir: Path, config: dict, start_step: int):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step: a resumed run re-logs the steps after its checkpoint; TensorBoard hides the older
        # events of those steps, as metrics.jsonl drops their rows.
        self.writer = SummaryWriter(log_dir=str(logdir), purge_step=start_step + 1 if start_step else None, flush_secs=30)
        if not start_step:
            self.writer.add_text("config", "```yaml\n" + yaml.safe_dump(config, sort_keys=False) + "```", 0)

    def log(self, values: dict[str, float], step: int) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    name = "W&B"

    def __init__(self, workdir: Path, cfg: SpinConfig):
        import wandb

        w = cfg.logging.wandb
        wandb_dir = workdir / WANDB_DIR
        wandb_dir.mkdir(parents=True, exist_ok=True)
        id_file = wandb_dir / WANDB_RUN_ID
        run_id = id_file.read_text().strip() if id_file.is_file() else None
        if run_id is None:
            run_id = uuid.uuid4().hex[:12]
            id_file.write_text(run_id + "\n")
        # Its service processes (wandb-core, wandb-symon) are Go programs, which ignore SIGUSR1: the launch
        # scripts' preemption signal, sent to every process of the Slurm step, leaves them running.
        self.run = wandb.init(
            project=w.project,
            name=w.name or workdir.resolve().name,
            group=w.group,
            job_type="train",
            id=run_id,
            resume="allow",
            mode=w.mode,
            dir=str(workdir),
            config=config_to_dict(cfg),
            # The trainer's stderr carries its own one-sentence errors and progress bar: leave it alone.
            settings=wandb.Settings(console="off"),
        )

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


def open_trackers(cfg: SpinConfig, workdir: Path, start_step: int) -> list:
    """The enabled trackers for one training run in `workdir`, continuing from `start_step` (0: a new run);
    `check` them first. Raises ConfigError (one sentence) when one cannot start."""
    trackers: list = []
    try:
        if cfg.logging.tensorboard:
            trackers.append(TensorBoardTracker(workdir / TENSORBOARD_DIR, config_to_dict(cfg), start_step))
        if cfg.logging.wandb.mode != "off":
            trackers.append(WandbTracker(workdir, cfg))
    except ConfigError:
        raise
    except Exception as exc:
        for tracker in trackers:
            tracker.close()
        raise ConfigError(f"an experiment tracker could not start: {_one_line(exc)}") from exc
    return trackers


class TrackerFanout:
    """Sends each row's scalars to every tracker; one that raises is warned about once and dropped, so a
    tracker never stops training."""

    def __init__(self, trackers: list, warn: Callable[[str], None] = lambda msg: print(msg, file=sys.stderr, flush=True)):
        self.trackers = list(trackers)
        self.warn = warn

    def log(self, row: dict) -> None:
        if not self.trackers:
            return
        values = scalars(row)
        step = int(row["step"])
        for tracker in list(self.trackers):
            try:
                tracker.log(values, step)
            except Exception as exc:
                self.trackers.remove(tracker)
                self.warn(
                    f"[spin-mega] {tracker.name} logging failed at step {step} ({_one_line(exc)}); it is off for the "
                    "rest of this run, metrics.jsonl has every step"
                )

    def close(self) -> None:
        for tracker in self.trackers:
            try:
                tracker.close()
            except Exception as exc:
                self.warn(f"[spin-mega] closing {tracker.name} failed ({_one_line(exc)}); metrics.jsonl has every step")
        self.trackers = []


def iteration_overrides(logging: LoggingConfig, loop_workdir: Path, iteration: int) -> list[str]:
    """`--set` arguments that make one loop iteration's training a W&B run of its own, NAME/iter_T in the
    group NAME (the loop's name: logging.wandb.name, else its work directory's name; logging.wandb.group,
    when set, names the group instead). TensorBoard needs none: each iteration writes under
    LOOP_WORKDIR/iter_T/train/tensorboard, so `tensorboard --logdir LOOP_WORKDIR` shows them side by side."""
    if logging.wandb.mode == "off":
        return []
    name = logging.wandb.name or Path(loop_workdir).resolve().name
    group = logging.wandb.group or name
    # JSON strings are YAML strings: a name like 2024 or yes stays a string through --set.
    return [
        "--set", f"logging.wandb.group={json.dumps(group)}",
        "--set", f"logging.wandb.name={json.dumps(f'{name}/iter_{iteration}')}",
    ]
