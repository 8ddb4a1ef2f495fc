"""Where the ranks of a training meet (torch.distributed's MASTER_ADDR and MASTER_PORT) when no launcher
says so: the first host of a Slurm job and a port derived from the job, or a free local port.

The one derivation for the Slurm scripts (launch/common.sh asks `python -m spin_mega.loop.slurm`), the
loop's srun steps (spin_mega/loop/slurm.py) and a rank started under Slurm without either (distributed.py).
Imports nothing heavy: the batch scripts run it before every job step.
"""

from __future__ import annotations

import re
import socket
from typing import Mapping

from spin_mega.errors import SpinMegaError


def first_slurm_host(nodelist: str) -> str:
    """The first host of a Slurm node list such as `gpu[03-05,07],login1` without calling scontrol (which
    is not on every compute image)."""
    match = re.match(r"([^,\[]+)(\[([^\]]+)\])?", nodelist.strip())
    if not match:
        raise SpinMegaError(f"cannot read the Slurm node list {nodelist!r}")
    prefix, _, ranges = match.groups()
    if not ranges:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return f"{prefix}{first}"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def rendezvous_port(environ: Mapping[str, str], launch: int) -> int:
    """torch.distributed's port for the `launch`-th training stage of this process: derived from the Slurm
    job and its restart (jobs sharing a node differ, a requeued attempt never waits on the previous one's
    socket), below Linux's ephemeral range; a free port outside Slurm. Never torchrun's default 29500."""
    job = environ.get("SLURM_JOB_ID", "")
    if not job.isdigit():
        return free_port()
    restart = int(environ.get("SLURM_RESTART_COUNT", "0") or 0)
    return 15000 + (int(job) % 270) * 64 + (restart * 8 + launch) % 64


def slurm_rendezvous(environ: Mapping[str, str], launch: int) -> tuple[str, int]:
    """(MASTER_ADDR, MASTER_PORT) of the `launch`-th training of the Slurm job described by ENVIRON."""
    nodelist = environ.get("SLURM_JOB_NODELIST") or environ.get("SLURM_NODELIST") or ""
    if not nodelist:
        raise SpinMegaError("SLURM_JOB_NODELIST is not set: the rendezvous host is the allocation's first node")
    return first_slurm_host(nodelist), rendezvous_port(environ, launch)
