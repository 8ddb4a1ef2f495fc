"""`spin-mega run CONFIG --workdir DIR`: the whole SPIN loop, resumable."""

from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    from spin_mega.commands import add_config_arguments

    parser = sub.add_parser(
        "run",
        help="run the SPIN loop: generate, train, export, evaluate for each iteration (resumable)",
        description=(
            "For t = 0..T-1: theta_t generates responses to the SFT prompts, theta_(t+1) is trained to prefer the "
            "human responses, exported to HF and evaluated. Re-running the same command resumes at the first "
            "unfinished stage; without CONFIG the work directory's saved config.yaml is used."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_config_arguments(parser, config_required=False)
    parser.add_argument("--workdir", required=True, help="directory holding every output of the run")
    parser.add_argument("--nproc", type=int, default=None,
                        help="training ranks per node (default: the GPUs granted to this node, or 1)")
    parser.add_argument("--launcher", choices=["local", "slurm"], default="local",
                        help="local: every stage on this node (training under torchrun); slurm: every stage as an srun "
                             "step across the Slurm allocation this command runs in (generation sharded over the engines "
                             "of all nodes, training over all ranks, conversion and evaluation once)")
    parser.set_defaults(handler=run)


def run(args) -> int:
    from pathlib import Path

    import os

    import torch

    from spin_mega.errors import SpinMegaError
    from spin_mega.loop.driver import SpinLoop, load_run_config

    workdir = Path(args.workdir)
    cfg = load_run_config(args.config, args.overrides, workdir)
    from spin_mega.training.trackers import check as check_trackers

    check_trackers(cfg.logging)  # now, not after the first generation stage
    if args.nproc is not None and args.nproc < 1:
        raise SpinMegaError(f"--nproc must be at least 1, got {args.nproc}")
    granted = os.environ.get("SLURM_GPUS_ON_NODE", "")
    nproc = args.nproc or (int(granted) if granted.isdigit() and int(granted) > 0 else max(torch.cuda.device_count(), 1))
    return SpinLoop(cfg, workdir, nproc=nproc, launcher=args.launcher).run()
