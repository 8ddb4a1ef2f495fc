"""Training checkpoints: model, optimizer, scheduler, data position and RNG. The model reshards across TP/PP;
the distributed optimizer's state across DP only (see OPTIMIZER_METADATA), the plain optimizer's across all.

    WORKDIR/checkpoints/step_000040/      one complete checkpoint
        spin_mega_model.json, model/, tokenizer/    as in models/checkpoint.py (so it exports to HF as is)
        optimizer/                                  dist_checkpointing of the optimizer state
        trainer_state.json                          step, scheduler state, run fingerprint
        rng/rank_00003.pt                           per-rank RNG states
        manifest.json                               size (and SHA-256 up to HASHED_UP_TO) of every file above
    WORKDIR/checkpoints/latest                      name of the newest complete checkpoint
    WORKDIR/checkpoints/step_000040.corrupt-<time>  a checkpoint found damaged on resume, kept aside

A checkpoint is written into `.step_000040.tmp/` and renamed when every rank has finished, then `latest` is
replaced atomically: a crash mid-save leaves the previous checkpoint as the one resumed from. A save that
fails (a full disk, most often) removes its partial directory and leaves `latest` and the kept checkpoints as
they were. On resume, a checkpoint whose files no longer match its manifest is renamed aside, never deleted,
and the next older one is used.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import re
import shutil
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
import torch.distributed as dist
from megatron.core import dist_checkpointing

from spin_mega.errors import SpinMegaError, error_numbers, one_line_cause
from spin_mega.io import atomic_write_json, atomic_write_text
from spin_mega.models import checkpoint as model_ckpt
from spin_mega.rundir import CHECKPOINTS_DIR, LATEST_POINTER

KEEP_LAST = 2
# The distributed optimizer's one format that keeps the inner optimizer's own state names (RMSProp's
# square_avg; megatron-core's other formats spell out Adam's exp_avg / exp_avg_sq) and writes each rank's
# shard without gathering. It reloads at another data-parallel size, not at another TP/PP layout.
OPTIMIZER_METADATA = {"distrib_optim_sharding_type": "dp_reshardable"}
CHECKPOINT_NAME = re.compile(r"step_(\d{6,})")
MANIFEST = "manifest.json"
# Files up to this size are hashed as well as sized: every metadata, state and RNG file. Larger ones (the
# tensor shards of a real model: GBs per rank) are checked by size, which catches truncation, the damage a
# crash or a full disk leaves; hashing them would read the whole checkpoint back at every save and resume.
HASHED_UP_TO = 16 << 20
# Free space below this after a failed write means the disk filled up (whatever error the writer reported:
# torch's file writer turns ENOSPC into "unexpected pos").
FULL_DISK_SLACK = 16 << 20


def checkpoint_root(workdir: str | Path) -> Path:
    return Path(workdir) / CHECKPOINTS_DIR


def _step_of(path: Path) -> Optional[int]:
    match = CHECKPOINT_NAME.fullmatch(path.name)
    return int(match[1]) if match else None


def complete_checkpoints(workdir: str | Path) -> list[Path]:
    """Finished checkpoints (renamed into place, so complete when written), oldest first; directories set
    aside as corrupt are not among them."""
    root = checkpoint_root(workdir)
    found = [p for p in root.glob("step_*") if _step_of(p) is not None and (p / "trainer_state.json").is_file()]
    return sorted(found, key=_step_of)


def latest_checkpoint(workdir: str | Path) -> Optional[Path]:
    root = checkpoint_root(workdir)
    pointer = root / LATEST_POINTER
    if not pointer.is_file():
        return None
    path = root / pointer.read_text().strip()
    if not (path / "trainer_state.json").is_file():
        raise SpinMegaError(f"{pointer} names {path.name}, which is not a complete checkpoint")
    return path


def saved_config(workdir: str | Path) -> Optional[dict]:
    """The config the newest complete checkpoint was trained with (its trainer_state.json), or None: what a
    work directory from before WORKDIR/config.yaml was recorded resumes against."""
    complete = complete_checkpoints(workdir)
    if not complete:
        return None
    try:
        config = json.loads((complete[-1] / "trainer_state.json").read_text()).get("config")
    except (OSError, ValueError, AttributeError):
        return None
    return config if isinstance(config, dict) else None


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
    `write_meta(path)` writes spin_mega_model.json (rank 0 only). A failed save (every rank raises the same
    SpinMegaError) leaves no partial directory, and `latest` and the kept checkpoints as they were."""
    root = checkpoint_root(workdir)
    name = f"step_{step:06d}"
    final = root / name
    tmp = root / f".{name}.tmp"
    rank = dist.get_rank()
    free_before = 0
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "rng").mkdir(parents=True)
        (tmp / "optimizer").mkdir()
        free_before = shutil.disk_usage(root).free
    dist.barrier()
    model_sharded = model_ckpt.sharded_state_dict(policy)
    optimizer_sharded = optimizer.sharded_state_dict(model_sharded, metadata=OPTIMIZER_METADATA)
    tensor_bytes = _tensor_bytes(model_sharded) + _tensor_bytes(optimizer_sharded)
    failure: Optional[BaseException] = None
    try:
        # Collective: a rank's write error reaches every rank, so all of them leave together.
        model_ckpt.save_model(policy, tmp)
        dist_checkpointing.save(optimizer_sharded, str(tmp / "optimizer"))
    except model_ckpt.checkpoint_errors() as exc:
        failure = exc
    if failure is None:
        try:
            torch.save(_rng_state(), tmp / "rng" / f"rank_{rank:05d}.pt")
            if rank == 0:
                write_meta(tmp)
                state = dict(trainer_state, step=step, scheduler=scheduler.state_dict())
                atomic_write_json(tmp / "trainer_state.json", state)
                if tokenizer_dir is not None:
                    shutil.copytree(tokenizer_dir, tmp / model_ckpt.TOKENIZER_SUBDIR)
                if start_dir is not None and (start_dir / model_ckpt.CONVERSION_META).is_file():
                    shutil.copy2(start_dir / model_ckpt.CONVERSION_META, tmp / model_ckpt.CONVERSION_META)
        except Exception as exc:
            failure = exc
    if _any_rank(failure is not None):
        raise _save_failed(root, name, tmp, failure, tensor_bytes, free_before)
    if rank == 0:
        renamed = False
        try:
            _write_manifest(tmp)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
            renamed = True
            atomic_write_text(root / LATEST_POINTER, name + "\n")
        except OSError as exc:
            failure = exc
            if renamed:  # `latest` still names the previous checkpoint: take back the new one
                os.replace(final, tmp)
    if _any_rank(failure is not None):
        raise _save_failed(root, name, tmp, failure, tensor_bytes, free_before)
    if rank == 0:
        _prune(root, keep=name)
    dist.barrier()
    return final


