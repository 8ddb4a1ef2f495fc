"""Megatron `torch_dist` checkpoints, written and read one tensor chunk at a time.

`megatron.core.dist_checkpointing.save` needs the whole (sharded) state dict in memory and a model to
produce it. A `torch_dist` checkpoint is, underneath, a torch.distributed.checkpoint (DCP) directory plus
two small files (`metadata.json`, `common.pt`), so the converter writes it with DCP directly: the save
plan is declared from shapes alone (one chunk per layer, exactly as Megatron lays out its stacked layer
tensors), and each chunk's data is produced only when the DCP file writer asks for it. Reading works the
same way in reverse: any box of any global tensor, resolved against whatever chunking the checkpoint was
saved with (any TP x PP), touching only the chunks that overlap it.

Everything here runs in the calling process alone (no collectives), whether or not torch.distributed has
been initialised.
"""

from __future__ import annotations

import io
import json
import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Union

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import DefaultSavePlanner
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import (
    LoadPlan,
    LoadPlanner,
    SavePlan,
    TensorWriteData,
    WriteItem,
    WriteItemType,
)
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from spin_mega.conversion.heap import trim_heap
from spin_mega.errors import SpinMegaError

# What megatron.core.dist_checkpointing writes beside the DCP files (and checks on load).
MCORE_METADATA = {
    "sharded_backend": "torch_dist",
    "sharded_backend_version": 1,
    "common_backend": "torch",
    "common_backend_version": 1,
}
COMMON_FILE = "common.pt"
METADATA_FILE = "metadata.json"


@dataclass(frozen=True)
class TensorChunk:
    """One chunk of a global tensor, produced on demand."""

    key: str
    global_shape: tuple[int, ...]
    offsets: tuple[int, ...]
    sizes: tuple[int, ...]
    dtype: torch.dtype
    produce: Callable[[], torch.Tensor]


@dataclass(frozen=True)
class ObjectEntry:
    """A Megatron ShardedObject: torch.save of the list of its data, as Megatron stores it."""

    key: str
    data: object


Entry = Union[TensorChunk, ObjectEntry]


class _LazySavePlanner(DefaultSavePlanner):
    def __init__(self, entries: list[Entry]):
        super().__init__(flatten_state_dict=False, flatten_sharded_tensors=False)
        self._entries = entries
        self._chunks = {(e.key, e.offsets): e for e in entries if isinstance(e, TensorChunk)}
        self._objects = {e.key: e for e in entries if isinstance(e, ObjectEntry)}
        self._last_written: torch.Tensor | None = None

    def set_up_planner(self, state_dict, storage_meta=None, is_coordinator=False) -> None:
        self.state_dict = {}
        self.is_coordinator = is_coordinator

    def create_local_plan(self) -> SavePlan:
        items = []
        for e in self._entries:
            if isinstance(e, ObjectEntry):
                items.append(WriteItem(index=MetadataIndex(e.key), type=WriteItemType.BYTE_IO))
                continue
            items.append(
                WriteItem(
                    index=MetadataIndex(e.key, torch.Size(e.offsets)),
                    type=WriteItemType.SHARD,
                    tensor_data=TensorWriteData(
                        chunk=ChunkStorageMetadata(offsets=torch.Size(e.offsets), sizes=torch.Size(e.sizes)),
                        properties=TensorProperties(dtype=e.dtype),
                        size=torch.Size(e.global_shape),
                    ),
                )
            )
        self.plan = SavePlan(items=items)
        return self.plan

    def resolve_data(self, write_item: WriteItem):
        if write_item.type == WriteItemType.BYTE_IO:
            buffer = io.BytesIO()
            torch.save([self._objects[write_item.index.fqn].data], buffer)
            return buffer
        entry = self._chunks[(write_item.index.fqn, tuple(write_item.index.offset))]
        self.release_last_chunk()
        tensor = entry.produce()
        if tuple(tensor.shape) != entry.sizes or tensor.dtype != entry.dtype:
            raise AssertionError(f"{entry.key} chunk at {entry.offsets}: got {tuple(tensor.shape)} {tensor.dtype}")
        storage = tensor.untyped_storage()
        if storage.nbytes() != tensor.nbytes or not storage.resizable():
            # The writer would copy a view of a larger buffer itself, out of release_last_chunk's reach, and
            # memory shared with numpy cannot be freed through the tensor.
            tensor = tensor.clone()
        self._last_written = tensor
        return tensor

    def release_last_chunk(self) -> None:
        """Frees the data of the chunk handed out last, which the file writer has written by now.

        DCP's file writer keeps the last chunk of every key referenced until the file is closed (a dict it
        only needs for its safetensors format), and still holds the previous chunk while it asks for the
        next: left alone, one layer's tensors plus the embedding stay resident on top of the chunk being
        produced. Emptying the storage makes those references hold nothing. Safe only because the writer
        is serial (one thread, no copy-ahead: see write_checkpoint), so a chunk is written before the next
        is requested."""
        if self._last_written is not None:
            self._last_written.untyped_storage().resize_(0)
            self._last_written = None
            trim_heap()


