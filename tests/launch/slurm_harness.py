"""A real two-node Slurm cluster on this one machine, for the launch/ tests (the fixture is in conftest.py).

One munged, one slurmctld and two slurmd (`-N node1`, `-N node2`, both on 127.0.0.1 with their own
ports) run from a temporary directory with their own munge key and slurm.conf; clients find it through
SLURM_CONF, so a system Slurm (if any) is neither used nor disturbed. The cluster lives for the test
session and is always torn down: jobs cancelled, daemons stopped by pid, /etc/hosts restored.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
LAUNCH = REPO / "launch"
NODES = ("node1", "node2")
HOSTS_MARK = "# spin-mega launch tests"
DAEMONS = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "squeue", "sinfo", "scancel")
TERMINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "PREEMPTED"}


def _free_ports(n: int) -> list[int]:
    # Held open together so that the n ports are distinct.
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _resolves(name: str) -> bool:
    try:
        socket.gethostbyname(name)
        return True
    except OSError:
        return False


class SlurmCluster:
    def __init__(self, root: Path):
        self.root = root
        self.conf = root / "slurm.conf"
        self.procs: dict[str, subprocess.Popen] = {}
        self.hosts_added: str | None = None
        self.env = dict(os.environ, SLURM_CONF=str(self.conf))
        # The submitting environment travels into the jobs (sbatch --export=ALL): stale Slurm or torchrun
        # variables from an enclosing job would confuse the launch scripts.
        for key in list(self.env):
            if key.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_")) and key != "SLURM_CONF":
                del self.env[key]
        for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            self.env.pop(key, None)
        self.env.update(
            PATH=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}",
            SPIN_PYTHON=sys.executable,
            OMP_NUM_THREADS="1",
            PYTHONWARNINGS="ignore",
        )

    # ------------------------------------------------------------------ set-up
    def start(self) -> None:
        root = self.root
        for sub in ("state", "log", "run", "spool/node1", "spool/node2"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        key = root / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        sock = root / "run" / "munge.sock"
        self._add_hosts()

        ctld_port, node1_port, node2_port = _free_ports(3)
        hostname = socket.gethostname()
        self.conf.write_text(
            f"""\
