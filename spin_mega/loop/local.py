"""Stages as processes on this node (`spin-mega run --launcher local`, the default)."""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import sys

from spin_mega.generation.placement import engine_env, granted_gpus
from spin_mega.loop.stages import LAUNCH_VARS, StageLauncher, log, spin_mega_cmd, training_env
from spin_mega.parallel.rendezvous import free_port, rendezvous_port


def _ignore_usr1() -> None:
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)


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
            env.update({k: None for k in LAUNCH_VARS})
            self._run(cmd, what, log_path, env=env, signal_to="children", preempted=preempted, preexec=_ignore_usr1)
        else:
            # A single local rank, stated explicitly: inside a Slurm allocation the trainer would otherwise take
            # SLURM_NTASKS ranks from the environment and wait for peers that were never started.
            env.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
            self._run(spin_mega_cmd(*args), what, log_path, env=env, signal_to="usr1", preempted=preempted)
