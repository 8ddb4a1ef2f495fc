"""`spin-mega train CONFIG --workdir DIR [--tp N] [--pp N] [--ep N] [--max-steps N]`: one SPIN iteration's training."""

from __future__ import annotations

import argparse


def add_parser(sub) -> None:
    from spin_mega.commands import add_config_arguments

    parser = sub.add_parser(
        "train",
        help="train one SPIN iteration on Megatron-core (under torchrun or srun for several ranks)",
        description=(
            "Train theta_(t+1) on SPIN pairs (prompt, chosen=human, rejected=generated) against the frozen "
            "opponent theta_t. Resumes from the newest checkpoint in --workdir, with the config recorded there "
            "(WORKDIR/config.yaml; docs/run-directory.md lists the keys a resume may change). Exits 2 on a refused "
            "config, input or work directory (one already in use is refused, naming its holder), 75 after a "
            "SIGUSR1/SIGTERM checkpoint (re-run the same command to resume), and 3 when a NaN/inf loss or gradient norm "
            "(or a collapse with train.on_collapse=stop) stopped training before the update, keeping the last good "
            "checkpoint."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    add_config_arguments(parser)
    parser.add_argument("--workdir", required=True, help="directory for checkpoints and metrics.jsonl")
    parser.add_argument("--tp", type=int, default=None, help="tensor-parallel size (overrides parallel.tensor_parallel)")
    parser.add_argument("--pp", type=int, default=None, help="pipeline-parallel size (overrides parallel.pipeline_parallel)")
    parser.add_argument(
        "--ep", type=int, default=None, help="expert-parallel size of an MoE model (overrides parallel.expert_parallel)"
    )
    parser.add_argument("--max-steps", type=int, default=None, help="stop after this many optimizer steps (overrides train.max_steps)")
    parser.set_defaults(handler=run)


def run(args) -> int:
    from spin_mega.config import load_config
    from spin_mega.training.inputs import check_inputs

    overrides = list(args.overrides)
    if args.tp is not None:
        overrides.append(f"parallel.tensor_parallel={args.tp}")
    if args.pp is not None:
        overrides.append(f"parallel.pipeline_parallel={args.pp}")
    if args.ep is not None:
        overrides.append(f"parallel.expert_parallel={args.ep}")
    if args.max_steps is not None:
        overrides.append(f"train.max_steps={args.max_steps}")
    cfg = load_config(args.config, overrides)  # before importing megatron: a config error costs no start-up
    check_inputs(cfg, loop=False)
    from spin_mega.training.trainer import train

    return train(cfg, args.workdir)
