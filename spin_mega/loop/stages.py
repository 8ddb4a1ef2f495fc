"""How `spin-mega run` starts its stages: each in processes of its own, never in the loop's process.

A CUDA context or cached blocks left in the long-lived loop would sit on GPU 0 for the whole run, and
vLLM refuses to start when free memory is below its share; so conversion, generation, training and
evaluation each run as child processes that give everything back when they exit.

Two launchers, one interface (`convert`, `generate`, `train`, `evaluate`):

* `LocalStages` runs the stages on this node: one generation engine per GPU slice of
  `generation.tensor_parallel_size` GPUs (or `generation.engines` of them), in parallel, merged into one
  file; training under torchrun with one rank per GPU (`--nproc`).
* `SlurmStages` runs them as srun steps across the Slurm allocation it is inside: generation sharded over
  every engine of every node, training over all ranks of all nodes, conversion and evaluation once.

Preemption: SIGUSR1 or SIGTERM reaching the loop is passed to the running stage as the stage understands
it: SIGUSR1 to the training ranks (directly, or through srun, which relays it to every task; never to the
torchrun agent, which would die of it and orphan its workers: the agent is started with SIGUSR1
ignored), SIGTERM to a local conversion, generation or evaluation, which simply runs again on resume.
A stage that ends after such a signal raises `Preempted`; re-running the loop resumes it.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path
from typing import Optional, Sequence

from spin_mega.config import SpinConfig
from spin_mega.errors import SpinMegaError
from spin_mega.generation.placement import engine_env, granted_gpus
from spin_mega.parallel.distributed import free_port

EXIT_PREEMPTED = 75
# Variables of an enclosing launcher that would make a stage's ranks misread their place.
_LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT")


class StageFailed(SpinMegaError):
    pass


class Preempted(Exception):
    """A stage stopped on a signal (training after saving a checkpoint); re-running the loop resumes it."""


def log(msg: str) -> None:
    print(f"[spin-mega run] {msg}", file=sys.stderr, flush=True)


def spin_mega_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "spin_mega", *args]


def child_pids(pid: int) -> list[int]:
    """Direct children of `pid` (Linux /proc)."""
    children = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue  # exited meanwhile
        if int(fields[1]) == pid:
            children.append(int(stat.parent.name))
    return children


def rendezvous_port(environ, launch: int) -> int:
    """torch.distributed's port for the `launch`-th training stage of this process: derived from the Slurm
    job and its restart (jobs sharing a node differ, a requeued attempt never waits on the previous one's
    socket), below Linux's ephemeral range; a free port outside Slurm. Never torchrun's default 29500."""
    job = environ.get("SLURM_JOB_ID", "")
    if not job.isdigit():
        return free_port()
    restart = int(environ.get("SLURM_RESTART_COUNT", "0") or 0)
    return 15000 + (int(job) % 270) * 64 + (restart * 8 + launch) % 64


def training_env(cfg: SpinConfig) -> dict:
    # Megatron overlaps sequence-parallel communication with compute only if kernels are queued in issue
    # order, which needs one hardware queue; vLLM and everything else keep the default.
    return {"CUDA_DEVICE_MAX_CONNECTIONS": "1"} if cfg.parallel.tensor_parallel > 1 else {}


def _ignore_usr1() -> None:
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


class StageLauncher:
    def __init__(self, cfg: SpinConfig, workdir: Path, ranks_per_node: int = 1):
        self.cfg = cfg
        self.workdir = Path(workdir)
        self.ranks_per_node = max(1, ranks_per_node)
        self.interrupted = False
        self._trainings = 0

    # ---- one stage's processes, with the preemption signals passed on ----------------------------------
    def _wait(self, procs: list[subprocess.Popen], forward, tee: Optional[tuple[subprocess.Popen, object]] = None) -> list[int]:
        def handler(signum, frame):
            self.interrupted = True
            forward(signal.Signals(signum))

        previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGTERM, signal.SIGUSR1)}
        try:
            self.tail: list[str] = []
            if tee is not None:
                proc, handle = tee
                for line in proc.stdout:
                    handle.write(line)
                    # Progress bars and stage messages go to the terminal; library warnings stay in the log.
                    if line.startswith("[spin-mega") or "%|" in line or line.startswith("spin-mega"):
                        sys.stderr.write(line)
                    self.tail = (self.tail + [line.rstrip()])[-20:]
            codes = []
            for p in procs:
                codes.append(p.wait())
                if codes[-1] != 0:
                    # One shard failed: the others stop too (their finished rows are kept for the next try).
                    for other in procs:
                        if other.poll() is None:
                            other.terminate()
            return codes
        finally:
            for sig, h in previous.items():
                signal.signal(sig, h)

    def _check_start(self, what: str) -> None:
        if self.interrupted:
            raise Preempted(f"a preemption signal arrived before {what} started")

    def _outcome(self, codes: Sequence[int], what: str, log_path: Path, preempted: Optional[Path] = None) -> None:
        code = max(codes, key=lambda c: (c != 0, c == EXIT_PREEMPTED))
        if code != 0 and preempted is not None and preempted.is_file():
            code = EXIT_PREEMPTED  # under torchrun the trainer's 75 arrives as 1; its marker file tells
        if code == EXIT_PREEMPTED:
            raise Preempted(f"{what} was preempted; its checkpoint is saved")
        if code != 0 and self.interrupted:
            raise Preempted(f"{what} was stopped by a preemption signal; it runs again on resume")
        if code != 0:
            errors = [t for t in self.tail if "error" in t.lower()]
            detail = (errors or self.tail or ["no output"])[-1]
            raise StageFailed(f"{what} failed (exit {code}): {detail} (full log: {log_path})")

    def _run(self, cmd: list[str], what: str, log_path: Path, env: Optional[dict] = None, *, signal_to: str = "term",
             preempted: Optional[Path] = None, preexec=None) -> None:
        """One process (or srun step) with its output teed to `log_path`. signal_to: "term" (SIGTERM to it),
        "usr1" (SIGUSR1 to it), "children" (SIGUSR1 to its children: the torchrun agent's ranks)."""
        self._check_start(what)
        log_path.parent.mkdir(parents=True, exist_ok=True)
        full_env = {**os.environ, **(env or {})}
        for key in [k for k, v in (env or {}).items() if v is None]:
            full_env.pop(key, None)
        with open(log_path, "a") as handle:
            handle.write(f"\n$ {shlex.join(cmd)}\n")
            handle.flush()
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=full_env,
                                    preexec_fn=preexec)

            def forward(sig):
                targets = child_pids(proc.pid) if signal_to == "children" else [proc.pid]
                sent = signal.SIGTERM if signal_to == "term" else signal.SIGUSR1
                for pid in targets:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, sent)

            codes = self._wait([proc], forward, tee=(proc, handle))
        self._outcome(codes, what, log_path, preempted)

    # ---- the stages ---------------------------------------------------------------------------------
    def convert(self, args: list[str], what: str, log_path: Path) -> None:
        raise NotImplementedError

    def evaluate(self, args: list[str], what: str, log_path: Path) -> None:
        raise NotImplementedError

    def generate(self, args: list[str], out: Path, what: str, log_dir: Path) -> None:
        """`spin-mega generate ARGS --out OUT`, sharded over this launcher's engines and merged into OUT."""
        raise NotImplementedError

    def train(self, args: list[str], what: str, log_path: Path, preempted: Path) -> None:
        raise NotImplementedError

    def engines_per_node(self, gpus_per_node: int) -> tuple[int, int]:
        """(engines per node, GPUs per engine). On GPUs: one engine per generation.tensor_parallel_size GPUs
        (or generation.engines of them); without GPUs: generation.engines CPU engines (default 1)."""
        gen = self.cfg.generation
        size = gen.tensor_parallel_size
        if gen.engines < 0 or size < 1:
            raise SpinMegaError("generation.engines must be 0 or more and generation.tensor_parallel_size at least 1")
        if gpus_per_node == 0:
            return max(1, gen.engines), 0
        if size > gpus_per_node:
            raise SpinMegaError(
                f"generation.tensor_parallel_size {size} exceeds the {gpus_per_node} GPU(s) a node grants this run"
            )
        engines = gen.engines or gpus_per_node // size
        if engines * size > gpus_per_node:
            raise SpinMegaError(
                f"generation.engines {engines} x tensor_parallel_size {size} GPUs do not fit the {gpus_per_node} "
                "GPU(s) a node grants this run"
            )
        return engines, size

    def _merge(self, out: Path, shards: int) -> None:
        from spin_mega.generation.runner import merge_shards, shard_path

        merge_shards(out, shards)
        for i in range(shards):
            shard_path(out, i, shards).unlink(missing_ok=True)


