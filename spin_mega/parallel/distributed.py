"""Process-group start-up: from torchrun, from plain Slurm tasks, or as a single process.

NCCL with GPUs, gloo without. Megatron's parallel_state is then set up with TP x PP x DP, DP derived.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from spin_mega.errors import SpinMegaError
from spin_mega.parallel import cpu_shim
from spin_mega.parallel.rendezvous import first_slurm_host, free_port, rendezvous_port


@dataclass(frozen=True)
class LaunchEnv:
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    source: str  # "torchrun", "slurm" or "single"


def detect_launch_env() -> LaunchEnv:
    env = os.environ
    if "RANK" in env and "WORLD_SIZE" in env:
        try:
            return LaunchEnv(
                rank=int(env["RANK"]),
                world_size=int(env["WORLD_SIZE"]),
                local_rank=int(env.get("LOCAL_RANK", 0)),
                master_addr=env.get("MASTER_ADDR", "127.0.0.1"),
                master_port=int(env.get("MASTER_PORT", 29500)),
                source="torchrun",
            )
        except ValueError as exc:
            raise SpinMegaError(f"torchrun environment variables are not integers: {exc}") from None
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env and int(env["SLURM_NTASKS"]) > 1:
        nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        master_addr = env.get("MASTER_ADDR") or (first_slurm_host(nodelist) if nodelist else None)
        if not master_addr:
            raise SpinMegaError("under Slurm, set MASTER_ADDR or SLURM_JOB_NODELIST so ranks can find rank 0")
        # Started by srun without launch/train.sbatch (or in its container): the port every rank derives
        # alike, as the batch script would have.
        master_port = int(env.get("MASTER_PORT") or rendezvous_port(env, 0))
        return LaunchEnv(
            rank=int(env["SLURM_PROCID"]),
            world_size=int(env["SLURM_NTASKS"]),
            local_rank=int(env.get("SLURM_LOCALID", 0)),
            master_addr=master_addr,
            master_port=master_port,
            source="slurm",
        )
    return LaunchEnv(0, 1, 0, "127.0.0.1", int(env.get("MASTER_PORT", 0)) or free_port(), "single")


def initialize(
    tensor_parallel: int = 1,
    pipeline_parallel: int = 1,
    seed: int = 1234,
    virtual_pipeline: int = 1,
    expert_parallel: int = 1,
    expert_tensor_parallel: int = 1,
) -> LaunchEnv:
    """Starts torch.distributed and Megatron's model-parallel groups. Safe to call once per process.
    `virtual_pipeline` > 1 selects megatron's interleaved pipeline schedule; `expert_parallel` and
    `expert_tensor_parallel` lay out the experts of an MoE model (checked against the model beforehand:
    parallel/layout.py's check_expert_parallel)."""
    from megatron.core import parallel_state
    from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed

    launch = detect_launch_env()
    model_parallel = tensor_parallel * pipeline_parallel
    if launch.world_size % model_parallel:
        raise SpinMegaError(
            f"{launch.world_size} processes cannot be split into tensor parallel {tensor_parallel} x "
            f"pipeline parallel {pipeline_parallel}: the world size must be a multiple of {model_parallel}"
        )
    expert_grid = expert_tensor_parallel * expert_parallel * pipeline_parallel
    if launch.world_size % expert_grid:
        raise SpinMegaError(
            f"{launch.world_size} processes cannot be split into expert tensor parallel {expert_tensor_parallel} x "
            f"expert parallel {expert_parallel} x pipeline parallel {pipeline_parallel}: the world size must be a "
            f"multiple of {expert_grid}"
        )
    use_cuda = torch.cuda.is_available()
    if use_cuda:
        torch.cuda.set_device(launch.local_rank % torch.cuda.device_count())
    else:
        cpu_shim.enable()
    if not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo",
            init_method=f"tcp://{launch.master_addr}:{launch.master_port}",
            rank=launch.rank,
            world_size=launch.world_size,
            timeout=datetime.timedelta(minutes=int(os.environ.get("SPIN_MEGA_DIST_TIMEOUT_MIN", "30"))),
        )
    if not parallel_state.model_parallel_is_initialized():
        parallel_state.initialize_model_parallel(
            tensor_model_parallel_size=tensor_parallel,
            pipeline_model_parallel_size=pipeline_parallel,
            virtual_pipeline_model_parallel_size=virtual_pipeline if virtual_pipeline > 1 else None,
            expert_model_parallel_size=expert_parallel,
            expert_tensor_parallel_size=expert_tensor_parallel,
        )
    model_parallel_cuda_manual_seed(seed)
    return launch


def shutdown() -> None:
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    if dist.is_initialized():
        dist.destroy_process_group()


def is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0
