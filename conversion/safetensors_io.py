"""Hugging Face safetensors, read lazily and written as a stream.

Reading validates every shard with `safe_open` (which reads only the header) and materialises one tensor at
a time. Writing lays out a shard's header from the tensors' names, dtypes and shapes, which the converter
knows before it has any data, then appends each tensor's bytes as it is produced: no shard is ever held in
memory, so the shard size is free to follow the usual Hugging Face convention.
"""

from __future__ import annotations

import ctypes
import json
import math
import os
import struct
from pathlib import Path
from typing import Iterable

import torch
from safetensors import SafetensorError, safe_open

from spin_mega.errors import SpinMegaError

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"

DTYPE_CODES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
CODE_DTYPES = {code: dtype for dtype, code in DTYPE_CODES.items()}


class SafetensorsReader:
    """The tensors of an HF model directory (`model.safetensors` or an index with shards), by name."""

    def __init__(self, model_dir: str | Path):
        self.dir = Path(model_dir)
        index = self.dir / INDEX_NAME
        single = self.dir / SINGLE_NAME
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError, TypeError) as exc:
                raise SpinMegaError(f"{index} is not a valid safetensors index ({exc})") from None
            files = sorted(set(weight_map.values()))
        elif single.is_file():
            weight_map = None
            files = [SINGLE_NAME]
        else:
            other = sorted(p.name for p in self.dir.glob("*.bin")) if self.dir.is_dir() else []
            hint = f" (found {', '.join(other)}: convert them to safetensors first)" if other else ""
            raise SpinMegaError(f"{self.dir} holds no {SINGLE_NAME} or {INDEX_NAME}{hint}")
        self._where: dict[str, str] = {}
        self._layout: dict[str, tuple[int, dict]] = {}
        for name in files:
            path = self.dir / name
            if not path.is_file():
                raise SpinMegaError(f"safetensors shard {path} listed in {INDEX_NAME} is missing")
            try:
                with safe_open(str(path), framework="pt") as handle:  # validates the header and file size
                    keys = list(handle.keys())
            except (SafetensorError, OSError, ValueError) as exc:
                raise SpinMegaError(f"{path} is not a readable safetensors file ({exc})") from None
            for key in keys:
                self._where[key] = name
            self._layout[name] = _read_header(path)
        if weight_map is not None:
            for key, name in weight_map.items():
                if self._where.get(key) != name:
                    raise SpinMegaError(f"{INDEX_NAME} places {key} in {name}, but that shard does not hold it")

    def names(self) -> list[str]:
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def _entry(self, name: str) -> dict:
        return self._layout[self._where[name]][1][name]

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entry(name)["shape"])

    def dtype(self, name: str) -> str:
        return self._entry(name)["dtype"]

    def get(self, name: str) -> torch.Tensor:
        """Reads the tensor's bytes into fresh memory. Not through safetensors' memory map: the pages of a
        mapped file that have been touched stay in the process's resident set, which would grow to the
        whole checkpoint."""
        file = self._where[name]
        data_start, header = self._layout[file]
        entry = header[name]
        start, end = entry["data_offsets"]
        buffer = torch.empty(end - start, dtype=torch.uint8)
        # A view of the buffer's memory that leaves its storage resizable (`.numpy()` would pin it), so the
        # Megatron writer can free a chunk that is still referenced once it is written.
        view = memoryview((ctypes.c_ubyte * (end - start)).from_address(buffer.data_ptr())) if end > start else b""
        try:
            with open(self.dir / file, "rb") as handle:
                handle.seek(data_start + start)
                read = handle.readinto(view) if end > start else 0
        except OSError as exc:
            raise SpinMegaError(f"cannot read {name} from {self.dir / file} ({exc})") from None
        if read != end - start:
            raise SpinMegaError(f"{self.dir / file} ends inside tensor {name}")
        return buffer.view(CODE_DTYPES[entry["dtype"]]).reshape(entry["shape"])


def _read_header(path: Path) -> tuple[int, dict]:
    """(offset of the data, header) of a safetensors file that safe_open has already validated."""
    with open(path, "rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        return 8 + length, json.loads(handle.read(length))


def shard_name(index: int, count: int) -> str:
    return f"model-{index + 1:05d}-of-{count:05d}.safetensors"


class StreamingShardWriter:
    """Writes one safetensors file whose tensors (name, dtype, shape) are declared up front and whose data
    arrives one tensor at a time, in the declared order."""

    def __init__(self, path: Path, entries: list[tuple[str, torch.dtype, tuple[int, ...]]]):
        self.path = path
        self._pending = list(entries)
        header: dict = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, dtype, shape in entries:
            nbytes = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            header[name] = {
                "dtype": DTYPE_CODES[dtype],
                "shape": list(shape),
                "data_offsets": [offset, offset + nbytes],
            }
            offset += nbytes
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the data must start 8-byte aligned
        self._file = open(path, "wb")
        self._file.write(struct.pack("<Q", len(raw)))
        self._file.write(raw)
        self.data_bytes = offset

    def write(self, name: str, tensor: torch.Tensor) -> None:
        expected_name, dtype, shape = self._pending.pop(0)
        if name != expected_name or tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise AssertionError(f"{name} {tensor.dtype} {tuple(tensor.shape)} written out of plan")
        data = tensor.detach().contiguous().view(torch.uint8).reshape(-1)
        self._file.write(memoryview(data.numpy()))

    def close(self) -> None:
        if self._pending:
            raise AssertionError(f"{len(self._pending)} tensors of {self.path} were never written")
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()

    def abort(self) -> None:
        self._file.close()


def plan_shards(sizes: Iterable[int], max_shard_bytes: int) -> list[list[int]]:
    """Greedy, in order: group consecutive items into shards of at most `max_shard_bytes` (an item larger
    than that gets a shard of its own)."""
    shards: list[list[int]] = []
    current: list[int] = []
    total = 0
    for i, size in enumerate(sizes):
        if current and total + size > max_shard_bytes:
            shards.append(current)
            current, total = [], 0
        current.append(i)
        total += size
    if current:
        shards.append(current)
    return shards
