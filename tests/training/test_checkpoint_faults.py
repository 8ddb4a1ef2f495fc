"""Faults around training checkpoints, met through `spin-mega train` as a user on a cluster meets them: a
SIGTERM to the whole process group during a save, a truncated or corrupt newest checkpoint, a disk that fills
up during a save, a resume with other settings, a second process in the same work directory. Each ends in a
safe recovery or one sentence, and never costs the last good checkpoint."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.support import read_metrics, spin_mega

# Steps of the shared run: a checkpoint after each (step_000001, step_000002).
TRAINED_STEPS = 2


def _train(tiny_run, workdir: Path, max_steps: int, *extra: str, env: dict | None = None):
    return spin_mega(
        "train", str(tiny_run["config"]), "--workdir", str(workdir), "--max-steps", str(max_steps),
        "--set", "train.save_interval=1", *extra, env=env,
    )


def _one_sentence_error(stderr: str) -> str:
    """The error line of a run that failed on bad input or an unusable environment: exactly one, and no
    traceback anywhere."""
    assert "Traceback" not in stderr, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if line.startswith("spin-mega train: error:")]
    assert len(errors) == 1, stderr[-3000:]
    return errors[0]


def _files(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def trained(tiny_run, tmp_path_factory) -> Path:
    """A work directory trained for two steps with a checkpoint after each: the tests copy it."""
    workdir = tmp_path_factory.mktemp("faults") / "trained"
    result = _train(tiny_run, workdir, TRAINED_STEPS)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["latest", "step_000001", "step_000002"]
    return workdir


def _copy(trained: Path, dest: Path) -> Path:
    shutil.copytree(trained, dest, symlinks=True)
    return dest


# ---- 1. SIGTERM to the whole process group during a save -----------------------------------------------

def test_sigterm_to_the_process_group_during_a_save_still_saves_and_exits_75(tiny_run, trained, tmp_path):
    """Slurm without --signal sends SIGTERM to every process of the step: the trainer and the checkpoint
    library's helper processes alike. The signal lands while the step-4 checkpoint is being written, the
    second save of the process, when every helper the first one needed is running."""
    workdir = _copy(trained, tmp_path / "w")
    cmd = [sys.executable, "-m", "spin_mega", "train", str(tiny_run["config"]), "--workdir", str(workdir),
           "--max-steps", "6", "--set", "train.save_interval=1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env=dict(os.environ, PYTHONWARNINGS="ignore"))
    saving = workdir / "checkpoints" / ".step_000004.tmp"
    try:
        deadline = time.time() + 300
        while not saving.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.005)
        assert saving.exists(), "the step-4 save never started"
        os.killpg(proc.pid, signal.SIGTERM)
        _, stderr = proc.communicate(timeout=300)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 75, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    root = workdir / "checkpoints"
    # The save in progress completed, then the stop saved at the next step boundary.
    assert (root / "latest").read_text().strip() == "step_000005"
    assert not list(root.glob(".*.tmp")), "a partial save was left behind"
    assert (root / "step_000004" / "trainer_state.json").is_file()

    resumed = _train(tiny_run, workdir, 6)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stderr and "step_000005" in resumed.stderr
    assert [row["step"] for row in read_metrics(workdir)] == [1, 2, 3, 4, 5, 6]


# ---- 2. a truncated or corrupt newest checkpoint -------------------------------------------------------

def _truncate(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)


def _scribble(path: Path) -> None:
    """Overwrites bytes in the middle of the file, keeping its size: damage a size check alone misses."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(range(64))
    path.write_bytes(bytes(data))


def test_truncated_newest_checkpoint_falls_back_to_the_previous_one(tiny_run, trained, tmp_path):
    workdir = _copy(trained, tmp_path / "w")
    root = workdir / "checkpoints"
    shard = root / "step_000002" / "model" / "__0_0.distcp"
    _truncate(shard)
    damaged = _files(root / "step_000002")

    # Two saves past the damaged step: pruning to the last two checkpoints must not take the damaged one.
    result = _train(tiny_run, workdir, 4)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    notes = [line for line in result.stderr.splitlines() if "step_000002" in line and "corrupt" in line]
    assert len(notes) == 1, result.stderr[-3000:]
    assert "model/__0_0.distcp" in notes[0] and "step_000001" in notes[0]
    # Kept aside as it was, never deleted, and never pruned as an old checkpoint afterwards.
    aside = sorted(root.glob("step_000002.corrupt-*"))
    assert len(aside) == 1 and _files(aside[0]) == damaged
    assert (root / "latest").read_text().strip() == "step_000004"
    # Resumed from step 1: the re-trained step 2 is the step 2 of the undamaged run.
    original = read_metrics(trained)
    rows = read_metrics(workdir)
    assert [row["step"] for row in rows] == [1, 2, 3, 4]
    assert rows[1]["loss"] == pytest.approx(original[1]["loss"], rel=1e-6, abs=1e-7)