def _any_rank(flag: bool) -> bool:
    """Whether `flag` holds on any rank (collective)."""
    tensor = torch.tensor([1.0 if flag else 0.0], device="cuda" if torch.cuda.is_available() else "cpu")
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item())


def _tensor_bytes(sharded: dict) -> int:
    """Bytes of the tensors this rank writes from a sharded state dict (replicas are written once)."""
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory, is_main_replica

    total = 0
    for value in nested_values(sharded):
        if isinstance(value, ShardedTensorFactory):
            total += _tensor_bytes({"built": value.build()})
        elif isinstance(value, ShardedTensor) and is_main_replica(value.replica_id) and value.data is not None:
            total += value.data.numel() * value.data.element_size()
    return total


def _size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else 0


def _human(n: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def _save_failed(root: Path, name: str, tmp: Path, failure: Optional[BaseException], tensor_bytes: int,
                 free_before: int) -> SpinMegaError:
    """Collective: removes the partial save and returns the sentence for it. The disk counts as full when
    any rank saw ENOSPC / EDQUOT, or when next to nothing is left free on it now."""
    numbers = error_numbers(failure) if failure is not None else set()
    totals = torch.tensor([float(tensor_bytes), 1.0 if numbers & {errno.ENOSPC, errno.EDQUOT} else 0.0],
                          dtype=torch.float64, device="cuda" if torch.cuda.is_available() else "cpu")
    dist.all_reduce(totals[:1])
    dist.all_reduce(totals[1:], op=dist.ReduceOp.MAX)
    needed, errno_full = totals[0].item(), totals[1].item() > 0
    message = ""
    if dist.get_rank() == 0:
        full = errno_full or shutil.disk_usage(root).free < FULL_DISK_SLACK
        shutil.rmtree(tmp, ignore_errors=True)
        pointer = root / LATEST_POINTER
        kept = f"{pointer.read_text().strip()} is kept" if pointer.is_file() else "no earlier checkpoint exists"
        if full:
            message = (
                f"no space left on the device of {root} for checkpoint {name}: it needs about {_human(needed)} and "
                f"{_human(free_before)} was free when the save began; the partial save was removed and {kept}, so free "
                f"space (the directory keeps the last {KEEP_LAST} checkpoints plus the one being written) or point "
                "--workdir at a larger disk, then re-run the same command to resume"
            )
        else:
            cause = one_line_cause(failure) if failure is not None else "another rank failed"
            message = (
                f"saving checkpoint {name} under {root} failed ({cause}); the partial save was removed and {kept}: "
                "fix the cause, then re-run the same command to resume"
            )
    dist.barrier()
    return SpinMegaError(message or "saving a checkpoint failed on another rank; rank 0 names the cause")


def _write_manifest(directory: Path) -> None:
    files = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        entry = {"size": path.stat().st_size}
        if entry["size"] <= HASHED_UP_TO:
            entry["sha256"] = _sha256(path)
        files[str(path.relative_to(directory))] = entry
    atomic_write_json(directory / MANIFEST, {"files": files})


def _sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def damage(path: Path) -> Optional[str]:
    """What is wrong with the files of checkpoint `path` against its manifest, or None if they are as saved
    (or it predates manifests). Rank 0 only: the directory is on a file system every rank shares."""
    if not path.is_dir():
        return "the directory is missing"
    if not (path / "trainer_state.json").is_file():
        return "trainer_state.json is missing"
    manifest = path / MANIFEST
    if not manifest.is_file():
        return None
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError, TypeError):
        return f"{MANIFEST} is unreadable"
    for relative, entry in files.items():
        file = path / relative
        if not file.is_file():
            return f"{relative} is missing"
        size = file.stat().st_size
        if size != entry["size"]:
            return f"{relative} is {size} bytes, {entry['size']} when saved"
        if "sha256" in entry and _sha256(file) != entry["sha256"]:
            return f"{relative} differs from what was saved (SHA-256)"
    return None


