"""launch/train.sbatch, submitted as users submit it, training a tiny model over gloo on a real two-node
Slurm cluster: the two-node run computes what one process computes, and a run interrupted by the
preemption signal checkpoints, requeues itself, resumes and ends exactly where an uninterrupted run ends."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.launch.slurm_harness import LAUNCH, read_jsonl

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

# Few enough steps that fp32 data parallelism over 2 ranks stays well within 1e-5 of one process (the
# rounding differences of the two gradient reductions compound, ~1e-7 at step 2, ~1e-6 by step 10 at
# this learning rate); a checkpoint every step slows the loop to about a second a step, which leaves
# time to deliver the signal in the middle of training.
STEPS = 8
TRAIN_ARGS = ("--max-steps", str(STEPS), "--set", "train.save_interval=1")
# Across layouts: the loss and the log-prob sums it is built from (rewards are beta x their difference
# from the opponent's fixed sums: a ~1e-6 relative rounding of a -100 sum is 1e-5 absolute in a reward
# near 0, so the sums are the quantity to compare relatively).
CROSS_LAYOUT_KEYS = ("loss", "logp_chosen", "logp_rejected", "grad_norm", "lr")
# Same layout, interrupted or not: everything the trainer logs about the optimisation.
SAME_LAYOUT_KEYS = CROSS_LAYOUT_KEYS + ("reward_chosen", "reward_rejected", "reward_margin", "reward_accuracy")


def _submit(cluster, config: Path, workdir: Path) -> str:
    """Through the script's own submission path (flags -> sbatch options), as a user on a login node."""
    workdir.mkdir()
    result = cluster.run(
        [str(LAUNCH / "train.sbatch"), str(config), "--workdir", str(workdir), "--nodes", "2",
         "--gpus-per-node", "0", *TRAIN_ARGS],
        cwd=workdir,  # as users do: not from the repository, whose spin_mega/ would shadow the installed one
    )
    job = result.stdout.strip()
    assert job.isdigit(), f"expected a job id, got {result.stdout!r} {result.stderr!r}"
    return job


def _batch_log(workdir: Path, job: str) -> str:
    return (workdir / "logs" / f"spin-train-{job}.log").read_text()


def _plain_tensors(model_dir: Path) -> dict:
    """A checkpoint's global tensors (dist_checkpointing reads through a process group)."""
    import torch.distributed as dist
    from megatron.core.dist_checkpointing import load_plain_tensors

    from tests.support import free_port

    owns_group = not dist.is_initialized()
    if owns_group:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        return load_plain_tensors(str(model_dir))
    finally:
        if owns_group:
            dist.destroy_process_group()


def _final_weights(workdir: Path) -> dict:
    latest = (workdir / "checkpoints" / "latest").read_text().strip()
    return _plain_tensors(workdir / "checkpoints" / latest / "model")


def _assert_weights_close(a: dict, b: dict, rel: float, what: str) -> None:
    assert a.keys() == b.keys()
    for key, ref in a.items():
        if not torch.is_tensor(ref):
            continue
        diff = (b[key] - ref).abs().max().item()
        assert diff <= rel * max(ref.abs().max().item(), 1e-3), f"{what}: {key} differs by {diff}"


def _assert_metrics_close(a: list[dict], b: list[dict], keys: tuple, rel: float, what: str) -> None:
    assert [r["step"] for r in a] == [r["step"] for r in b] == list(range(1, STEPS + 1)), what
    for x, y in zip(a, b):
        for key in keys:
            scale = max(abs(x[key]), abs(y[key]), 1e-3)
            # The gradient norm compounds the per-parameter rounding of the two gradient reductions: it is
            # held to ten times the loss's tolerance.
            tol = rel * (10 if key == "grad_norm" else 1)
            assert abs(x[key] - y[key]) <= tol * scale, f"{what}: step {x['step']} {key}: {x[key]} vs {y[key]}"


