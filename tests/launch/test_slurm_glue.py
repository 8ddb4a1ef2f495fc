"""launch/common.sh on a real two-node Slurm cluster, around a stand-in trainer (toy_trainer.py): the
rendezvous reaches across both nodes, exit status 75 after a signal turns into a requeue, and the
requeued job resumes to the same end as an uninterrupted run. Independent of the real trainer, so a
failure here points at the shell glue."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.launch.slurm_harness import LAUNCH, read_jsonl

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

HERE = Path(__file__).resolve().parent


def _submit_toy(cluster, workdir: Path, *args: str) -> str:
    out = cluster.run(
        ["sbatch", "--parsable", "--nodes=2", "--ntasks-per-node=1", f"--output={workdir}/batch-%j.log",
         str(HERE / "toy.sbatch"), "--workdir", str(workdir), "--gpus-per-node", "0", *args],
        env={"SPIN_LAUNCH_DIR": str(LAUNCH), "SPIN_TOY_TRAINER": str(HERE / "toy_trainer.py")},
    ).stdout
    return out.strip().split(";")[0]


def _expected_totals(steps: int) -> list[float]:
    # Two ranks add (rank + 1) * step: 3 * step per step.
    totals, total = [], 0.0
    for step in range(1, steps + 1):
        total += 3.0 * step
        totals.append(total)
    return totals


def test_allreduce_across_two_nodes(slurm_cluster, tmp_path):
    job = _submit_toy(slurm_cluster, tmp_path, "--steps", "3")
    info = slurm_cluster.wait(job, timeout=180)
    log = (tmp_path / f"batch-{job}.log").read_text()
    assert info["JobState"] == "COMPLETED", log
    assert info["ExitCode"] == "0:0"

    (ranks,) = read_jsonl(tmp_path / "toy_ranks.jsonl")
    assert sorted(r["node"] for r in ranks) == ["node1", "node2"]
    assert {r["source"] for r in ranks} == {"slurm"}
    # MASTER_ADDR is the allocation's first host, MASTER_PORT the job-derived one exported by common.sh.
    assert {r["master"].split(":")[0] for r in ranks} == {"node1"}
    assert [m["total"] for m in read_jsonl(tmp_path / "toy_metrics.jsonl")] == _expected_totals(3)

    attempt = tmp_path / "logs" / f"spin-toy-{job}" / "attempt-0"
    assert sorted(p.name for p in attempt.iterdir()) == ["toy-rank-0.log", "toy-rank-1.log"]


def test_signal_checkpoints_requeues_and_resumes(slurm_cluster, tmp_path):
    steps = 30
    job = _submit_toy(slurm_cluster, tmp_path, "--steps", str(steps), "--step-seconds", "0.5")
    metrics = tmp_path / "toy_metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and not (metrics.exists() and len(read_jsonl(metrics)) >= 3):
        time.sleep(0.2)
    assert metrics.exists(), (tmp_path / f"batch-{job}.log").read_text()
    # What `sbatch --signal=B:USR1@S` delivers before the time limit: USR1 to the batch shell only.
    slurm_cluster.run(["scancel", "--signal=USR1", "--batch", job])

    info = slurm_cluster.wait(job, timeout=300)
    log = (tmp_path / f"batch-{job}.log").read_text()
    assert info["JobState"] == "COMPLETED", log
    assert int(info["Restarts"]) == 1, log
    assert "requeueing job" in log
    rows = read_jsonl(metrics)
    assert [r["step"] for r in rows] == list(range(1, steps + 1)), "a step was lost or repeated across the requeue"
    assert [r["total"] for r in rows] == _expected_totals(steps)
    assert len(read_jsonl(tmp_path / "toy_ranks.jsonl")) == 2, "expected two attempts"
    assert (tmp_path / "logs" / f"spin-toy-{job}" / "attempt-1" / "toy-rank-0.log").exists()
