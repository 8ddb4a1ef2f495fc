"""`spin-mega run` across the two nodes of one Slurm allocation (launch/spin_loop.sh --nodes 2, stages as
srun steps): two iterations, preempted in the middle of the second iteration's
training, requeued and resumed, end with the same weights, metrics and evaluations as the same loop run
uninterrupted (two ranks under torchrun and two generation engines on one machine, outside Slurm: the same
data-parallel layout and the same prompt shards)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.launch.slurm_harness import LAUNCH, read_jsonl
from tests.launch.test_train_slurm import _assert_weights_close, _plain_tensors

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

ITERATIONS = 2


@pytest.fixture(scope="module")
def loop2(tiny_loop, tmp_path_factory) -> Path:
    # No held-out set: evaluation is one more single-task step like conversion, and the loop tests in
    # tests/loop run it; each stage costs this test a process start-up on every attempt.
    root = tmp_path_factory.mktemp("loop2")
    config = yaml.safe_load(Path(tiny_loop["config"]).read_text())
    config["iterations"].update(num_iterations=ITERATIONS, num_prompts=32)
    path = root / "loop2.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def uninterrupted(loop2, tmp_path_factory) -> Path:
    workdir = tmp_path_factory.mktemp("uninterrupted")
    env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
    result = subprocess.run(
        [sys.executable, "-m", "spin_mega", "run", str(loop2), "--workdir", str(workdir), "--nproc", "2",
         "--set", "generation.engines=2"],
        capture_output=True, text=True, timeout=900, cwd=workdir,
        env={**env, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"},
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return workdir


def _final_weights(workdir: Path) -> dict:
    train = workdir / f"iter_{ITERATIONS - 1}" / "train" / "checkpoints"
    return _plain_tensors(train / (train / "latest").read_text().strip() / "model")


def test_loop_across_two_nodes_preempted_ends_like_an_uninterrupted_run(slurm_cluster, loop2, uninterrupted, tmp_path):
    result = slurm_cluster.run([str(LAUNCH / "spin_loop.sh"), str(loop2), "--workdir", str(tmp_path), "--nodes", "2",
                                "--gpus-per-node", "0"], cwd=tmp_path)
    job = result.stdout.strip()
    assert job.isdigit(), (result.stdout, result.stderr)
    batch_log = tmp_path / "logs" / f"spin-loop-{job}.log"

    # The warning sbatch --signal=B:USR1@S gives, in the middle of the second iteration's training.
    metrics = tmp_path / f"iter_{ITERATIONS - 1}" / "train" / "metrics.jsonl"
    deadline = time.time() + 600
    while not (metrics.is_file() and metrics.read_text().count("\n") >= 1):
        assert time.time() < deadline and slurm_cluster.job(job)["JobState"] in ("PENDING", "RUNNING"), batch_log.read_text()
        time.sleep(0.1)
    slurm_cluster.run(["scancel", "--signal=USR1", "--batch", job])
    info = slurm_cluster.wait(job, timeout=900)
    log = batch_log.read_text()
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log
    assert info["NodeList"] == "node[1-2]" and int(info["Restarts"]) == 1 and "requeueing job" in log, log

    # Every stage ran as an srun step across the allocation: generation as one engine per node, training
    # over both nodes' ranks, conversion and evaluation once.
    first = (tmp_path / "logs" / f"spin-loop-{job}" / "attempt-0" / "run.log").read_text()
    assert "2 engines (2 nodes x 1)" in first
    assert f"training of iteration {ITERATIONS - 1} was preempted; its checkpoint is saved" in first, first[-3000:]
    train_log = (tmp_path / "iter_0" / "logs" / "train.log").read_text()
    assert "$ srun --nodes=2 --ntasks=2 --ntasks-per-node=1" in train_log
    assert "$ srun --nodes=1 --ntasks=1" in (tmp_path / "logs" / "convert.log").read_text()
    second = (tmp_path / "logs" / f"spin-loop-{job}" / "attempt-1" / "run.log").read_text()
    assert f"generate with theta_{ITERATIONS - 1}: done earlier, skipped" in second

    # The end state equals the uninterrupted run's.
    for t in range(ITERATIONS):
        steps = [r["step"] for r in read_jsonl(tmp_path / f"iter_{t}" / "train" / "metrics.jsonl")]
        reference = read_jsonl(uninterrupted / f"iter_{t}" / "train" / "metrics.jsonl")
        assert steps == [r["step"] for r in reference] and len(steps) >= 3, "a training step was lost or repeated"
        assert read_jsonl(tmp_path / f"iter_{t}" / "generations.jsonl") == read_jsonl(uninterrupted / f"iter_{t}" / "generations.jsonl")
        for mine, theirs in zip(read_jsonl(tmp_path / f"iter_{t}" / "train" / "metrics.jsonl"), reference):
            assert mine["loss"] == pytest.approx(theirs["loss"], rel=1e-6, abs=1e-7), (t, mine["step"])
    _assert_weights_close(_final_weights(uninterrupted), _final_weights(tmp_path), 1e-6, "interrupted on 2 nodes vs straight")
    assert (tmp_path / f"iter_{ITERATIONS - 1}" / "hf" / "config.json").is_file()
    assert len(json.loads((tmp_path / "summary.json").read_text())["iterations"]) == ITERATIONS
