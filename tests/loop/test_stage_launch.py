"""How `spin-mega run` places its stages, checked without a cluster or a GPU: each generation engine's GPU
slice and vLLM port, the training rendezvous, the srun steps across an allocation, and the environment
training ranks get. The Slurm tests (test_loop_slurm.py, test_stages_slurm.py) run these for real."""

from __future__ import annotations

import subprocess
import sys

import pytest

from spin_mega.config import SpinConfig
from spin_mega.errors import SpinMegaError
from spin_mega.generation.placement import engine_env
from spin_mega.loop.local import LocalStages
from spin_mega.loop.slurm import SlurmStages
from spin_mega.loop.stages import training_env
from spin_mega.parallel.rendezvous import rendezvous_port, slurm_rendezvous

NODE = {"CUDA_VISIBLE_DEVICES": "4,5,6,7", "SLURM_JOB_ID": "90210"}


def test_engines_of_a_node_get_disjoint_gpu_slices_and_ports():
    envs = [engine_env(k, 2, NODE) for k in range(2)]
    assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == ["4,5", "6,7"]
    ports = [int(e["VLLM_PORT"]) for e in envs]
    assert ports[1] - ports[0] >= 16 and max(ports) < 32768, ports
    # A slice shorter than the engine's tensor-parallel size is refused before vLLM starts.
    with pytest.raises(SpinMegaError, match="engine 2 needs 2 GPU\\(s\\).*granted 4 \\(4,5,6,7\\), leaving it 0"):
        engine_env(2, 2, NODE)
    # Granted by Slurm without CUDA_VISIBLE_DEVICES: SLURM_GPUS_ON_NODE counts them.
    assert engine_env(1, 4, {"SLURM_GPUS_ON_NODE": "8"})["CUDA_VISIBLE_DEVICES"] == "4,5,6,7"


def test_engine_wrapper_refuses_a_short_slice_with_one_line():
    result = subprocess.run([sys.executable, "-m", "spin_mega.generation.placement", "true"], capture_output=True, text=True,
                            env={"CUDA_VISIBLE_DEVICES": "0", "SPIN_ENGINE_GPUS": "2", "SLURM_LOCALID": "0",
                                 "PATH": "/usr/bin:/bin"}, timeout=120)
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        "spin-mega generate: error: generation engine 0 needs 2 GPU(s) (generation.tensor_parallel_size) but the node "
        "granted 1 (0), leaving it 1"]


def test_rendezvous_ports_follow_the_job_never_29500():
    job = {"SLURM_JOB_ID": "123456"}
    ports = {rendezvous_port(job, launch) for launch in range(1, 5)}
    ports |= {rendezvous_port({**job, "SLURM_RESTART_COUNT": "1"}, launch) for launch in range(1, 5)}
    assert len(ports) == 8 and all(15000 <= p < 32768 for p in ports), ports
    assert 29500 not in ports and rendezvous_port({}, 1) != 29500


def test_batch_scripts_ask_the_same_rendezvous_without_importing_torch():
    """launch/common.sh exports what `python -m spin_mega.loop.slurm rendezvous` prints; ranks started without
    it (a container, a bare srun) derive the same (tests/parallel/test_distributed_env.py)."""
    env = {"PATH": "/usr/bin:/bin", "SLURM_JOB_ID": "123456", "SLURM_JOB_NODELIST": "gpu[07-10]", "SLURM_RESTART_COUNT": "2"}
    probe = ("import runpy, sys; sys.argv = ['slurm', 'rendezvous']\n"
             "try:\n    runpy.run_module('spin_mega.loop.slurm', run_name='__main__')\n"
             "finally:\n    print('torch' in sys.modules, file=sys.stderr)")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["gpu07", str(rendezvous_port(env, 0))] == ["gpu07", str(15000 + 66 * 64 + 16)]
    assert result.stderr.strip() == "False"
    missing = subprocess.run([sys.executable, "-m", "spin_mega.loop.slurm", "rendezvous"], capture_output=True, text=True,
                             env={"PATH": "/usr/bin:/bin", "SLURM_JOB_ID": "7"}, timeout=120)
    assert missing.returncode == 2 and missing.stderr.strip() == (
        "spin-mega launch: error: SLURM_JOB_NODELIST is not set: the rendezvous host is the allocation's first node")


def test_training_ranks_get_one_cuda_queue_only_with_tensor_parallelism():
    cfg = SpinConfig()
    assert training_env(cfg) == {}
    cfg.parallel.tensor_parallel = 2
    assert training_env(cfg) == {"CUDA_DEVICE_MAX_CONNECTIONS": "1"}


def test_engines_per_node_follow_the_gpus_and_the_engine_size(tmp_path):
    cfg = SpinConfig()
    cfg.generation.tensor_parallel_size = 2
    stages = LocalStages(cfg, tmp_path, 8)
    assert stages.engines_per_node(8) == (4, 2)
    assert stages.engines_per_node(0) == (1, 0)
    cfg.generation.engines = 3
    assert stages.engines_per_node(8) == (3, 2)
    cfg.generation.engines = 5
    with pytest.raises(SpinMegaError, match="do not fit the 8 GPU"):
        stages.engines_per_node(8)


def test_slurm_steps_span_the_allocation_with_its_cpus(tmp_path):
    env = {"SLURM_JOB_ID": "77", "SLURM_JOB_NUM_NODES": "4", "SLURM_JOB_NODELIST": "gpu[010-013]",
           "SLURM_CPUS_ON_NODE": "96", "SLURM_GPUS_ON_NODE": "8"}
    stages = SlurmStages(SpinConfig(), tmp_path, 8, environ=env)
    assert stages.srun(4, 8) == ["srun", "--nodes=4", "--ntasks=32", "--ntasks-per-node=8", "--kill-on-bad-exit=0",
                                 "--cpus-per-task=12"]
    assert stages.srun(1, 1)[-1] == "--cpus-per-task=96"
    assert slurm_rendezvous(env, 1) == ("gpu010", rendezvous_port(env, 1))
    assert stages.gpus_per_node == 8 and stages.engines_per_node(stages.gpus_per_node) == (8, 1)
    with pytest.raises(SpinMegaError, match="inside a Slurm allocation"):
        SlurmStages(SpinConfig(), tmp_path, 1, environ={})
