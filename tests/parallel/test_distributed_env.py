"""Launch-environment detection: torchrun variables, plain Slurm tasks, a single process."""

from __future__ import annotations

import pytest

from spin_mega.parallel.distributed import detect_launch_env
from spin_mega.parallel.rendezvous import first_slurm_host


@pytest.mark.parametrize(
    "nodelist, host",
    [("node1", "node1"), ("gpu[03-05,07]", "gpu03"), ("node[1-2]", "node1"), ("a100-[12,14],login1", "a100-12")],
)
def test_first_slurm_host(nodelist, host):
    assert first_slurm_host(nodelist) == host


def test_slurm_tasks(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "SLURM_RESTART_COUNT"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    monkeypatch.setenv("SLURM_JOB_NODELIST", "gpu[07-10]")
    monkeypatch.setenv("SLURM_JOB_ID", "123456")
    env = detect_launch_env()
    assert (env.rank, env.world_size, env.local_rank, env.master_addr, env.source) == (5, 8, 1, "gpu07", "slurm")
    # The port launch/train.sbatch exports for this job (its first training): 15000 + (123456 % 270) * 64.
    assert env.master_port == 19224


def test_torchrun_wins_over_slurm(monkeypatch):
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_NTASKS", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("MASTER_ADDR", "10.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29511")
    env = detect_launch_env()
    assert (env.rank, env.world_size, env.master_addr, env.master_port, env.source) == (1, 4, "10.0.0.1", 29511, "torchrun")
