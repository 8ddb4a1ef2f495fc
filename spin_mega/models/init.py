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
