"""Which implementation a call takes: Triton (compiled on CUDA, or the interpreter on CPU) or plain PyTorch.

Triton decides between compiling and interpreting when a kernel is *defined* (`@triton.jit` reads
`TRITON_INTERPRET` at decoration time), so the choice is fixed when `spin_mega.kernels` is first imported:
set `TRITON_INTERPRET=1` before that import to run the kernels on CPU tensors.
"""

from __future__ import annotations

import os
from typing import Literal

import torch

try:
    import triton  # noqa: F401
    import triton.language  # noqa: F401

    _TRITON_IMPORTABLE = True
except ImportError:  # a platform without a Triton wheel still gets the PyTorch path
    _TRITON_IMPORTABLE = False


def _read_interpret_flag() -> bool:
    if not _TRITON_IMPORTABLE:
        return False
    knobs = getattr(triton, "knobs", None)
    if knobs is not None:
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "0").lower() in {"1", "true", "yes", "on"}


# Captured once, at the same moment the kernels below are decorated, so the answer always matches
# what the decorated kernels actually are.
_INTERPRETED: bool = _read_interpret_flag()

Backend = Literal["triton", "torch"]


def interpreter_enabled() -> bool:
    """True when the Triton kernels were defined in interpreter mode (they then run on CPU tensors)."""
    return _INTERPRETED


def triton_available(device: torch.device | str | None = None) -> bool:
    """Whether the Triton kernels can run for tensors on `device` (default: CUDA if present, else CPU).

    Compiled Triton needs a CUDA tensor; the interpreter runs on any tensor.
    """
    if not _TRITON_IMPORTABLE:
        return False
    if _INTERPRETED:
        return True
    if device is None:
        return torch.cuda.is_available()
    return torch.device(device).type == "cuda"


def backend_for(tensor: torch.Tensor) -> Backend:
    """The implementation the public functions use for `tensor`: "triton" or the PyTorch fallback "torch"."""
    return "triton" if triton_available(tensor.device) else "torch"
