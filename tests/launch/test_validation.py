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
        ("spin_loop.sh", [str(CONFIG), "--workdir", "{tmp}", "--nodes", "2", "--container-image", "img.sqsh"], {},
         "--container-image runs the loop on one node"),
        ("spin_loop.sh", [str(CONFIG), "--workdir", "{tmp}", "--gpus-per-node", "0", "--ranks-per-node", "3"], {},
         "global batch 16 is not a multiple of micro batch 4 x data parallel 3"),
        ("train.sbatch", [str(CONFIG), "--workdir", "{tmp}", "--container-image", "img.sqsh", "--tp", "1", "--pp", "1",
                          "--set", "data.train_path=/nonexistent/dir/train.jsonl"], {},
         "/nonexistent/dir/train.jsonl is outside every container mount"),
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


# ---------------------------------------------------------------------------------------------------------
# The command lines the scripts build, printed with --dry-run (no pyxis, no GPUs here): at submission, and
# inside an allocation described by the variables Slurm sets in a job.

# A global batch that 8 or 16 data-parallel ranks split into whole micro-batches (tiny-cpu.yaml's 16 does not).
BIG_BATCH = ("--set", "train.global_batch_size=64")


def _allocation(gpus_on_node: str = "8") -> dict:
    return {"SLURM_JOB_ID": "4242", "SLURM_JOB_NUM_NODES": "2", "SLURM_JOB_NODELIST": "node[1-2]",
            "SLURM_CPUS_ON_NODE": "64", "SLURM_GPUS_ON_NODE": gpus_on_node, "MASTER_ADDR": "node1"}


def _printed(result: subprocess.CompletedProcess) -> list[str]:
    assert result.returncode == 0, result.stderr
    return result.stdout.strip().splitlines()[-1].split()


def _option(command: list[str], name: str) -> str:
    values = [word.split("=", 1)[1] for word in command if word.startswith(name + "=")]
    assert len(values) == 1, (name, command)
    return values[0]


def test_jobs_ask_for_whole_nodes_and_one_task_per_training_rank(tmp_path):
    one = _printed(_launch("spin_loop.sh", str(CONFIG), "--workdir", str(tmp_path), "--gpus-per-node", "8", *BIG_BATCH, "--dry-run",
                           cwd=tmp_path))
    # The loop's one orchestrating task gets the whole node: its stages start the ranks and engines.
    assert "--exclusive" in one and "--mem=0" in one and "--ntasks-per-node=1" in one and "--gpus-per-node=8" in one
    two = _printed(_launch("spin_loop.sh", str(CONFIG), "--workdir", str(tmp_path), "--nodes", "2", "--gpus-per-node", "4",
                           *BIG_BATCH, "--dry-run", cwd=tmp_path))
    assert "--nodes=2" in two and "--ntasks-per-node=4" in two and "--exclusive" in two
    shared = _printed(_launch("train.sbatch", str(CONFIG), "--workdir", str(tmp_path), "--no-exclusive", "--cpus-per-task", "6",
                              *BIG_BATCH, "--dry-run", cwd=tmp_path))
    assert "--exclusive" not in shared and not any(w.startswith("--mem=") for w in shared) and "--cpus-per-task=6" in shared
    convert = _printed(_launch("convert.sbatch", "mcore-to-hf", "--mcore", str(tmp_path), "--out", str(tmp_path / "hf"),
                               "--dry-run", cwd=tmp_path))
    assert "--exclusive" not in convert, "a one-process conversion must not take a whole GPU node"