@pytest.fixture(scope="module")
def single_process_run(tiny_train, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("single")
    result = subprocess.run(
        [sys.executable, "-m", "spin_mega", "train", str(tiny_train["config"]), "--workdir", str(workdir), *TRAIN_ARGS],
        capture_output=True, text=True, timeout=600,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return workdir


@pytest.fixture(scope="module")
def two_node_run(slurm_cluster, tiny_train, tmp_path_factory):
    workdir = tmp_path_factory.mktemp("two_node") / "w"
    job = _submit(slurm_cluster, tiny_train["config"], workdir)
    info = slurm_cluster.wait(job, timeout=600)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", _batch_log(workdir, job)
    return {"job": job, "workdir": workdir, "info": info}


def test_two_node_training_matches_a_single_process(two_node_run, single_process_run, tiny_train):
    workdir, job, info = two_node_run["workdir"], two_node_run["job"], two_node_run["info"]
    assert info["NodeList"] == "node[1-2]"
    log = _batch_log(workdir, job)
    assert "2 nodes x 1 ranks (TP 1 x PP 1 x DP 2)" in log
    ranks = workdir / "logs" / f"spin-train-{job}" / "attempt-0"
    assert sorted(p.name for p in ranks.iterdir()) == ["train-rank-0.log", "train-rank-1.log"]

    _assert_metrics_close(read_jsonl(single_process_run / "metrics.jsonl"), read_jsonl(workdir / "metrics.jsonl"),
                          CROSS_LAYOUT_KEYS, 1e-5, "2 nodes vs 1 process")
    # RMSProp divides by the root of each gradient's running square, so a component whose gradient is
    # mostly rounding still moves by ~lr: measure the weights' disagreement against how far training
    # moved them (about 1e-4 of it here), not against their size.
    start = _plain_tensors(tiny_train["root"] / "start_mcore" / "model")
    single, two = _final_weights(single_process_run), _final_weights(workdir)
    assert single.keys() == two.keys() == start.keys()
    for key, ref in single.items():
        if torch.is_tensor(ref):
            moved = (ref - start[key]).abs().max().item()
            diff = (two[key] - ref).abs().max().item()
            assert diff <= 1e-3 * moved, f"2 nodes vs 1 process: {key} differs by {diff} after moving {moved}"


def test_preempted_training_requeues_resumes_and_ends_like_an_uninterrupted_run(slurm_cluster, tiny_train, two_node_run, tmp_path):
    workdir = tmp_path / "w"
    job = _submit(slurm_cluster, tiny_train["config"], workdir)
    metrics = workdir / "metrics.jsonl"
    deadline = time.time() + 300
    # Two steps in, the first periodic checkpoint has started the trainer's helper processes (the async
    # checkpoint writer's manager): the signal then reaches them too, as it does on a real cluster.
    while time.time() < deadline and not (metrics.is_file() and metrics.read_text().count("\n") >= 2):
        assert slurm_cluster.job(job)["JobState"] in ("PENDING", "RUNNING"), _batch_log(workdir, job)
        time.sleep(0.1)
    # What `sbatch --signal=B:USR1@S` delivers before the time limit: SIGUSR1 to the batch shell only.
    slurm_cluster.run(["scancel", "--signal=USR1", "--batch", job])

    info = slurm_cluster.wait(job, timeout=600)
    log = _batch_log(workdir, job)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", log
    assert int(info["Restarts"]) == 1 and "requeueing job" in log, log

    # The end state first: whatever happened at the signal, the requeued job must finish exactly like
    # an uninterrupted one.
    reference = two_node_run["workdir"]
    _assert_metrics_close(read_jsonl(reference / "metrics.jsonl"), read_jsonl(metrics), SAME_LAYOUT_KEYS, 1e-6,
                          "interrupted vs straight")
    _assert_weights_close(_final_weights(reference), _final_weights(workdir), 1e-6, "interrupted vs straight")

    # Then the trainer's side of the contract: a checkpoint at the signal and exit status 75. Slurm
    # delivers the signal to every process of the step, the trainer's helper processes included.
    first = (workdir / "logs" / f"spin-train-{job}" / "attempt-0" / "train-rank-0.log").read_text()
    assert "step exited with status 75" in log, (
        "the trainer did not checkpoint and exit 75 on SIGUSR1 delivered to its whole step; the job recovered "
        "from its last periodic checkpoint instead. Rank 0's output:\n" + first[-3000:]
    )
    second = (workdir / "logs" / f"spin-train-{job}" / "attempt-1" / "train-rank-0.log").read_text()
    stopped_at = int(first.split("stopped by a signal after step")[1].split(";")[0])
    assert 1 <= stopped_at < STEPS, "the signal arrived after training had finished: nothing was interrupted"
    assert f"step {stopped_at} of {STEPS}" in second, second[-2000:]
