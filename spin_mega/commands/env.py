"""`spin-mega env [CONFIG] [--set k=v]`: what this machine would use for training, and why."""

from __future__ import annotations


def add_parser(sub) -> None:
    from spin_mega.commands import add_config_arguments

    parser = sub.add_parser(
        "env",
        help="print the device, library versions and the implementations a training run would use",
        description=(
            "Print the CUDA devices (or their absence), the versions of torch, Triton, megatron-core, Transformer "
            "Engine, flash-attn, Liger and vLLM, and which precision, attention, norm, log-prob kernel, sequence "
            "parallelism and optimizer sharding `spin-mega train` would pick for CONFIG (default: the built-in "
            "defaults) on this machine, with the reason for each. Run it on a GPU node before the first job."
        ),
    )
    add_config_arguments(parser, config_required=False)
    parser.set_defaults(handler=run)


def run(args) -> int:
    from spin_mega.config import load_config

    cfg = load_config(args.config, list(args.overrides))
    from spin_mega.training.environment import report

    print(report(cfg), end="")
    return 0
