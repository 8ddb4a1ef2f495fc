"""The run directory's protocol, spin_mega/rundir.py: what "done" means for a stage, the lock two processes
meet at, and the rule that binds a resumed directory to the settings its results came from."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from spin_mega import rundir
from spin_mega.errors import SpinMegaError
from tests.support import REPO


# ---- stages: a marker and the outputs it vouches for ------------------------------------------------------

def _finish(stage_dir: Path, stage: str) -> None:
    for name in rundir.STAGE_OUTPUTS[stage]:
        path = stage_dir / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            path.write_text("{}\n")
    rundir.mark_done(stage_dir, stage, 1.0)


def test_a_stage_is_done_when_its_marker_and_every_output_are_there(tmp_path):
    assert not rundir.is_done(tmp_path, "generate")
    _finish(tmp_path, "generate")
    assert rundir.is_done(tmp_path, "generate")
    # A marker whose output went missing is refused with the way out, not taken as done nor silently redone.
    (tmp_path / rundir.HELDOUT_GENERATIONS).unlink()
    with pytest.raises(SpinMegaError) as caught:
        rundir.is_done(tmp_path, "generate")
    message = str(caught.value)
    assert str(tmp_path / rundir.HELDOUT_GENERATIONS) in message and "is missing" in message
    assert f"delete {rundir.done_marker('generate')}" in message and "\n" not in message


def test_training_is_done_only_with_its_summary_and_a_skipped_stage_says_so(tmp_path):
    (tmp_path / rundir.TRAIN_DIR).mkdir()
    (tmp_path / rundir.done_marker("train")).write_text('{"seconds": 3}')
    with pytest.raises(SpinMegaError, match=rundir.TRAIN_SUMMARY):
        rundir.is_done(tmp_path, "train")
    # The writer's side of the protocol: a stage is never marked done without its outputs...
    with pytest.raises(RuntimeError, match=rundir.EVAL):
        rundir.mark_done(tmp_path, "eval", 1.0)
    # ...unless it had nothing to do, which its marker records.
    rundir.mark_done(tmp_path, "eval", 0.0, skipped=True)
    assert rundir.is_done(tmp_path, "eval")
    assert json.loads((tmp_path / rundir.done_marker("eval")).read_text())["skipped"] is True


# ---- resuming: which changes are refused ------------------------------------------------------------------

def _config(**changes) -> dict:
    from spin_mega.config import config_to_dict, load_config

    return config_to_dict(load_config(REPO / "configs" / "tiny-cpu.yaml", [f"{k}={v}" for k, v in changes.items()]))


def test_config_changes_name_dotted_keys_and_skip_what_a_resume_may_change():
    base = _config()
    changed = _config(**{"loss.beta": 0.5, "optim.lr": 2e-5, "logging.tensorboard": "true", "train.max_steps": 9,
                         "parallel.tensor_parallel": 2, "generation.temperature": 0.5})
    assert rundir.config_changes(base, changed) == [
        "generation.temperature: 1.0 -> 0.5", "loss.beta: 0.1 -> 0.5", "optim.lr: 1.0e-05 -> 2.0e-05"]
    # What training does not read is no change for a training directory.
    assert rundir.config_changes(base, changed, ignore=rundir.NOT_READ_BY_TRAINING) == [
        "loss.beta: 0.1 -> 0.5", "optim.lr: 1.0e-05 -> 2.0e-05"]
    assert rundir.config_changes(base, _config(**{"iterations.beta": "[0.1, 0.5]"})) == ["iterations.beta: null -> [0.1, 0.5]"]


def test_a_record_older_than_a_key_holds_its_default_and_a_key_since_removed_is_no_change():
    from spin_mega.config import SpinConfig, config_to_dict

    defaults = config_to_dict(SpinConfig())
    old_record = _config()
    del old_record["data"]["add_bos"], old_record["loss"]["sft_weight"]  # written before these keys existed
    old_record["train"]["retired_key"] = 3
    assert rundir.config_changes(old_record, _config(), defaults=defaults) == []
    assert rundir.config_changes(old_record, _config(**{"loss.sft_weight": 0.5}), defaults=defaults) == [
        "loss.sft_weight: 0.0 -> 0.5"]


def test_a_record_binds_once_the_directory_holds_results(tmp_path):
    rundir.write_resolved_config(tmp_path / rundir.CONFIG, _config())
    (tmp_path / rundir.LOGS_DIR).mkdir()
    (tmp_path / "iter_0").mkdir()
    # Only the record, logs and an empty directory: a re-run with other settings replaces the record.
    rundir.check_resume(tmp_path, _config(**{"loss.beta": 0.5}))
    (tmp_path / rundir.done_marker("import_start")).write_text("{}")
    with pytest.raises(SpinMegaError) as caught:
        rundir.check_resume(tmp_path, _config(**{"loss.beta": 0.5}))
    message = str(caught.value)
    assert "(loss.beta: 0.1 -> 0.5)" in message and "new --workdir" in message
    assert f"delete {tmp_path / rundir.CONFIG}" in message and "docs/run-directory.md" in message
    rundir.check_resume(tmp_path, _config(**{"logging.tensorboard": "true", "iterations.num_iterations": 5}))


# ---- the lock -----------------------------------------------------------------------------------------------

HOLDER = textwrap.dedent("""
    import sys, time
    from spin_mega.rundir import hold_lock
    with hold_lock(sys.argv[1], "spin-mega run held.yaml --workdir W") as token:
        print(token, flush=True)
        time.sleep(600)
