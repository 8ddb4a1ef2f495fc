"""Where each generation engine of a multi-engine set runs: its GPU slice and its own vLLM port.

Engines started together on one node must not share a GPU, and must not race for the same ports (vLLM
binds VLLM_PORT and the ports after it for its internal sockets). Engine k of a node takes GPUs
k*E .. k*E+E-1 of those the node granted (CUDA_VISIBLE_DEVICES, else SLURM_GPUS_ON_NODE, else all
visible devices) and VLLM_PORT = base + k * PORT_STRIDE.

`python -m spin_mega.generation.placement COMMAND...` is the srun task wrapper: it takes engine k =
SLURM_LOCALID and shard SLURM_PROCID of SLURM_NTASKS, checks the slice, and execs COMMAND with
`--shard-index i --num-shards n` appended (exec, so that signals reach the generator directly).
"""

from __future__ import annotations

import os
import sys
from typing import Mapping, Optional

from spin_mega.errors import SpinMegaError

PORT_STRIDE = 16  # ports per engine: vLLM's own sockets start at VLLM_PORT


def granted_gpus(environ: Mapping[str, str]) -> list[str]:
    """The GPU ids this node's tasks may use, as the allocation granted them."""
    visible = environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None:
        return [d for d in visible.split(",") if d.strip() != ""]
    on_node = environ.get("SLURM_GPUS_ON_NODE")
    if on_node and on_node.isdigit():
        return [str(i) for i in range(int(on_node))]
    try:
        import torch

        return [str(i) for i in range(torch.cuda.device_count())]
    except ImportError:
        return []


def base_port(environ: Mapping[str, str]) -> int:
    """The first engine's VLLM_PORT: the user's, or one derived from the Slurm job (jobs sharing a node
    differ), kept below Linux's ephemeral range."""
    if environ.get("VLLM_PORT", "").isdigit():
        return int(environ["VLLM_PORT"])
    job = int(environ.get("SLURM_JOB_ID", "0") or 0)
    restart = int(environ.get("SLURM_RESTART_COUNT", "0") or 0)
    return 24000 + ((job * 4 + restart) % 250) * PORT_STRIDE * 2


def engine_env(engine: int, engine_gpus: int, environ: Mapping[str, str], granted: Optional[list[str]] = None) -> dict:
    """Environment of engine `engine` of a node: its GPU slice (when engine_gpus > 0) and its VLLM_PORT.
    A slice smaller than engine_gpus is refused here, before vLLM starts and fails less clearly."""
    env = {"VLLM_PORT": str(base_port(environ) + engine * PORT_STRIDE)}
    if engine_gpus > 0:
        gpus = granted_gpus(environ) if granted is None else granted
        mine = gpus[engine * engine_gpus : (engine + 1) * engine_gpus]
        if len(mine) != engine_gpus:
            raise SpinMegaError(
                f"generation engine {engine} needs {engine_gpus} GPU(s) (generation.tensor_parallel_size) but the "
                f"node granted {len(gpus)} ({','.join(gpus) or 'none'}), leaving it {len(mine)}"
            )
        env["CUDA_VISIBLE_DEVICES"] = ",".join(mine)
    return env


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: python -m spin_mega.generation.placement COMMAND...", file=sys.stderr)
        return 2
    engine_gpus = int(os.environ.get("SPIN_ENGINE_GPUS", "0") or 0)
    try:
        env = engine_env(int(os.environ.get("SLURM_LOCALID", "0")), engine_gpus, os.environ)
    except SpinMegaError as exc:
        print(f"spin-mega generate: error: {exc}", file=sys.stderr)
        return 2
    os.environ.update(env)
    shard = ["--shard-index", os.environ.get("SLURM_PROCID", "0"), "--num-shards", os.environ.get("SLURM_NTASKS", "1")]
    os.execvp(argv[0], [*argv, *shard])
    return 0  # not reached


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
