"""The other stage scripts and the loop driver on the real two-node cluster: conversion as a job,
generation sharded over the nodes and merged, and `spin-mega run` driven by launch/spin_loop.sh through a
preemption, both requeueing itself (allocation mode) and handing over to the next job (chain mode)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from tests.launch.slurm_harness import LAUNCH, read_jsonl

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def _submit(cluster, script: str, workdir: Path, *args: str) -> list[str]:
    result = cluster.run([str(LAUNCH / script), "--workdir", str(workdir), "--gpus-per-node", "0", *args], cwd=workdir)
    ids = result.stdout.split()
    assert ids and all(i.isdigit() for i in ids), (result.stdout, result.stderr)
    return ids


def _log(workdir: Path, name: str, job: str) -> str:
    return (workdir / "logs" / f"{name}-{job}.log").read_text()


def _completed(cluster, job: str, workdir: Path, name: str, timeout: float = 600) -> dict:
    info = cluster.wait(job, timeout=timeout)
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", _log(workdir, name, job)
    return info


def test_convert_then_generate_sharded_over_two_nodes(slurm_cluster, tiny_loop, tmp_path):
    (job,) = _submit(slurm_cluster, "convert.sbatch", tmp_path, "mcore-to-hf", "--mcore", str(tiny_loop["start_mcore"]),
                     "--out", str(tmp_path / "hf"))
    _completed(slurm_cluster, job, tmp_path, "spin-convert")
    assert (tmp_path / "hf" / "config.json").is_file()

    prompts = 20
    out = tmp_path / "generations.jsonl"
    (job,) = _submit(slurm_cluster, "generate.sbatch", tmp_path, "--model", str(tmp_path / "hf"), "--data",
                     str(tiny_loop["sft"]), "--out", str(out), "--nodes", "2", "--",
                     "--backend", "hf", "--num-prompts", str(prompts), "--set", "generation.max_new_tokens=4", "--no-progress")
    info = _completed(slurm_cluster, job, tmp_path, "spin-generate")
    assert info["NodeList"] == "node[1-2]"
    log = _log(tmp_path, "spin-generate", job)
    assert "2 engines (2 nodes x 1" in log

    # Each task answered its own shard (SLURM_PROCID of SLURM_NTASKS); the merge restored prompt order.
    attempt = tmp_path / "logs" / f"spin-generate-{job}" / "attempt-0"
    assert sorted(p.name for p in attempt.iterdir()) == ["generate-rank-0.log", "generate-rank-1.log", "merge-rank-0.log"]
    rows = read_jsonl(out)
    sft = read_jsonl(tiny_loop["sft"])[:prompts]
    assert [r["prompt_id"] for r in rows] == [r["prompt_id"] for r in sft]
    assert [r["chosen"] for r in rows] == [r["response"] for r in sft]

    # A finished output is never redone: the same job again does nothing.
    (again,) = _submit(slurm_cluster, "generate.sbatch", tmp_path, "--model", str(tmp_path / "hf"), "--data",
                       str(tiny_loop["sft"]), "--out", str(out), "--nodes", "2", "--", "--backend", "hf")
    _completed(slurm_cluster, again, tmp_path, "spin-generate")
    assert "generation already done" in _log(tmp_path, "spin-generate", again)


def _signal_during_training(cluster, job: str, workdir: Path, name: str) -> None:
    metrics = workdir / "iter_0" / "train" / "metrics.jsonl"
    deadline = time.time() + 300
    while not (metrics.is_file() and metrics.read_text().count("\n") >= 1):
        assert time.time() < deadline and cluster.job(job)["JobState"] in ("PENDING", "RUNNING"), _log(workdir, name, job)
        time.sleep(0.1)
    # The warning sbatch --signal=B:USR1@S gives before the time limit.
    cluster.run(["scancel", "--signal=USR1", "--batch", job])


def _assert_loop_finished(workdir: Path) -> None:
    summary = json.loads((workdir / "summary.json").read_text())
    assert len(summary["iterations"]) == 1
    total = json.loads((workdir / "iter_0" / "train" / "train_summary.json").read_text())["steps"]
    steps = [r["step"] for r in read_jsonl(workdir / "iter_0" / "train" / "metrics.jsonl")]
    assert total >= 10 and steps == list(range(1, total + 1)), "a training step was lost or repeated"
    assert (workdir / "iter_0" / "hf" / "config.json").is_file()


def test_loop_in_one_allocation_with_torchrun_requeues_and_resumes(slurm_cluster, tiny_loop, tmp_path):
    # Two training ranks under torchrun and two generation engines in parallel, on one node.
    (job,) = _submit(slurm_cluster, "spin_loop.sh", tmp_path, str(tiny_loop["config"]), "--ranks-per-node", "2",
                     "--set", "generation.engines=2")
    _signal_during_training(slurm_cluster, job, tmp_path, "spin-loop")
    info = _completed(slurm_cluster, job, tmp_path, "spin-loop")
    log = _log(tmp_path, "spin-loop", job)
    assert int(info["Restarts"]) == 1, log
    assert "asking spin-mega run to stop its stage" in log and "requeueing job" in log
    first = (tmp_path / "logs" / f"spin-loop-{job}" / "attempt-0" / "run.log").read_text()
    # The ranks checkpointed and stopped (the torchrun agent ignored the signal and reported their exit),
    # rather than dying with an orphaned agent or being killed.
    assert "training of iteration 0 was preempted; its checkpoint is saved" in first, first[-3000:]
    assert "2 engines in parallel" in first
    assert sorted(p.name for p in (tmp_path / "iter_0" / "logs").glob("generate-shard-*.log")) == [
        "generate-shard-0.log", "generate-shard-1.log"]
    train_log = (tmp_path / "iter_0" / "logs" / "train.log").read_text()
    assert "--nproc-per-node=2" in train_log and "--master-port=29500" not in train_log
    second = (tmp_path / "logs" / f"spin-loop-{job}" / "attempt-1" / "run.log").read_text()
    assert "generate with theta_0: done earlier, skipped" in second
    _assert_loop_finished(tmp_path)


def test_loop_as_a_chain_of_jobs(slurm_cluster, tiny_loop, tmp_path):
    first, second = _submit(slurm_cluster, "spin_loop.sh", tmp_path, str(tiny_loop["config"]), "--mode", "chain", "--links", "2")
    assert slurm_cluster.job(second)["Dependency"] == f"afterok:{first}(unfulfilled)"
    _signal_during_training(slurm_cluster, first, tmp_path, "spin-loop")
    _completed(slurm_cluster, first, tmp_path, "spin-loop")
    assert "the next job of the chain continues" in _log(tmp_path, "spin-loop", first)
    _completed(slurm_cluster, second, tmp_path, "spin-loop")
    resumed = (tmp_path / "logs" / f"spin-loop-{second}" / "attempt-0" / "run.log").read_text()
    assert "resuming from" in resumed
    _assert_loop_finished(tmp_path)
