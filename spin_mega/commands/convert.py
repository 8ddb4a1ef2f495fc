"""`spin-mega convert hf-to-mcore | mcore-to-hf`: checkpoint conversion between Hugging Face and Megatron-core."""

from __future__ import annotations

import argparse
import time


def add_parser(subparsers) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "convert",
        help="convert checkpoints between Hugging Face and Megatron-core",
        description="Convert model checkpoints between Hugging Face safetensors and spin-mega's Megatron-core "
        "format, streaming one tensor at a time.",
    )
    directions = parser.add_subparsers(dest="direction", metavar="DIRECTION")
    directions.required = True

    to_mcore = directions.add_parser(
        "hf-to-mcore",
        help="HF model directory -> Megatron checkpoint",
        description="Convert an HF model directory (config.json + safetensors, Llama / Mistral / Qwen2 / Qwen3 / "
        "Qwen3-MoE / Mixtral) into a spin-mega Megatron checkpoint that loads at any TP x PP (x EP) the model can be "
        "split into; experts are written one at a time.",
    )
    to_mcore.add_argument("--hf", required=True, metavar="DIR", help="HF model directory")
    to_mcore.add_argument("--out", required=True, metavar="DIR", help="Megatron checkpoint directory to write")
    to_mcore.add_argument(
        "--tp",
        type=int,
        default=1,
        metavar="N",
        help="suggested tensor parallel size: checked against the model; sets the vocabulary padding (default 1)",
    )
    to_mcore.add_argument(
        "--pp",
        type=int,
        default=1,
        metavar="N",
        help="suggested pipeline parallel size, checked against the model (default 1)",
    )
    to_mcore.add_argument(
        "--ep",
        type=int,
        default=1,
        metavar="N",
        help="suggested expert parallel size of an MoE model, checked against its experts (default 1)",
    )
    to_mcore.add_argument(
        "--dtype",
        choices=["float32", "bfloat16", "float16"],
        default=None,
        help="dtype of the Megatron weights (default: the HF checkpoint's)",
    )

    to_hf = directions.add_parser(
        "mcore-to-hf",
        help="Megatron checkpoint -> HF model directory",
        description="Export a spin-mega Megatron checkpoint (converted or trained, saved at any TP x PP x EP) as an HF "
        "model directory that transformers and vLLM load.",
    )
    to_hf.add_argument("--mcore", required=True, metavar="DIR", help="Megatron checkpoint directory")
    to_hf.add_argument("--out", required=True, metavar="DIR", help="HF model directory to write")
    to_hf.add_argument(
        "--max-shard-size", type=float, default=5.0, metavar="GB", help="largest safetensors shard, in GB (default 5)"
    )
    parser.set_defaults(handler=run)
    return parser


def run(args) -> int:
    from spin_mega.conversion import hf_to_mcore, mcore_to_hf
    from spin_mega.errors import ConfigError

    start = time.perf_counter()
    if args.direction == "hf-to-mcore":
        out = hf_to_mcore(args.hf, args.out, tp=args.tp, pp=args.pp, dtype=args.dtype, ep=args.ep)
    else:
        if args.max_shard_size <= 0:
            raise ConfigError("--max-shard-size must be positive")
        out = mcore_to_hf(args.mcore, args.out, max_shard_bytes=int(args.max_shard_size * 1024**3))
    print(f"spin-mega convert {args.direction}: wrote {out} in {time.perf_counter() - start:.1f} s")
    return 0
