"""How `spin-mega run` starts its stages: each in processes of its own, never in the loop's process.

A CUDA context or cached blocks left in the long-lived loop would sit on GPU 0 for the whole run, and
vLLM refuses to start when free memory is below its share; so conversion, generation, training and
evaluation each run as child processes that give everything back when they exit.

Two launchers, one interface (`convert`, `generate`, `train`, `evaluate`; `StageLauncher` here):

* `LocalStages` (local.py) runs the stages on this node: one generation engine per GPU slice of
  `generation.tensor_parallel_size` GPUs (or `generation.engines` of them), in parallel, merged into one
  file; training under torchrun with one rank per GPU (`--nproc`).
* `SlurmStages` (slurm.py) runs them as srun steps across the Slurm allocation it is inside: generation sharded over
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
from spin_mega.rundir import EXIT_PREEMPTED

# Variables of an enclosing launcher that would make a stage's ranks misread their place.
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR", "MASTER_PORT")


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


def training_env(cfg: SpinConfig) -> dict:
    # Megatron overlaps sequence-parallel communication with compute only if kernels are queued in issue
    # order, which needs one hardware queue; vLLM and everything else keep the default.
    return {"CUDA_DEVICE_MAX_CONNECTIONS": "1"} if cfg.parallel.tensor_parallel > 1 else {}


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
