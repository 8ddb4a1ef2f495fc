"""Experiment tracking, read back with the trackers' own readers (TensorBoard's EventAccumulator; W&B's
`wandb leet inspect --json` over the offline run file), and the sentences a tracker that cannot start gets.

One real `spin-mega train` run on the tiny set-up feeds both trackers and checks the first-step closed form
of the IPO loss with the SFT term (the loss family's unit tests are in test_loss.py).
"""

from __future__ import annotations

import http.server
import json
import math
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from spin_mega.config import LoggingConfig, LossConfig, SpinConfig, WandbConfig, load_config
from spin_mega.errors import ConfigError
from spin_mega.training import trackers
from spin_mega.training.loss import first_step_loss
from tests.support import REPO, free_port, read_metrics, spin_mega

BETA, SFT_WEIGHT = 0.1, 0.5


def _wandb_env(root: Path) -> dict:
    """W&B's own settings and caches inside the test's folder, never the user's home."""
    return {
        "WANDB_CONFIG_DIR": str(root / "wandb-config"),
        "WANDB_CACHE_DIR": str(root / "wandb-cache"),
        "WANDB_DATA_DIR": str(root / "wandb-data"),
        "NETRC": str(root / "netrc"),
        "WANDB_API_KEY": "",
    }


@pytest.fixture(scope="module")
def tracked_run(tiny_run, tmp_path_factory):
    root = tmp_path_factory.mktemp("tracked")
    workdir = root / "tracked-run"
    result = spin_mega(
        "train", str(tiny_run["config"]), "--workdir", str(workdir), "--max-steps", "2",
        "--set", "loss.loss_type=ipo", "--set", f"loss.beta={BETA}", "--set", f"loss.sft_weight={SFT_WEIGHT}",
        "--set", "logging.tensorboard=true", "--set", "logging.wandb.mode=offline",
        "--set", "logging.wandb.project=spin-mega-tests",
        env=_wandb_env(root),
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir, read_metrics(workdir)


def _expected_scalars(row: dict) -> dict[str, float]:
    """Every scalar of a metrics.jsonl row, written out here rather than taken from trackers.scalars."""
    return {k: float(v) for k, v in row.items() if k != "step" and isinstance(v, (bool, int, float))}


def _tensorboard_scalars(logdir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every (step, value) TensorBoard shows per tag, in order, duplicates included."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return {tag: [(ev.step, ev.value) for ev in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _wandb_records(run_file: Path) -> list[dict]:
    result = subprocess.run(
        [sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(run_file)],
        capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return [json.loads(line) for line in result.stdout.splitlines() if line.strip()]


def _wandb_run_file(workdir: Path) -> Path:
    files = sorted((workdir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1, files
    return files[0]


def test_first_step_is_the_closed_form_of_ipo_plus_sft(tracked_run):
    _, metrics = tracked_run
    first = metrics[0]
    assert first["step"] == 1 and first["reward_margin"] == pytest.approx(0.0, abs=1e-6)
    # IPO at policy = opponent is (0 - 1/(2 beta))^2; the SFT term adds its weight times the NLL per token.
    assert 0 < first["sft_nll"] < math.log(400) * 2  # a random tiny model: about ln(vocab) nats a token
    closed = first_step_loss(LossConfig(beta=BETA, loss_type="ipo", sft_weight=SFT_WEIGHT), first["sft_nll"])
    assert first["loss"] == pytest.approx(25.0 + SFT_WEIGHT * first["sft_nll"], abs=1e-5)
    assert first["loss"] == pytest.approx(closed, abs=1e-5)
    assert metrics[1]["loss"] != pytest.approx(closed, abs=1e-5)  # the update moved the policy


def test_tensorboard_holds_every_scalar_of_metrics_jsonl(tracked_run):
    workdir, metrics = tracked_run
    board = _tensorboard_scalars(workdir / "tensorboard")
    expected_keys = set().union(*(_expected_scalars(row) for row in metrics))
    assert {"loss", "reward_margin", "reward_accuracy", "grad_norm", "lr", "tokens_per_s", "padding_fraction",
            "sft_nll", "logp_chosen_per_token_change", "collapse"} <= expected_keys
    assert set(board) == expected_keys
    for key, events in board.items():
        # TensorBoard keeps scalars as float32: the same number rounded once, one event per step.
        expected = [(row["step"], float(np.float32(_expected_scalars(row)[key]))) for row in metrics if key in _expected_scalars(row)]
        assert events == expected, key


def test_tensorboard_has_the_resolved_config(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    workdir, _ = tracked_run
    acc = EventAccumulator(str(workdir / "tensorboard"), size_guidance={"tensors": 0})
    acc.Reload()
    (event,) = acc.Tensors("config/text_summary")
    text = event.tensor_proto.string_val[0].decode()
    assert "loss_type: ipo" in text and "sft_weight: 0.5" in text and "tensorboard: true" in text


def test_wandb_offline_run_holds_every_scalar_of_metrics_jsonl(tracked_run):
    workdir, metrics = tracked_run
    records = _wandb_records(_wandb_run_file(workdir))
    (run,) = [r["run"] for r in records if r["type"] == "run"]
    assert run["project"] == "spin-mega-tests" and run["display_name"] == workdir.name
    config = run["config"]["update"]
    assert config["loss"]["loss_type"] == "ipo" and config["loss"]["sft_weight"] == SFT_WEIGHT
    assert config["logging"]["wandb"]["mode"] == "offline"
    history = {r["history"]["step"]["num"]: r["history"]["item"] for r in records if r["type"] == "history"}
    assert sorted(history) == [row["step"] for row in metrics]
    for row in metrics:
        logged = {k: v for k, v in history[row["step"]].items() if not k.startswith("_")}
        assert logged == _expected_scalars(row)  # JSON both ways: exactly the same numbers


# ---- start-up: one sentence, before any training ------------------------------------------------------------


class _Deny(http.server.BaseHTTPRequestHandler):
    """A loopback stand-in for a W&B server that answers every request with 401 (a key it does not know)."""

    def _deny(self):
        self.send_response(401)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b'{"errors": [{"message": "invalid api key"}]}')

    do_GET = do_POST = _deny

    def log_message(self, *args):
        pass


@pytest.fixture
def denying_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Deny)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def _check_in_fresh_process(tmp_path: Path, base_url: str, api_key: str) -> subprocess.CompletedProcess:
    """trackers.check for online W&B in a process of its own: wandb keeps its settings and login per process."""
    env = {**os.environ, **_wandb_env(tmp_path), "WANDB_BASE_URL": base_url, "WANDB_API_KEY": api_key}
    code = (
        "from spin_mega.config import LoggingConfig, WandbConfig\n"
        "from spin_mega.training.trackers import check\n"
        "check(LoggingConfig(wandb=WandbConfig(mode='online')))\n"
    )
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env, cwd=REPO)


def test_online_wandb_with_a_refused_key_is_one_sentence(tmp_path, denying_server):
    result = _check_in_fresh_process(tmp_path, denying_server, api_key="k" * 40)
    assert result.returncode != 0
    assert f"{denying_server} refused the W&B API key" in result.stderr and "mode offline" in result.stderr


def test_online_wandb_without_a_key_is_one_sentence(tmp_path, denying_server):
    result = _check_in_fresh_process(tmp_path, denying_server, api_key="")
    assert result.returncode != 0
    assert "no W&B API key is configured" in result.stderr and "WANDB_API_KEY" in result.stderr


def test_spin_mega_run_refuses_an_unreachable_wandb_server_before_any_stage(tiny_run, tmp_path):
    closed = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    workdir = tmp_path / "loop"
    result = spin_mega(
        "run", str(tiny_run["config"]), "--workdir", str(workdir), "--set", "logging.wandb.mode=online",
        env={**_wandb_env(tmp_path), "WANDB_BASE_URL": closed, "WANDB_API_KEY": "k" * 40},
    )
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("spin-mega run: error:")]
    assert len(lines) == 1 and f"the W&B server {closed} did not answer" in lines[0]
    assert not workdir.exists()  # refused before the loop wrote anything


@pytest.mark.parametrize("package, key", [("tensorboard", "logging.tensorboard is true"), ("wandb", "logging.wandb.mode is offline")])
def test_missing_package_is_one_sentence(monkeypatch, package, key):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == package else real(name, *a))
    logging = LoggingConfig(tensorboard=package == "tensorboard", wandb=WandbConfig(mode="offline" if package == "wandb" else "off"))
    with pytest.raises(ConfigError, match=rf"{key} but the {package} package is not installed.*spin-mega\[tracking\]"):
        trackers.check(logging)


def _agreement_worker(rank: int, port: int, base_url: str, queue) -> None:
    import torch.distributed as dist

    from spin_mega.training.metrics import check_trackers

    os.environ.update(WANDB_BASE_URL=base_url, WANDB_API_KEY="k" * 40)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    cfg = SpinConfig(logging=LoggingConfig(wandb=WandbConfig(mode="online")))
    try:
        check_trackers(cfg, is_writer=rank == 1, device="cpu")  # rank 1 owns the metrics, as a last PP stage does
        queue.put((rank, None))
    except ConfigError as exc:
        queue.put((rank, str(exc)))
    finally:
        dist.destroy_process_group()


def test_every_rank_stops_when_the_metrics_rank_cannot_start_its_tracker(tmp_path, monkeypatch):
    import torch.multiprocessing as mp

    for key, value in _wandb_env(tmp_path).items():
        monkeypatch.setenv(key, value)
    closed = f"http://127.0.0.1:{free_port()}"
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.spawn(_agreement_worker, args=(free_port(), closed, queue), nprocs=2, join=True)
    outcomes = dict(queue.get() for _ in range(2))
    assert "did not answer" in outcomes[1]
    assert "could not start on the rank that writes the metrics" in outcomes[0]


# ---- the fan-out, resumes and the loop's grouping --------------------------------------------------------------


def test_scalars_of_a_row():
    row = {"step": 3, "loss": 0.5, "collapse": True, "pairs": 8, "mfu_peak": "H100 SXM", "grad_norm": None,
           "non_finite": ["loss"], "gpu": {"util": 80.0}, "aux_loss": float("nan")}
    values = trackers.scalars(row)
    assert set(values) == {"loss", "collapse", "pairs", "gpu/util", "aux_loss"}
    assert values["collapse"] == 1.0 and values["pairs"] == 8.0 and math.isnan(values["aux_loss"])


_KILL_WANDB_MID_RUN = """
import json, os, signal, sys, time
from pathlib import Path
import psutil
from spin_mega.config import LoggingConfig, SpinConfig, WandbConfig
from spin_mega.training import trackers
from spin_mega.training.metrics import MetricsWriter

work = Path(sys.argv[1])
cfg = SpinConfig(logging=LoggingConfig(wandb=WandbConfig(mode="offline", name="killed")))
writer = MetricsWriter(work / "metrics.jsonl", [trackers.WandbTracker(work, cfg), trackers.TensorBoardTracker(work / "tb", {}, 0)])
warnings = []
writer.trackers.warn = warnings.append
writer.write({"step": 1, "loss": 1.0})
for process in psutil.Process().children(recursive=True):
    if "wandb-core" in process.name():
        os.kill(process.pid, signal.SIGTERM)  # W&B's service dies mid-run
        process.wait(30)
writer.write({"step": 2, "loss": 0.5})
writer.write({"step": 3, "loss": 0.25})
writer.close()
print(json.dumps(warnings))
"""


def test_a_tracker_failing_mid_run_is_dropped_with_one_warning(tmp_path):
    """W&B's service process killed between two steps: one warning, the other tracker and metrics.jsonl go on."""
    result = subprocess.run(
        [sys.executable, "-c", _KILL_WANDB_MID_RUN, str(tmp_path)], capture_output=True, text=True, timeout=120,
        cwd=REPO, env={**os.environ, **_wandb_env(tmp_path)},
    )
    assert result.returncode == 0, result.stderr[-2000:]
    (warning,) = json.loads(result.stdout.splitlines()[-1])
    assert warning.startswith("[spin-mega] W&B logging failed at step 2 (") and "metrics.jsonl has every step" in warning
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3]
    assert _tensorboard_scalars(tmp_path / "tb")["loss"] == [(1, 1.0), (2, 0.5), (3, 0.25)]