def write_checkpoint(path: Path, entries: list[Entry]) -> None:
    """Writes a Megatron torch_dist checkpoint directory at `path` (created; must not exist)."""
    path.mkdir(parents=True, exist_ok=False)
    # No copy-ahead: with CUDA present DCP would otherwise resolve chunks ahead of writing them (it is
    # meant for device-to-host copies), holding several in memory.
    writer = dcp.FileSystemWriter(
        str(path), single_file_per_rank=True, thread_count=1, sync_files=True, per_thread_copy_ahead=0
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to save in a single process.*")
        planner = _LazySavePlanner(entries)
        dcp.save({}, storage_writer=writer, planner=planner, no_dist=True)
        planner.release_last_chunk()
    torch.save({}, path / COMMON_FILE)
    (path / METADATA_FILE).write_text(json.dumps(MCORE_METADATA))


class _BoxPlanner(LoadPlanner):
    """Copies what the storage reader hands over into one destination tensor (a box of a global tensor)."""

    def __init__(self, dest: torch.Tensor):
        self.dest = dest

    def set_up_planner(self, *args, **kwargs) -> None:
        pass

    def create_local_plan(self) -> LoadPlan:
        raise NotImplementedError

    def create_global_plan(self, global_plan):
        return global_plan

    def finish_plan(self, central_plan):
        return central_plan

    def load_bytes(self, read_item, value) -> None:
        raise AssertionError("only tensors are read through a box planner")

    def resolve_tensor(self, read_item):
        view = self.dest
        for dim, (offset, length) in enumerate(zip(read_item.dest_offsets, read_item.lengths, strict=True)):
            view = view.narrow(dim, offset, length)
        return view

    def commit_tensor(self, read_item, tensor) -> None:
        pass


class CheckpointReader:
    """Reads boxes of the global tensors of a torch_dist checkpoint directory."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not (self.path / ".metadata").is_file():
            raise SpinMegaError(f"{self.path} is not a torch_dist checkpoint (no .metadata)")
        self._reader = dcp.FileSystemReader(str(self.path))
        try:
            self.metadata = self._reader.read_metadata()
        except Exception as exc:  # a damaged pickle raises anything; the user needs the path and cause
            raise SpinMegaError(f"cannot read the checkpoint metadata in {self.path} ({exc})") from None
        self._reader.set_up_storage_reader(self.metadata, is_coordinator=True)

    def tensor_meta(self, key: str) -> TensorStorageMetadata:
        meta = self.metadata.state_dict_metadata.get(key)
        if not isinstance(meta, TensorStorageMetadata):
            raise SpinMegaError(f"the Megatron checkpoint at {self.path} has no tensor {key}")
        return meta

    def read(self, key: str, offsets: tuple[int, ...], sizes: tuple[int, ...]) -> torch.Tensor:
        meta = self.tensor_meta(key)
        box = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=torch.Size(sizes))
        items = create_read_items_for_chunk_list(key, meta, [box])
        covered = sum(math.prod(item.lengths) for item in items)
        if covered != math.prod(sizes):
            raise SpinMegaError(
                f"the Megatron checkpoint at {self.path} does not hold all of {key} "
                f"(the box at {list(offsets)} of size {list(sizes)}: {covered} of {math.prod(sizes)} elements present)"
            )
        dest = torch.empty(sizes, dtype=meta.properties.dtype)
        try:
            self._reader.read_data(LoadPlan(items), _BoxPlanner(dest)).wait()
        except Exception as exc:  # truncated or missing .distcp files raise many types
            raise SpinMegaError(f"cannot read {key} from the Megatron checkpoint at {self.path} ({exc})") from None
        return dest