ClusterName=spintest{os.getpid()}
SlurmctldHost={hostname}(127.0.0.1)
SlurmctldPort={ctld_port}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire also sets how long a requeued job waits before it may start again (default 120 s).
AuthInfo=socket={sock},cred_expire=5
StateSaveLocation={root}/state
SlurmdSpoolDir={root}/spool/%n
SlurmctldPidFile={root}/run/slurmctld.pid
SlurmdPidFile={root}/run/slurmd-%n.pid
SlurmctldLogFile={root}/log/slurmctld.log
SlurmdLogFile={root}/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
ProctrackType=proctrack/pgid
TaskPlugin=task/none
SwitchType=switch/none
MpiDefault=none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
KillWait=30
MinJobAge=3600
InactiveLimit=0
PlugStackConfig={root}/plugstack.conf
NodeName=node1 NodeHostname=localhost NodeAddr=127.0.0.1 Port={node1_port} CPUs=1 State=UNKNOWN
NodeName=node2 NodeHostname=localhost NodeAddr=127.0.0.1 Port={node2_port} CPUs=1 State=UNKNOWN
PartitionName=debug Nodes=node[1-2] Default=YES MaxTime=INFINITE State=UP
"""
        )
        (root / "plugstack.conf").write_text("")
        self._spawn(
            "munged",
            ["munged", "-F", "--force", f"--key-file={key}", f"--socket={sock}",
             f"--pid-file={root}/run/munged.pid", f"--log-file={root}/log/munged.log",
             f"--seed-file={root}/run/munged.seed"],
        )
        self._wait_for(sock.exists, 20, "munged did not create its socket")
        self._spawn("slurmctld", ["slurmctld", "-D", "-i", "-f", str(self.conf)])
        for node in NODES:
            self._spawn(f"slurmd-{node}", ["slurmd", "-D", "-N", node, "-f", str(self.conf)])
        self._wait_for(self._nodes_idle, 90, "the two nodes did not become idle")

    def _spawn(self, name: str, cmd: list[str]) -> None:
        out = open(self.root / "log" / f"{name}.stdout", "ab")
        self.procs[name] = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=self.env,
                                            cwd=self.root, start_new_session=True)

    def _add_hosts(self) -> None:
        # MASTER_ADDR is the first node's name, so the node names must resolve on every "node". A name
        # that resolves only through another test session's line is added again under this session's own
        # line: the other session removes its line when it ends, possibly while these jobs still run.
        others = HOSTS_MARK in Path("/etc/hosts").read_text()
        missing = [n for n in NODES if others or not _resolves(n)]
        if not missing:
            return
        line = f"127.0.0.1 {' '.join(missing)} {HOSTS_MARK} (pid {os.getpid()})\n"
        with open("/etc/hosts", "a") as handle:
            handle.write(line)
        self.hosts_added = line

    def _nodes_idle(self) -> bool:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}\n{self.logs()}")
        out = self.run(["sinfo", "-h", "-N", "-o", "%N %T"], check=False).stdout
        states = dict(line.split() for line in out.splitlines() if line.strip())
        return all(states.get(n) == "idle" for n in NODES)

    def _wait_for(self, predicate, timeout: float, message: str) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if predicate():
                return
            time.sleep(0.5)
        raise RuntimeError(f"{message} within {timeout} s\n{self.logs()}")

    # ------------------------------------------------------------------ tear-down
    def stop(self) -> None:
        try:
            if "slurmctld" in self.procs and self.procs["slurmctld"].poll() is None:
                ids = self.run(["squeue", "-h", "-o", "%i"], check=False).stdout.split()
                if ids:
                    self.run(["scancel", *ids], check=False)
                    deadline = time.time() + 60
                    while time.time() < deadline and self.run(["squeue", "-h", "-o", "%i"], check=False).stdout.strip():
                        time.sleep(1)
        finally:
            for name in reversed(list(self.procs)):
                proc = self.procs[name]
                if proc.poll() is None:
                    proc.terminate()
                    try:
                        proc.wait(20)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        proc.wait(10)
            self._kill_leftover_steps()
            if self.hosts_added:
                text = Path("/etc/hosts").read_text()
                Path("/etc/hosts").write_text(text.replace(self.hosts_added, "", 1))

    def _kill_leftover_steps(self) -> None:
        # slurmstepd detaches from slurmd; one still alive here belongs to this cluster only if it
        # carries this cluster's SLURM_CONF, which is how it is picked out (by pid, nothing else).
        marker = f"SLURM_CONF={self.conf}".encode()
        for proc_dir in Path("/proc").iterdir():
            if not proc_dir.name.isdigit():
                continue
            try:
                if not (proc_dir / "cmdline").read_bytes().startswith(b"slurmstepd"):
                    continue
                if marker in (proc_dir / "environ").read_bytes().split(b"\0"):
                    os.kill(int(proc_dir.name), signal.SIGKILL)
            except (OSError, ProcessLookupError):
                continue

    # ------------------------------------------------------------------ helpers for tests
    def run(self, cmd: list[str], check: bool = True, env: dict | None = None, timeout: float = 120, cwd=None):
        result = subprocess.run(cmd, capture_output=True, text=True, env={**self.env, **(env or {})},
                                timeout=timeout, cwd=cwd)
        if check and result.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
        return result

    def job(self, job_id: str) -> dict:
        out = self.run(["scontrol", "show", "job", "-o", job_id]).stdout
        return dict(re.findall(r"(\w+)=(\S*)", out))

    def wait(self, job_id: str, timeout: float = 600) -> dict:
        """Waits until the job has ended for good (a requeued job passes through PENDING again)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in TERMINAL_STATES:
                return info
            time.sleep(1)
        self.run(["scancel", job_id], check=False)
        raise TimeoutError(f"job {job_id} still {self.job(job_id).get('JobState')} after {timeout} s\n{self.logs()}")

    def wait_running(self, job_id: str, timeout: float = 120) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            if self.job(job_id).get("JobState") == "RUNNING":
                return
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} did not start within {timeout} s")

    def logs(self, lines: int = 30) -> str:
        parts = []
        for path in sorted((self.root / "log").glob("*")):
            text = path.read_text(errors="replace").splitlines()[-lines:]
            parts.append(f"==== {path.name}\n" + "\n".join(text))
        return "\n".join(parts)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