def test_tensorboard_resume_replaces_the_steps_after_the_checkpoint(tmp_path):
    first = trackers.TensorBoardTracker(tmp_path, {}, start_step=0)
    for step in (1, 2, 3):
        first.log({"loss": float(step)}, step)
    first.close()
    # Resumed from the checkpoint of step 2: step 3 is trained and logged again.
    second = trackers.TensorBoardTracker(tmp_path, {}, start_step=2)
    for step in (3, 4):
        second.log({"loss": 10.0 * step}, step)
    second.close()
    assert _tensorboard_scalars(tmp_path)["loss"] == [(1, 1.0), (2, 2.0), (3, 30.0), (4, 40.0)]


def _signal_wandb_services(sig: int) -> int:
    import psutil

    services = [p for p in psutil.Process().children(recursive=True) if p.name().startswith("wandb-")]
    for service in services:
        os.kill(service.pid, sig)
    return len(services)


def test_wandb_resume_continues_the_same_run(tmp_path, monkeypatch):
    for key, value in _wandb_env(tmp_path).items():
        monkeypatch.setenv(key, value)
    cfg = SpinConfig(logging=LoggingConfig(wandb=WandbConfig(mode="offline", name="resumed")))
    ids = []
    for attempt in range(2):
        tracker = trackers.WandbTracker(tmp_path / "w", cfg)
        ids.append(tracker.run.id)
        if attempt == 0:
            # The launch scripts' preemption signal reaches every process of the Slurm step, W&B's too.
            assert _signal_wandb_services(signal.SIGUSR1) >= 1
        tracker.log({"loss": 1.0}, attempt + 1)
        tracker.close()
    assert ids[0] == ids[1] == (tmp_path / "w" / "wandb" / trackers.WANDB_RUN_ID).read_text().strip()
    assert len(list((tmp_path / "w" / "wandb").glob(f"offline-run-*-{ids[0]}"))) == 2