class LocalStages(StageLauncher):
    """Stages as processes on this node; training under torchrun with `ranks_per_node` ranks."""

    def convert(self, args, what, log_path):
        self._run(spin_mega_cmd("convert", *args), what, log_path, env={"CUDA_VISIBLE_DEVICES": ""})

    def evaluate(self, args, what, log_path):
        gpus = granted_gpus(os.environ) if self._cuda() else []
        env = {"CUDA_VISIBLE_DEVICES": gpus[0]} if gpus else None
        self._run([sys.executable, "-m", "spin_mega.evaluation", *args], what, log_path, env=env)

    @staticmethod
    def _cuda() -> bool:
        import torch

        return torch.cuda.is_available()

    def generate(self, args, out, what, log_dir):
        self._check_start(what)
        gpus = granted_gpus(os.environ) if self._cuda() else []
        engines, engine_gpus = self.engines_per_node(len(gpus))
        if engines == 1:
            env = engine_env(0, engine_gpus, os.environ, gpus)
            self._run(spin_mega_cmd("generate", *args, "--out", str(out), "--shard-index", "0", "--num-shards", "1"),
                      what, log_dir / "generate.log", env=env)
            return
        log_dir.mkdir(parents=True, exist_ok=True)
        procs, logs = [], []
        for k in range(engines):
            log_path = log_dir / f"generate-shard-{k}.log"
            logs.append(log_path)
            cmd = spin_mega_cmd("generate", *args, "--out", str(out), "--shard-index", str(k), "--num-shards", str(engines),
                                "--no-progress")
            handle = open(log_path, "a")
            handle.write(f"\n$ {shlex.join(cmd)}\n")
            handle.flush()
            env = {**os.environ, **engine_env(k, engine_gpus, os.environ, gpus)}
            procs.append(subprocess.Popen(cmd, stdout=handle, stderr=subprocess.STDOUT, env=env))
            handle.close()
        log(f"{what}: {engines} engines{f' of {engine_gpus} GPU(s)' if engine_gpus else ''} in parallel (logs: {log_dir})")

        def forward(sig):
            for p in procs:
                with contextlib.suppress(ProcessLookupError):
                    p.terminate()

        codes = self._wait(procs, forward)
        failed = [i for i, c in enumerate(codes) if c != 0]
        self.tail = logs[failed[0]].read_text().splitlines()[-20:] if failed else []
        self._outcome(codes, what, logs[failed[0]] if failed else log_dir)
        self._merge(out, engines)

    def train(self, args, what, log_path, preempted):
        self._trainings += 1
        env = training_env(self.cfg)
        if self.ranks_per_node > 1:
            port = rendezvous_port(os.environ, self._trainings)
            cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={self.ranks_per_node}",
                   "--master-addr=127.0.0.1", f"--master-port={port}", "-m", "spin_mega", *args]
            # torchrun's agent dies on SIGUSR1 and orphans its ranks: it ignores it (the ranks install their
            # own handler), and the loop signals the ranks, its children, directly.
            env.update({k: None for k in _LAUNCH_VARS})
            self._run(cmd, what, log_path, env=env, signal_to="children", preempted=preempted, preexec=_ignore_usr1)
        else:
            # A single local rank, stated explicitly: inside a Slurm allocation the trainer would otherwise take
            # SLURM_NTASKS ranks from the environment and wait for peers that were never started.
            env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
            self._run(spin_mega_cmd(*args), what, log_path, env=env, signal_to="usr1", preempted=preempted)