def test_every_checkpoint_damaged_restarts_the_iteration_from_its_start(tiny_run, trained, tmp_path):
    workdir = _copy(trained, tmp_path / "w")
    root = workdir / "checkpoints"
    _scribble(root / "step_000002" / "optimizer" / ".metadata")
    _truncate(root / "step_000001" / "trainer_state.json")

    result = _train(tiny_run, workdir, 2)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert len(list(root.glob("step_000002.corrupt-*"))) == 1
    assert len(list(root.glob("step_000001.corrupt-*"))) == 1
    assert "start of the iteration" in result.stderr
    # Trained again from the start model: the same two steps as the undamaged run.
    original, rows = read_metrics(trained), read_metrics(workdir)
    assert [row["step"] for row in rows] == [1, 2]
    for a, b in zip(original, rows):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-6, abs=1e-7)


# ---- 3. a full disk during a save ----------------------------------------------------------------------

def _size(directory: Path) -> int:
    return sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())


@contextlib.contextmanager
def _small_disk(where: Path, size_bytes: int):
    """A tmpfs of `size_bytes` at `where` (needs root, as CI runs); yields a function that grows it, or None
    where mounting is not allowed."""
    where.mkdir(parents=True)
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(where)],
                                           capture_output=True).returncode != 0:
        yield None
        return

    def grow(new_size: int) -> None:
        subprocess.run(["mount", "-o", f"remount,size={new_size}", str(where)], check=True)

    try:
        yield grow
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def test_disk_full_during_a_save_keeps_the_previous_checkpoint_and_resumes(tiny_run, trained, tmp_path):
    checkpoint_bytes = _size(trained / "checkpoints" / "step_000002")
    # Room for everything the run holds plus half a checkpoint: the step-3 save runs out of space.
    disk_size = _size(trained) + checkpoint_bytes // 2
    with _small_disk(tmp_path / "disk", disk_size) as grow:
        workdir = _copy(trained, tmp_path / "disk" / "w")
        kept = {name: _files(workdir / "checkpoints" / name) for name in ("step_000001", "step_000002")}
        if grow is not None:
            result = _train(tiny_run, workdir, 4)
        else:
            print("no tmpfs here (not root): the save fails on an injected ENOSPC instead")
            result = _train_injected(tiny_run, workdir, ".step_000003.tmp")
        assert result.returncode == 2, result.stderr[-3000:]
        error = _one_sentence_error(result.stderr)
        root = workdir / "checkpoints"
        assert "no space left" in error and str(root) in error and "step_000003" in error, error
        assert "needs about" in error and "free" in error, error
        assert not list(root.glob(".*.tmp")), "the partial save was left on the full disk"
        assert (root / "latest").read_text().strip() == "step_000002"
        assert {name: _files(root / name) for name in kept} == kept

        if grow is not None:
            grow(disk_size + 4 * checkpoint_bytes)
        resumed = _train(tiny_run, workdir, 4)
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        assert "step_000002" in resumed.stderr and "resuming from" in resumed.stderr
        assert [row["step"] for row in read_metrics(workdir)] == [1, 2, 3, 4]
        assert (root / "latest").read_text().strip() == "step_000004"


def _train_injected(tiny_run, workdir: Path, failing_dir: str):
    """`spin-mega train` with the checkpoint library's file writer failing with ENOSPC under `failing_dir`."""
    cmd = [sys.executable, "-m", "tests.training.enospc_train", "train", str(tiny_run["config"]), "--workdir",
           str(workdir), "--max-steps", "4", "--set", "train.save_interval=1"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=Path(__file__).resolve().parents[2],
                          env=dict(os.environ, PYTHONWARNINGS="ignore", SPIN_MEGA_TEST_ENOSPC_UNDER=failing_dir))