def test_loop_iteration_overrides_name_and_group_each_iteration(tmp_path):
    tiny = REPO / "configs" / "tiny-cpu.yaml"
    assert trackers.iteration_overrides(LoggingConfig(), tmp_path / "run", 0) == []  # W&B off
    overrides = trackers.iteration_overrides(LoggingConfig(wandb=WandbConfig(mode="offline")), tmp_path / "2024", 1)
    sets = [value for flag, value in zip(overrides[::2], overrides[1::2]) if flag == "--set"]
    cfg = load_config(tiny, sets)
    assert cfg.logging.wandb.group == "2024" and cfg.logging.wandb.name == "2024/iter_1"  # a name that looks like a number
    named = trackers.iteration_overrides(LoggingConfig(wandb=WandbConfig(mode="online", name="zephyr")), tmp_path / "x", 2)
    cfg = load_config(tiny, named[1::2])
    assert cfg.logging.wandb.group == "zephyr" and cfg.logging.wandb.name == "zephyr/iter_2"


def test_loop_passes_the_overrides_to_each_training(tmp_path, monkeypatch):
    from spin_mega.loop.driver import SpinLoop

    cfg = load_config(REPO / "configs" / "tiny-cpu.yaml", ["logging.wandb.mode=offline", "logging.wandb.name=exp"])
    loop = SpinLoop(cfg, tmp_path / "loop")
    calls = []
    monkeypatch.setattr(loop.stages, "train", lambda args, *rest: calls.append(args))
    monkeypatch.setattr(loop, "mcore_model", lambda t: tmp_path / "start")
    loop._train(1, tmp_path / "loop" / "iter_1")
    (args,) = calls
    assert 'logging.wandb.group="exp"' in args and 'logging.wandb.name="exp/iter_1"' in args