class SlurmStages(StageLauncher):
    """Stages as srun steps across the allocation this process runs in (SLURM_JOB_ID, SLURM_JOB_NODELIST)."""

    def __init__(self, cfg: SpinConfig, workdir: Path, ranks_per_node: int = 1, environ=None):
        super().__init__(cfg, workdir, ranks_per_node)
        env = os.environ if environ is None else environ
        if not env.get("SLURM_JOB_ID"):
            raise SpinMegaError("--launcher slurm runs the stages as srun steps inside a Slurm allocation (sbatch, salloc), "
                                "but SLURM_JOB_ID is not set")
        self.environ = env
        self.nodes = int(env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES") or 1)
        # What the allocation granted, not what was asked for.
        gpus = env.get("SLURM_GPUS_ON_NODE", "")
        self.gpus_per_node = int(gpus) if gpus.isdigit() else 0
        cpus = env.get("SLURM_CPUS_ON_NODE", "")
        self.cpus_per_node = int(cpus) if cpus.isdigit() else 0
        # Options every step carries (containers: set by launch/spin_loop.sh).
        self.extra = shlex.split(env.get("SPIN_SRUN_ARGS", ""))

    def srun(self, nodes: int, tasks_per_node: int) -> list[str]:
        cmd = ["srun", f"--nodes={nodes}", f"--ntasks={nodes * tasks_per_node}", f"--ntasks-per-node={tasks_per_node}",
               "--kill-on-bad-exit=0"]
        if self.cpus_per_node:
            cmd.append(f"--cpus-per-task={max(1, self.cpus_per_node // tasks_per_node)}")
        return cmd + self.extra

    def first_host(self) -> str:
        from spin_mega.parallel.distributed import first_slurm_host

        return first_slurm_host(self.environ.get("SLURM_JOB_NODELIST") or self.environ.get("SLURM_NODELIST", ""))

    def _step_env(self, extra: Optional[dict] = None) -> dict:
        env = {k: None for k in _LAUNCH_VARS}
        env.update(extra or {})
        return env

    def convert(self, args, what, log_path):
        self._run(self.srun(1, 1) + spin_mega_cmd("convert", *args), what, log_path, env=self._step_env(), signal_to="usr1")

    def evaluate(self, args, what, log_path):
        self._run(self.srun(1, 1) + [sys.executable, "-m", "spin_mega.evaluation", *args], what, log_path,
                  env=self._step_env(), signal_to="usr1")

    def generate(self, args, out, what, log_dir):
        engines, engine_gpus = self.engines_per_node(self.gpus_per_node)
        shards = self.nodes * engines
        cmd = self.srun(self.nodes, engines) + [sys.executable, "-m", "spin_mega.generation.placement",
                                                *spin_mega_cmd("generate", *args, "--out", str(out), "--no-progress")]
        log(f"{what}: {shards} engines ({self.nodes} nodes x {engines}"
            f"{f', {engine_gpus} GPU(s) each' if engine_gpus else ''})")
        self._run(cmd, what, log_dir / "generate.log", env=self._step_env({"SPIN_ENGINE_GPUS": str(engine_gpus)}),
                  signal_to="usr1")
        if shards > 1:
            self._merge(out, shards)

    def train(self, args, what, log_path, preempted):
        self._trainings += 1
        env = self._step_env({"MASTER_ADDR": self.first_host(),
                              "MASTER_PORT": str(rendezvous_port(self.environ, self._trainings)), **training_env(self.cfg)})
        self._run(self.srun(self.nodes, self.ranks_per_node) + spin_mega_cmd(*args), what, log_path, env=env,
                  signal_to="usr1", preempted=preempted)


def make_launcher(kind: str, cfg: SpinConfig, workdir: Path, ranks_per_node: int) -> StageLauncher:
    if kind == "local":
        return LocalStages(cfg, workdir, ranks_per_node)
    if kind == "slurm":
        return SlurmStages(cfg, workdir, ranks_per_node)
    raise SpinMegaError(f"--launcher is local or slurm, not {kind!r}")
