"""Stages as srun steps across a Slurm allocation (`spin-mega run --launcher slurm`, launch/spin_loop.sh on
several nodes), and the one answer to "where do this job's training ranks meet" for the batch scripts:

    python -m spin_mega.loop.slurm rendezvous [--launch K]     prints "MASTER_ADDR MASTER_PORT"

(launch/common.sh exports them before `srun`; the derivation is spin_mega/parallel/rendezvous.py's, which a
rank started without them uses too). Nothing heavy is imported: the batch script runs it at every attempt.
"""

from __future__ import annotations

import argparse
import os
import shlex
import sys
from pathlib import Path
from typing import Optional, Sequence

from spin_mega.config import SpinConfig
from spin_mega.errors import SpinMegaError
from spin_mega.loop.stages import LAUNCH_VARS, StageLauncher, log, spin_mega_cmd, training_env
from spin_mega.parallel.rendezvous import slurm_rendezvous
from spin_mega.rundir import EXIT_BAD_INPUT


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

    def _step_env(self, extra: Optional[dict] = None) -> dict:
        env = {k: None for k in LAUNCH_VARS}
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
        host, port = slurm_rendezvous(self.environ, self._trainings)
        env = self._step_env({"MASTER_ADDR": host, "MASTER_PORT": str(port), **training_env(self.cfg)})
        self._run(self.srun(self.nodes, self.ranks_per_node) + spin_mega_cmd(*args), what, log_path, env=env,
                  signal_to="usr1", preempted=preempted)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m spin_mega.loop.slurm",
                                     description="What the Slurm batch scripts ask the loop's Slurm logic.")
    sub = parser.add_subparsers(dest="query", required=True)
    rendezvous = sub.add_parser("rendezvous", help='print "MASTER_ADDR MASTER_PORT" of this job\'s training')
    rendezvous.add_argument("--launch", type=int, default=0, help="which training of this job attempt (default 0)")
    args = parser.parse_args(argv)
    try:
        host, port = slurm_rendezvous(os.environ, args.launch)
    except SpinMegaError as exc:
        print(f"spin-mega launch: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    print(f"{host} {port}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