def test_steps_get_the_allocations_cpus_and_gpus(tmp_path):
    train = _printed(_launch("train.sbatch", str(CONFIG), "--workdir", str(tmp_path), *BIG_BATCH, "--dry-run",
                             env=_allocation(), cwd=tmp_path))
    assert train[0] == "srun" and "--ntasks-per-node=8" in train and "--cpus-per-task=8" in train
    # What the allocation granted wins over the default request, and a different explicit request is refused.
    four = _printed(_launch("train.sbatch", str(CONFIG), "--workdir", str(tmp_path), *BIG_BATCH, "--dry-run",
                            env=_allocation(gpus_on_node="4"), cwd=tmp_path))
    assert "--ntasks-per-node=4" in four and "--cpus-per-task=16" in four
    line = _one_error(_launch("train.sbatch", str(CONFIG), "--workdir", str(tmp_path), "--gpus-per-node", "8", *BIG_BATCH, "--dry-run",
                              env={**_allocation(gpus_on_node="4"), "SPIN_GPUS_PER_NODE": "8"}, cwd=tmp_path))
    assert "asked for 8 GPUs per node (SPIN_GPUS_PER_NODE/--gpus-per-node) but the allocation granted 4" in line

    model = tmp_path / "models" / "theta"
    model.mkdir(parents=True)
    gen = _printed(_launch("generate.sbatch", "--workdir", str(tmp_path), "--model", str(model), "--data", str(CONFIG),
                           "--out", str(tmp_path / "g.jsonl"), "--engine-gpus", "2", "--dry-run", env=_allocation(), cwd=tmp_path))
    assert "--ntasks-per-node=4" in gen and "--cpus-per-task=16" in gen
    assert gen[gen.index("-m") + 1] == "spin_mega.generation.placement"
    assert gen[-2:] == ["--set", "generation.tensor_parallel_size=2"]


def test_rendezvous_and_exit_codes_come_from_the_python_side(tmp_path):
    from spin_mega.parallel.rendezvous import rendezvous_port
    from spin_mega.rundir import EXIT_BAD_INPUT, EXIT_PREEMPTED

    result = _launch("train.sbatch", str(CONFIG), "--workdir", str(tmp_path), *BIG_BATCH, "--dry-run",
                     env={**_allocation(), "MASTER_ADDR": "", "SLURM_RESTART_COUNT": "3"}, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    port = rendezvous_port({"SLURM_JOB_ID": "4242", "SLURM_RESTART_COUNT": "3"}, 0)
    assert f"rendezvous node1:{port};" in result.stderr, result.stderr
    codes = subprocess.run(["bash", "-c", f'source "{LAUNCH}/common.sh"; echo "$SPIN_EX_USAGE $SPIN_EX_TEMPFAIL"'],
                           capture_output=True, text=True, check=True, timeout=60)
    assert codes.stdout.split() == [str(EXIT_BAD_INPUT), str(EXIT_PREEMPTED)]


def test_container_steps_mount_every_path_they_are_given(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    venv = Path(sys.executable).parents[1]
    config = tmp_path / "cfg" / "run.yaml"
    config.parent.mkdir()
    model_dir = tmp_path / "models"
    model_dir.mkdir()
    config.write_text(CONFIG.read_text() + f"\nstart_model: {model_dir}/theta0  # absolute paths in the config too\n")
    args = [str(config), "--workdir", str(tmp_path), "--container-image", "nvcr.io#nvidia/pytorch:25.01-py3", "--tp", "1",
            "--pp", "1", "--venv", str(venv), "--set", f"data.train_path={data}/train.jsonl", "--dry-run"]
    env = {**_allocation(), "SPIN_PYTHON": ""}
    train = _printed(_launch("train.sbatch", *args, env=env, cwd=tmp_path))
    mounts = _option(train, "--container-mounts").split(",")
    for directory in (config.parent, model_dir, data, venv, tmp_path, LAUNCH):
        real = str(Path(directory).resolve())
        assert f"{real}:{real}" in mounts, (real, mounts)
    assert "--no-container-mount-home" in train
    assert _option(train, "--container-name") == "spin-4242"
    assert _option(train, "--container-image") == "nvcr.io#nvidia/pytorch:25.01-py3"

    # The loop on one node: the batch script stays on the host (it runs `scontrol requeue`); only
    # `spin-mega run` goes into the image, as one srun step.
    loop = _printed(_launch("spin_loop.sh", str(config), "--workdir", str(tmp_path), "--container-image", "img.sqsh",
                            "--venv", str(venv), *BIG_BATCH, "--dry-run", env={**env, "SLURM_JOB_NUM_NODES": "1",
                                                                   "SLURM_JOB_NODELIST": "node1"}, cwd=tmp_path))
    assert loop[0] == "srun" and "--ntasks=1" in loop and "--cpus-per-task=64" in loop and "--no-container-mount-home" in loop
    assert loop[loop.index("run") - 2:loop.index("run")] == ["-m", "spin_mega"]
    assert loop[loop.index("--launcher") + 1] == "local" and loop[loop.index("--nproc") + 1] == "8"
