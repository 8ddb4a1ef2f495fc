"""The launch scripts refuse bad requests with one clear line and a non-zero exit before any work starts:
at submission (nothing reaches the queue) and inside the job (the allocation is released at once)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.launch.slurm_harness import LAUNCH

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "tiny-cpu.yaml"
ERROR_PREFIX = "spin-mega launch: error:"


def _launch(script: str, *args: str, env: dict | None = None, cwd: Path | None = None) -> subprocess.CompletedProcess:
    base = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SPIN_"))}
    full_env = {**base, "SPIN_PYTHON": sys.executable, **(env or {})}
    return subprocess.run([str(LAUNCH / script), *args], capture_output=True, text=True, env=full_env, cwd=cwd, timeout=120)


def _one_error(result: subprocess.CompletedProcess) -> str:
    errors = [line for line in result.stderr.splitlines() if line.startswith(ERROR_PREFIX)]
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    assert len(errors) == 1 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    return errors[0]


# ---------------------------------------------------------------------------------------------------------
# At submission: pure shell and spin-mega's config loader, no Slurm daemon involved (they fail before sbatch),
# so these run in every test session.

@pytest.mark.parametrize(
    "script, args, env, message",
    [
        ("train.sbatch", [str(CONFIG), "--nodes", "2", "--gpus-per-node", "0"], {}, "no work directory: pass --workdir DIR or set SPIN_WORKDIR"),
        ("train.sbatch", [str(CONFIG), "--workdir", "/nonexistent/spin"], {}, "work directory /nonexistent/spin does not exist"),
        ("train.sbatch", ["--workdir", "{tmp}"], {}, "no run configuration"),
        ("train.sbatch", ["/nonexistent.yaml", "--workdir", "{tmp}"], {}, "config file /nonexistent.yaml does not exist"),
        ("train.sbatch", [str(CONFIG), "--workdir", "{tmp}", "--nodes", "2", "--gpus-per-node", "0", "--tp", "3"], {},
         "tensor parallel 3 x pipeline parallel 1 = 3 does not divide the world size 2 (2 nodes x 1 tasks per node)"),
        ("train.sbatch", [str(CONFIG), "--workdir", "{tmp}", "--nodes", "4", "--tp", "8", "--pp", "3"], {},
         "tensor parallel 8 x pipeline parallel 3 = 24 does not divide the world size 32"),
        ("train.sbatch", [str(CONFIG), "--workdir", "{tmp}", "--nodes", "3", "--gpus-per-node", "8"], {},
         "global batch 16 is not a multiple of micro batch 4 x data parallel 24"),
        ("train.sbatch", [str(CONFIG), "--workdir", "{tmp}", "--set", "train.micro_batchsize=2"], {},
         "unknown config key 'train.micro_batchsize'"),
        ("train.sbatch", [str(CONFIG), "--workdir", "{tmp}", "--nodes", "two"], {}, "node count must be a positive whole number"),
        ("train.sbatch", [str(CONFIG)], {"SPIN_WORKDIR": "{tmp}", "SPIN_VENV": "/nonexistent/venv", "SPIN_PYTHON": ""},
         "SPIN_VENV=/nonexistent/venv has no bin/python"),
        ("generate.sbatch", ["--workdir", "{tmp}", "--data", str(CONFIG), "--out", "{tmp}/g.jsonl"], {}, "no model: pass --model HF_DIR"),
        ("generate.sbatch", ["--workdir", "{tmp}", "--model", "{tmp}", "--data", str(CONFIG), "--out", "{tmp}/g.jsonl",
                             "--engine-gpus", "3"], {}, "--engine-gpus 3 does not divide the 8 GPUs of a node"),
        ("convert.sbatch", ["--hf", "{tmp}", "--out", "{tmp}/m"], {}, "no direction"),
        ("convert.sbatch", ["hf-to-mcore", "--hf", "/nonexistent/hf", "--out", "{tmp}/m"], {}, "input directory /nonexistent/hf does not exist"),
        ("convert.sbatch", ["mcore-to-hf", "--mcore", "{tmp}", "--out", "/nonexistent/dir/hf"], {},
         "work directory /nonexistent/dir does not exist"),
        ("spin_loop.sh", [str(CONFIG), "--workdir", "{tmp}", "--mode", "allocation", "--nodes", "2"], {},
         "spin-mega run trains on one node"),
        ("spin_loop.sh", [str(CONFIG), "--workdir", "{tmp}", "--mode", "sideways"], {}, "--mode is allocation or chain"),
    ],
)
def test_refused_at_submission_with_one_clear_line(tmp_path, script, args, env, message):
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    env = {k: v.replace("{tmp}", str(tmp_path)) for k, v in env.items()}
    line = _one_error(_launch(script, *args, env=env, cwd=tmp_path))
    assert message in line
    assert not (tmp_path / "logs").exists(), "something was set up although the request was refused"


def test_submission_turns_flags_into_sbatch_options(tmp_path):
    result = _launch(
        "train.sbatch", str(CONFIG), "--workdir", str(tmp_path), "--nodes", "4", "--gpus-per-node", "8", "--tp", "8",
        "--pp", "4", "--partition", "gpu", "--account", "proj", "--time", "24:00:00", "--signal-seconds", "900",
        "--set", "train.global_batch_size=64", "--dry-run", cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    command = result.stdout.split()
    for option in ("--nodes=4", "--ntasks-per-node=8", "--gpus-per-node=8", "--partition=gpu", "--account=proj",
                   "--time=24:00:00", "--signal=B:USR1@900", "--requeue", f"--output={tmp_path}/logs/%x-%j.log"):
        assert option in command, (option, result.stdout)
    assert str(LAUNCH / "train.sbatch") in command


# ---------------------------------------------------------------------------------------------------------
# Inside the job: what the allocation actually is can only be checked there.

def _sbatch_fails_before_work(cluster, tmp_path: Path, sbatch_args: list[str], script_args: list[str], env: dict) -> str:
    log = tmp_path / "job.log"
    out = cluster.run(["sbatch", "--parsable", f"--output={log}", *sbatch_args, str(LAUNCH / "train.sbatch"), *script_args],
                      env=env, cwd=tmp_path).stdout
    job = out.strip().split(";")[0]
    info = cluster.wait(job, timeout=120)
    text = log.read_text()
    assert info["JobState"] == "FAILED" and info["ExitCode"] == "2:0", text
    errors = [line for line in text.splitlines() if line.startswith(ERROR_PREFIX)]
    assert len(errors) == 1, text
    assert "step:" not in text, "an srun step started before validation finished"
    assert not list(tmp_path.glob("*/logs")) and not (tmp_path / "w" / "metrics.jsonl").exists()
    return errors[0]


@pytest.mark.slurm
@pytest.mark.slow
@pytest.mark.parametrize(
    "case, sbatch_args, script_args, env, message",
    [
        ("nodes", ["--nodes=2", "--ntasks-per-node=1"], ["{config}", "--workdir", "{w}", "--gpus-per-node", "0"],
         {"SPIN_NODES": "3"}, "asked for 3 nodes (SPIN_NODES/--nodes) but the allocation has 2 (node[1-2])"),
        ("layout", ["--nodes=2", "--ntasks-per-node=1"], ["{config}", "--workdir", "{w}", "--gpus-per-node", "0", "--pp", "3"],
         {}, "does not divide the world size 2"),
        ("workdir", ["--nodes=1"], ["{config}", "--workdir", "{tmp}/missing", "--gpus-per-node", "0"],
         {}, "work directory {tmp}/missing does not exist"),
        ("unset", ["--nodes=1"], ["{config}", "--gpus-per-node", "0"], {}, "no work directory"),
    ],
)
def test_refused_inside_the_job_before_any_step(slurm_cluster, tmp_path, case, sbatch_args, script_args, env, message):
    (tmp_path / "w").mkdir()
    subs = {"{config}": str(CONFIG), "{w}": str(tmp_path / "w"), "{tmp}": str(tmp_path)}

    def fill(text: str) -> str:
        for key, value in subs.items():
            text = text.replace(key, value)
        return text

    line = _sbatch_fails_before_work(slurm_cluster, tmp_path, sbatch_args, [fill(a) for a in script_args],
                                     {k: fill(v) for k, v in env.items()})
    assert fill(message) in line
