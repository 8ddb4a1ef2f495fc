"""Training checkpoints: model, optimizer, scheduler, data position and RNG. The model reshards across TP/PP;
the distributed optimizer's state across DP only (see OPTIMIZER_METADATA), the plain optimizer's across all.

    WORKDIR/checkpoints/step_000040/      one complete checkpoint
        spin_mega_model.json, model/, tokenizer/    as in models/checkpoint.py (so it exports to HF as is)
        optimizer/                                  dist_checkpointing of the optimizer state
        trainer_state.json                          step, scheduler state, run fingerprint
        rng/rank_00003.pt                           per-rank RNG states
    WORKDIR/checkpoints/latest                      name of the newest complete checkpoint

A checkpoint is written into `.step_000040.tmp/` and renamed when every rank has finished, then `latest` is
replaced atomically: a crash mid-save leaves the previous checkpoint as the one resumed from.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing

from spin_mega.errors import SpinMegaError
from spin_mega.io import atomic_write_json, atomic_write_text
from spin_mega.models import checkpoint as model_ckpt
from spin_mega.rundir import CHECKPOINTS_DIR, LATEST_POINTER

KEEP_LAST = 2
# The distributed optimizer's one format that keeps the inner optimizer's own state names (RMSProp's
# square_avg; megatron-core's other formats spell out Adam's exp_avg / exp_avg_sq) and writes each rank's
# shard without gathering. It reloads at another data-parallel size, not at another TP/PP layout.
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "dp_reshardable"}


def checkpoint_root(workdir: str | Path) -> Path:
    return Path(workdir) / CHECKPOINTS_DIR


def latest_checkpoint(workdir: str | Path) -> Optional[Path]:
    root = checkpoint_root(workdir)
    pointer = root / LATEST_POINTER
    if not pointer.is_file():
        return None
    path = root / pointer.read_text().strip()
    if not (path / "trainer_state.json").is_file():
        raise SpinMegaError(f"{pointer} names {path.name}, which is not a complete checkpoint")
    return path


def _rng_state() -> dict:
    from megatron.core import tensor_parallel

    state = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "tracker": tensor_parallel.get_cuda_rng_tracker().get_states(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    from megatron.core import tensor_parallel

    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["tracker"])
    if torch.cuda.is_available() and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"])


def save(
    workdir: str | Path,
    step: int,
    policy,
    optimizer,
    scheduler,
    trainer_state: dict,
    write_meta,
    tokenizer_dir: Optional[Path],
    start_dir: Optional[Path] = None,
) -> Path:
    """Collective over all ranks. `policy`: this rank's model chunk or list of interleaved chunks.
    `write_meta(path)` writes spin_mega_model.json (rank 0 only)."""
    root = checkpoint_root(workdir)
    name = f"step_{step:06d}"
    final = root / name
    tmp = root / f".{name}.tmp"
    rank = dist.get_rank()
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "rng").mkdir(parents=True)
        (tmp / "optimizer").mkdir()
    dist.barrier()
    model_sharded = model_ckpt.sharded_state_dict(policy)
    model_ckpt.save_model(policy, tmp)
    dist_checkpointing.save(optimizer.sharded_state_dict(model_sharded, metadata=OPTIMIZER_METADATA), str(tmp / "optimizer"))
    torch.save(_rng_state(), tmp / "rng" / f"rank_{rank:05d}.pt")
    if rank == 0:
        write_meta(tmp)
        state = dict(trainer_state, step=step, scheduler=scheduler.state_dict())
        atomic_write_json(tmp / "trainer_state.json", state)
        if tokenizer_dir is not None:
            shutil.copytree(tokenizer_dir, tmp / model_ckpt.TOKENIZER_SUBDIR)
        if start_dir is not None and (start_dir / model_ckpt.CONVERSION_META).is_file():
            shutil.copy2(start_dir / model_ckpt.CONVERSION_META, tmp / model_ckpt.CONVERSION_META)
    dist.barrier()
    if rank == 0:
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        atomic_write_text(root / LATEST_POINTER, name + "\n")
        _prune(root, keep=name)
    dist.barrier()
    return final


def _prune(root: Path, keep: str) -> None:
    steps = sorted(p for p in root.glob("step_*") if p.is_dir())
    for old in steps[:-KEEP_LAST]:
        if old.name != keep:
            shutil.rmtree(old, ignore_errors=True)


LAYOUT_KEYS = ("tensor_parallel", "pipeline_parallel", "virtual_pipeline_parallel", "first_stage_layers", "last_stage_layers")
LAYOUT_DEFAULTS = (1, 1, 1, None, None)


def _layout(parallel: dict) -> tuple:
    return tuple(parallel.get(key, default) for key, default in zip(LAYOUT_KEYS, LAYOUT_DEFAULTS))


def _describe(layout: tuple) -> str:
    tp, pp, vpp, first, last = layout
    text = f"tensor parallel {tp} x pipeline parallel {pp}"
    if vpp != 1:
        text += f" x virtual pipeline {vpp}"
    if first is not None or last is not None:
        text += f" (first/last stage layers {first}/{last})"
    return text


def check_resume_layout(saved_parallel: dict, parallel: dict) -> None:
    """Refuses, before loading anything, a resume whose optimizer state cannot be read back: the distributed
    optimizer's flat per-rank buffers only at the model-parallel layout (TP, PP, virtual stages, layer split)
    they were written at, and never across the two optimizer formats. `parallel`: this run's ParallelConfig
    as a dict."""
    was_distributed = bool(saved_parallel.get("distributed_optimizer", False))
    if was_distributed != bool(parallel.get("distributed_optimizer", False)):
        raise SpinMegaError(
            f"the checkpoint was written with parallel.distributed_optimizer={str(was_distributed).lower()}; "
            "resume with the same setting"
        )
    saved_layout, layout = _layout(saved_parallel), _layout(parallel)
    if was_distributed and saved_layout != layout:
        raise SpinMegaError(
            f"the checkpoint's distributed-optimizer state was written at {_describe(saved_layout)} and reloads "
            f"only there (at any data-parallel size), not at {_describe(layout)}; resume at that layout, or export "
            "the model and start a new run"
        )


def load(path: Path, policy, optimizer, scheduler, parallel: dict) -> dict:
    """Collective. Restores model, optimizer, scheduler and this rank's RNG; returns trainer_state.
    `policy`: this rank's model chunk or list of interleaved chunks; `parallel`: this run's ParallelConfig."""
    trainer_state = json.loads((path / "trainer_state.json").read_text())
    check_resume_layout(trainer_state.get("config", {}).get("parallel", {}), parallel)
    model_ckpt.load_model(policy, path)
    model_sharded = model_ckpt.sharded_state_dict(policy)
    optim_sharded = optimizer.sharded_state_dict(model_sharded, is_loading=True, metadata=OPTIMIZER_METADATA)
    try:
        state_dict = dist_checkpointing.load(optim_sharded, str(path / "optimizer"))
    except Exception as exc:
        raise SpinMegaError(f"cannot load the optimizer state at {path / 'optimizer'}: {exc}") from exc
    # megatron-core's dp_reshardable load copies into the distributed optimizer's fp32 shards without
    # no_grad; in fp32 runs those shards are views of the model's parameters, which autograd refuses.
    with torch.no_grad():
        optimizer.load_state_dict(state_dict)
    scheduler.load_state_dict(trainer_state["scheduler"])
    rng_file = path / "rng" / f"rank_{dist.get_rank():05d}.pt"
    # A resume at another world size has no RNG file per rank; dropout-free SPIN does not depend on it.
    if rng_file.is_file():
        _set_rng_state(torch.load(rng_file, weights_only=False))
    return trainer_state
