"""The on-disk Megatron model checkpoint shared by the converter, the trainer and the loop.

    DIR/spin_mega_model.json   {"model": ModelConfig fields, "dtype": "float32" | "bfloat16" | "float16",
                                "padded_vocab_size": int, "format": 1}
    DIR/model/                 megatron.core.dist_checkpointing (torch_dist): global tensors, so the same
                               directory loads at any TP x PP
    DIR/tokenizer/             the tokenizer files, carried along for export and generation

Training checkpoints (training/checkpoint.py) hold the same three entries plus optimizer and trainer state.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
import torch
import torch.distributed as dist

from spin_mega.config import ModelConfig
from spin_mega.errors import SpinMegaError, one_line_cause

MODEL_META = "spin_mega_model.json"
# Written by the HF importer (source config and generation config); carried into every checkpoint trained
# from it, so that the final export restores the source's generation settings.
CONVERSION_META = "conversion.json"
MODEL_SUBDIR = "model"
TOKENIZER_SUBDIR = "tokenizer"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class CheckpointUnreadable(SpinMegaError):
    """A checkpoint's files could not be read back (the message names the file or directory and the cause)."""


def checkpoint_errors() -> tuple[type[BaseException], ...]:
    """What megatron-core's dist_checkpointing raises on a checkpoint it cannot read or write: any Exception,
    and torch.distributed.checkpoint's CheckpointException, which derives from BaseException only, so that
    `except Exception` lets it through as a traceback."""
    from torch.distributed.checkpoint.api import CheckpointException

    return (Exception, CheckpointException)


def is_model_checkpoint(path: str | Path) -> bool:
    return (Path(path) / MODEL_META).is_file() and (Path(path) / MODEL_SUBDIR).is_dir()


def write_meta(path: str | Path, model: ModelConfig, dtype: torch.dtype, padded_vocab_size: int) -> None:
    from spin_mega.io import atomic_write_json

    dtype_name = {v: k for k, v in DTYPES.items()}[dtype]
    atomic_write_json(
        Path(path) / MODEL_META,
        {"format": 1, "model": dataclasses.asdict(model), "dtype": dtype_name, "padded_vocab_size": padded_vocab_size},
    )


def read_meta(path: str | Path) -> tuple[ModelConfig, torch.dtype, int]:
    meta_path = Path(path) / MODEL_META
    if not meta_path.is_file():
        raise SpinMegaError(f"{path} is not a spin-mega Megatron checkpoint (no {MODEL_META})")
    meta = json.loads(meta_path.read_text())
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    model = ModelConfig(**{k: v for k, v in meta["model"].items() if k in known})
    return model, DTYPES[meta["dtype"]], int(meta["padded_vocab_size"])


def sharded_state_dict(model) -> dict:
    """The sharded state dict of one model chunk, or of a rank's interleaved chunks nested as megatron's
    own checkpoints nest them (`model0`, `model1`, ...). The tensors' global keys are the same either way."""
    if isinstance(model, (list, tuple)):
        if len(model) == 1:
            return model[0].sharded_state_dict()
        return {f"model{i}": chunk.sharded_state_dict() for i, chunk in enumerate(model)}
    return model.sharded_state_dict()


def _load_state_dict(model, loaded: dict) -> None:
    if isinstance(model, (list, tuple)) and len(model) > 1:
        for i, chunk in enumerate(model):
            chunk.load_state_dict(loaded[f"model{i}"], strict=True)
    else:
        (model[0] if isinstance(model, (list, tuple)) else model).load_state_dict(loaded, strict=True)


def save_model(model, path: str | Path) -> None:
    """Collective: every rank calls it with its model chunk (or list of chunks). `path/model` must not
    exist yet."""
    target = Path(path) / MODEL_SUBDIR
    if dist.get_rank() == 0:
        target.mkdir(parents=True, exist_ok=False)
    dist.barrier()
    from megatron.core import dist_checkpointing  # imported on use: reading the meta file stays cheap

    dist_checkpointing.save(sharded_state_dict(model), str(target))


def load_model(model, path: str | Path) -> None:
    """Collective: loads the global tensors of `path/model` into this rank's shard of `model`."""
    source = Path(path) / MODEL_SUBDIR
    if not source.is_dir():
        raise SpinMegaError(f"{path} holds no Megatron model checkpoint (missing {MODEL_SUBDIR}/)")
    from megatron.core import dist_checkpointing

    try:
        loaded = dist_checkpointing.load(sharded_state_dict(model), str(source))
    except checkpoint_errors() as exc:  # many types, some not Exceptions; the user needs the path and the cause
        raise CheckpointUnreadable(f"cannot load the Megatron checkpoint at {source}: {one_line_cause(exc)}") from None
    _load_state_dict(model, loaded)