def _prune(root: Path, keep: str) -> None:
    steps = sorted((p for p in root.glob("step_*") if p.is_dir() and _step_of(p) is not None), key=_step_of)
    for old in steps[:-KEEP_LAST]:
        if old.name != keep:
            shutil.rmtree(old, ignore_errors=True)


LAYOUT_KEYS = (
    "tensor_parallel", "pipeline_parallel", "virtual_pipeline_parallel", "first_stage_layers", "last_stage_layers",
    "expert_parallel", "expert_tensor_parallel",
)
LAYOUT_DEFAULTS = (1, 1, 1, None, None, 1, 1)


def _layout(parallel: dict) -> tuple:
    return tuple(parallel.get(key, default) for key, default in zip(LAYOUT_KEYS, LAYOUT_DEFAULTS))


def _describe(layout: tuple) -> str:
    tp, pp, vpp, first, last, ep, etp = layout
    text = f"tensor parallel {tp} x pipeline parallel {pp}"
    if vpp != 1:
        text += f" x virtual pipeline {vpp}"
    if ep != 1 or etp != 1:
        text += f" x expert parallel {ep} (expert tensor parallel {etp})"
    if first is not None or last is not None:
        text += f" (first/last stage layers {first}/{last})"
    return text


def check_resume_layout(saved_parallel: dict, parallel: dict) -> None:
    """Refuses, before loading anything, a resume whose optimizer state cannot be read back: the distributed
    optimizer's flat per-rank buffers only at the model-parallel layout (TP, PP, virtual stages, layer split,
    EP and expert TP) they were written at, and never across the two optimizer formats. `parallel`: this run's
    ParallelConfig as a dict."""
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
    try:
        trainer_state = json.loads((path / "trainer_state.json").read_text())
    except (OSError, ValueError) as exc:
        raise model_ckpt.CheckpointUnreadable(f"cannot read {path / 'trainer_state.json'}: {one_line_cause(exc)}") from None
    check_resume_layout(trainer_state.get("config", {}).get("parallel", {}), parallel)
    model_ckpt.load_model(policy, path)
    model_sharded = model_ckpt.sharded_state_dict(policy)
    optim_sharded = optimizer.sharded_state_dict(model_sharded, is_loading=True, metadata=OPTIMIZER_METADATA)
    try:
        state_dict = dist_checkpointing.load(optim_sharded, str(path / "optimizer"))
    except model_ckpt.checkpoint_errors() as exc:
        raise model_ckpt.CheckpointUnreadable(
            f"cannot load the optimizer state at {path / 'optimizer'}: {one_line_cause(exc)}"
        ) from None
    # megatron-core's dp_reshardable load copies into the distributed optimizer's fp32 shards without
    # no_grad; in fp32 runs those shards are views of the model's parameters, which autograd refuses.
    with torch.no_grad():
        optimizer.load_state_dict(state_dict)
    scheduler.load_state_dict(trainer_state["scheduler"])
    rng_file = path / "rng" / f"rank_{dist.get_rank():05d}.pt"
    # A resume at another world size has no RNG file per rank; dropout-free SPIN does not depend on it.
    if rng_file.is_file():
        try:
            rng = torch.load(rng_file, weights_only=False)
        except Exception as exc:
            raise model_ckpt.CheckpointUnreadable(f"cannot read {rng_file}: {one_line_cause(exc)}") from None
        _set_rng_state(rng)
    return trainer_state


