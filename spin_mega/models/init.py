"""A randomly initialised Megatron checkpoint of a given shape (benchmarks and tests start from one)."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Optional

import torch

from spin_mega.config import ModelConfig
from spin_mega.io import atomic_directory
from spin_mega.models import checkpoint as model_ckpt
from spin_mega.models.gpt import build_model, padded_vocab_size, transformer_config
from spin_mega.parallel import distributed


def write_random_checkpoint(
    model: ModelConfig, out_dir: str | Path, tokenizer_dir: Optional[str | Path] = None, seed: int = 1234,
    dtype: torch.dtype = torch.float32,
) -> Path:
    """Single-process: initialises torch.distributed itself if needed (call it in a fresh process)."""
    distributed.initialize(1, 1, seed=seed)
    out_dir = Path(out_dir)
    with atomic_directory(out_dir) as tmp:
        gpt = build_model(model, transformer_config(model, dtype=dtype))
        model_ckpt.save_model(gpt, tmp)
        model_ckpt.write_meta(tmp, model, dtype, padded_vocab_size(model.vocab_size, 1))
        if tokenizer_dir is not None:
            shutil.copytree(tokenizer_dir, tmp / model_ckpt.TOKENIZER_SUBDIR)
    return out_dir


def main(argv: list[str] | None = None) -> None:
    """`python -m spin_mega.models.init --model JSON --out DIR [--tokenizer DIR] [--seed N] [--dtype D]`: a
    fresh process, as torch.distributed start-up needs (benchmarks and tests use this)."""
    import argparse
    import json

    parser = argparse.ArgumentParser(description=main.__doc__)
    parser.add_argument("--model", required=True, help="ModelConfig fields as a JSON object")
    parser.add_argument("--out", required=True)
    parser.add_argument("--tokenizer", default=None)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    args = parser.parse_args(argv)
    write_random_checkpoint(
        ModelConfig(**json.loads(args.model)), args.out, args.tokenizer, seed=args.seed, dtype=getattr(torch, args.dtype)
    )


if __name__ == "__main__":
    main()
