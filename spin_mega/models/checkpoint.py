"""The on-disk Megatron model checkpoint shared by the converter, the trainer and the loop.

    DIR/spin_mega_model.json   {"model": ModelConfig fields, "dtype": "float32" | "bfloat16" | "float16",
                                "padded_vocab_size": int, "format": 1}
    DIR/model/                 megatron.core.dist_checkpointing (torch_dist): global tensors, so the same
                               directory loads at any TP x PP
    DIR/tokenizer/             the tokenizer files, carried along for export and generation

Training checkpoints (training/checkpoint.py) hold the same three entries plus optimizer and trainer state.

Extra state (`*._extra_state`): Transformer Engine's modules (its linears, DotProductAttention, RMSNorm) each
carry one in their sharded state dict, the fp8 scaling metadata (recipe, scales, amax history) or an empty
tensor without fp8; megatron-core's local layers carry None. A checkpoint may lack some: the converter writes
none for TE's attention and final norm, and a checkpoint trained with the local spec (CPU) has none of them.
The load tolerates exactly those, with megatron-core's strict handling (RETURN_UNEXPECTED: the keys the model
asks for and the checkpoint lacks are dropped from the request and returned), and leaves those modules with
the extra state they were built with. That is right for resharding, because megatron-core saves extra state as
one replicated object per layer (its replica id spans TP and DP) whose absence means the same thing at any
TP x PP; and for fp8, because the fp8 state of weights that never ran in fp8 is TE's fresh one (scale 1, an
empty amax history that the first steps fill), which is what the modules hold after construction. Writing
empty entries at conversion would say the same, but would tie the converter to one TE version's module names
(attention, norms, experts). Extra state that is present loads as saved (a TE run's fp8 history resumes), and
any other missing key, a weight, still fails the load.
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


EXTRA_STATE_SUFFIX = "_extra_state"


def _own_extra_state(request: dict, path: tuple = ()) -> list[tuple[tuple, str, object]]:
    """(where in the request, global key, the module's current value) of every extra-state object asked for."""
    from megatron.core.dist_checkpointing import ShardedObject

    found = []
    for name, value in request.items():
        if isinstance(value, dict):
            found += _own_extra_state(value, path + (name,))
        elif isinstance(value, ShardedObject) and value.key.endswith(EXTRA_STATE_SUFFIX):
            found.append((path + (name,), value.key, value.data))
    return found


def load_model(model, path: str | Path) -> None:
    """Collective: loads the global tensors of `path/model` into this rank's shard of `model`. Extra state the
    checkpoint lacks keeps the modules' own (see the module docstring); a missing weight fails."""
    source = Path(path) / MODEL_SUBDIR
    if not source.is_dir():
        raise SpinMegaError(f"{path} holds no Megatron model checkpoint (missing {MODEL_SUBDIR}/)")
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.validation import StrictHandling

    request = sharded_state_dict(model)
    own = _own_extra_state(request)
    try:
        # megatron-core calls the keys a model asks for and a checkpoint lacks "unexpected".
        loaded, _, absent = dist_checkpointing.load(request, str(source), strict=StrictHandling.RETURN_UNEXPECTED)
    except checkpoint_errors() as exc:  # many types, some not Exceptions; the user needs the path and the cause
        raise CheckpointUnreadable(f"cannot load the Megatron checkpoint at {source}: {one_line_cause(exc)}") from None
    missing = sorted(key for key in absent if not key.endswith(EXTRA_STATE_SUFFIX))
    if missing:
        shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
        raise SpinMegaError(f"the Megatron checkpoint at {source} lacks weights this model needs: {shown}")
    for where, key, value in own:
        if key in absent:
            target = loaded
            for name in where[:-1]:
                target = target.setdefault(name, {})
            target[where[-1]] = value
    _load_state_dict(model, loaded)