# ---- 9. resuming with a changed config --------------------------------------------------------------------

def _files_but_the_lock(directory: Path) -> dict[str, bytes]:
    return {name: data for name, data in _files(directory).items() if Path(name).name != ".lock"}


def test_resume_with_another_beta_or_learning_rate_is_refused_and_a_longer_run_follows_its_schedule(tiny_run, trained, tmp_path):
    from spin_mega.config import config_to_dict, load_config
    from spin_mega.errors import SpinMegaError
    from spin_mega.rundir import NOT_READ_BY_TRAINING, check_resume
    from spin_mega.training.checkpoint import saved_config

    workdir = _copy(trained, tmp_path / "w")
    before = _files_but_the_lock(workdir)
    # A learning-rate change on resume would be ignored by the restored schedule, a beta change would mix two
    # objectives in one model: both are refused, by name.
    result = _train(tiny_run, workdir, 4, "--set", "loss.beta=0.5", "--set", "optim.lr=2e-3")
    assert result.returncode == 2, result.stderr[-3000:]
    error = _one_sentence_error(result.stderr)
    assert f"{workdir} holds results of other settings (loss.beta: 0.1 -> 0.5; optim.lr: 0.001 -> 0.002)" in error
    assert "use a new --workdir" in error and f"delete {workdir / 'config.yaml'}" in error
    assert _files_but_the_lock(workdir) == before

    # A directory from before config.yaml was recorded compares with its newest checkpoint's config.
    (workdir / "config.yaml").unlink()
    changed = config_to_dict(load_config(tiny_run["config"], ["loss.beta=0.5", "train.save_interval=1", "train.max_steps=4"]))
    with pytest.raises(SpinMegaError, match=r"\(loss\.beta: 0\.1 -> 0\.5\)"):
        check_resume(workdir, changed, ignore=NOT_READ_BY_TRAINING, fallback=saved_config(workdir))

    # The run's length may change: steps 3 and 4 follow the schedule of a 4-step run (linear decay from
    # optim.lr 1e-3, no warm-up), where the 2-step checkpoint's own schedule would have trained them at lr 0.
    longer = _train(tiny_run, workdir, 4)
    assert longer.returncode == 0, longer.stderr[-3000:]
    rows = read_metrics(workdir)
    assert [row["step"] for row in rows] == [1, 2, 3, 4]
    assert [row["lr"] for row in rows[2:]] == pytest.approx([1e-3 * (1 - 2 / 4), 1e-3 * (1 - 3 / 4)], rel=1e-6)
    assert [row["lr"] for row in rows[:2]] == pytest.approx([1e-3, 1e-3 * (1 - 1 / 2)], rel=1e-6)  # kept as trained


# ---- 10. two processes in one work directory --------------------------------------------------------------

def test_a_training_in_a_running_loops_directory_is_refused_on_every_rank(tiny_run, trained, tmp_path):
    """A `spin-mega train` (here 2 ranks under torchrun) in iter_0/train of a run that another process
    holds: rank 0 finds the lock taken and every rank stops with the holder named; nothing is touched."""
    run_dir = tmp_path / "run"
    workdir = _copy(trained, run_dir / "iter_0" / "train")
    (run_dir / "config.yaml").write_text(tiny_run["config"].read_text())
    before = _files_but_the_lock(workdir)
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time\nfrom spin_mega.rundir import hold_lock\n"
         "with hold_lock(sys.argv[1], 'spin-mega run loop.yaml'):\n    print('held', flush=True)\n    time.sleep(600)\n",
         str(run_dir)], stdout=subprocess.PIPE, text=True, env={k: v for k, v in os.environ.items() if k != "SPIN_MEGA_LOCK_TOKEN"})
    try:
        assert holder.stdout.readline().strip() == "held"
        result = spin_mega("train", str(tiny_run["config"]), "--workdir", str(workdir), "--max-steps", "4",
                           "--set", "train.save_interval=1", nproc=2, timeout=300)
    finally:
        holder.kill()
        holder.wait()
    assert result.returncode != 0
    refusals = [line for line in result.stderr.splitlines()
                if line.startswith(f"spin-mega train: error: {run_dir} is in use by `spin-mega run loop.yaml` (pid {holder.pid} on ")]
    assert len(refusals) == 2, result.stderr[-3000:]  # one per rank: none was left waiting
    assert _files_but_the_lock(workdir) == before