""")


def _holder(workdir: Path) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(workdir)], stdout=subprocess.PIPE, text=True)
    token = proc.stdout.readline().strip()
    assert token, "the holder did not take the lock"
    return proc, token


def test_a_second_process_is_refused_naming_the_holder_and_a_killed_holder_frees_it(tmp_path, monkeypatch):
    monkeypatch.delenv(rundir.LOCK_TOKEN_ENV, raising=False)
    proc, token = _holder(tmp_path)
    try:
        with pytest.raises(SpinMegaError) as caught:
            with rundir.hold_lock(tmp_path):
                pytest.fail("two holders at once")
        message = str(caught.value)
        assert f"{tmp_path} is in use by `spin-mega run held.yaml --workdir W` (pid {proc.pid} on " in message
        assert "since 20" in message and "another --workdir" in message and "\n" not in message
        # A process the holder started (it passes its token on) goes on under its parent's lock.
        monkeypatch.setenv(rundir.LOCK_TOKEN_ENV, token)
        with rundir.hold_lock(tmp_path) as nested:
            assert nested is None
        monkeypatch.setenv(rundir.LOCK_TOKEN_ENV, "not-the-holders")
        with pytest.raises(SpinMegaError, match="is in use by"):
            with rundir.hold_lock(tmp_path):
                pass
    finally:
        proc.send_signal(signal.SIGKILL)  # a crash: no clean-up runs
        proc.wait()
    monkeypatch.delenv(rundir.LOCK_TOKEN_ENV)
    with rundir.hold_lock(tmp_path) as mine:
        assert mine and os.environ[rundir.LOCK_TOKEN_ENV] == mine
        assert json.loads((tmp_path / rundir.LOCK).read_text())["pid"] == os.getpid()
    assert rundir.LOCK_TOKEN_ENV not in os.environ


def test_a_runs_lock_guards_the_training_directories_of_its_iterations(tmp_path, monkeypatch):
    monkeypatch.delenv(rundir.LOCK_TOKEN_ENV, raising=False)
    train_dir = rundir.iteration_dir(tmp_path, 0) / rundir.TRAIN_DIR
    assert rundir.lock_root(train_dir) == train_dir.absolute()  # not a run directory yet: its own lock
    (tmp_path / rundir.CONFIG).write_text("{}\n")
    assert rundir.lock_root(train_dir) == tmp_path.absolute()
    proc, _ = _holder(tmp_path)
    try:
        with pytest.raises(SpinMegaError, match=f"{tmp_path} is in use by"):
            with rundir.hold_lock(train_dir):
                pass
    finally:
        proc.kill()
        proc.wait()