def resume(
    workdir: str | Path, policy, optimizer, scheduler, parallel: dict, log: Callable[[str], None]
) -> Optional[tuple[Path, dict]]:
    """Collective. Loads the checkpoint `latest` names and returns (its path, trainer_state), or None when
    there is none to resume. A checkpoint whose files differ from its manifest (truncated, overwritten,
    missing) is renamed `<name>.corrupt-<time>`, never deleted, `latest` is pointed at the next older
    complete checkpoint, and that one is tried; with none left, training starts from the beginning."""
    root = checkpoint_root(workdir)
    pointer = root / LATEST_POINTER
    candidate = root / pointer.read_text().strip() if pointer.is_file() else None
    if candidate is not None and _step_of(candidate) is None:
        complete = complete_checkpoints(workdir)
        log(f"{pointer} names '{candidate.name}', which is not a checkpoint; using the newest complete one instead")
        candidate = complete[-1] if complete else None
    while candidate is not None:
        verdict = [damage(candidate) if dist.get_rank() == 0 else None]
        dist.broadcast_object_list(verdict, src=0)
        if verdict[0] is None:
            try:
                return candidate, load(candidate, policy, optimizer, scheduler, parallel)
            except model_ckpt.CheckpointUnreadable as exc:
                checked = "match its manifest" if (candidate / MANIFEST).is_file() else "predate manifests and cannot be checked"
                raise SpinMegaError(
                    f"{exc} (its files {checked}); if this checkpoint is damaged, rename it (e.g. to "
                    f"{candidate.name}.corrupt) and re-run to resume from the one before it"
                ) from None
        older = [p for p in complete_checkpoints(workdir) if _step_of(p) < _step_of(candidate)]
        fallback = older[-1] if older else None
        if dist.get_rank() == 0:
            aside = _set_aside(candidate)
            if fallback is not None:
                atomic_write_text(pointer, fallback.name + "\n")
            else:
                pointer.unlink(missing_ok=True)
            log(
                f"checkpoint {candidate} is corrupt ({verdict[0]}); "
                + (f"moved it to {aside.name}, " if aside is not None else "")
                + (f"resuming from {fallback.name}" if fallback is not None else "training from the start of the iteration")
            )
        dist.barrier()
        candidate = fallback
    return None


def _set_aside(path: Path) -> Optional[Path]:
    if not path.exists():
        return None
    stamp = time.strftime("%Y%m%dT%H%M%S")
    aside = path.with_name(f"{path.name}.corrupt-{stamp}")
    suffix = 1
    while aside.exists():
        suffix += 1
        aside = path.with_name(f"{path.name}.corrupt-{stamp}-{suffix}")
    os.replace(path, aside)
    return aside
