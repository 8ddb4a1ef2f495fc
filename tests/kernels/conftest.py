"""Kernel tests run the real Triton kernels: compiled on a GPU, through Triton's interpreter on CPU.

`@triton.jit` decides between compiling and interpreting when a kernel is defined, i.e. when
`spin_mega.kernels` is first imported, so the switch is set here, before any test module imports it.
"""

from __future__ import annotations

import importlib
import os
import sys

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

    # If another test directory imported the kernels first (without the switch), they were defined for
    # compilation and would silently take the PyTorch fallback on CPU: define them again, interpreted.
    if "spin_mega.kernels.logprobs_kernel" in sys.modules:
        import spin_mega.kernels._backend as _backend

        if not _backend.interpreter_enabled():
            importlib.reload(_backend)
            importlib.reload(sys.modules["spin_mega.kernels.logprobs_kernel"])


@pytest.fixture(scope="session")
def device() -> torch.device:
    """Where the kernels under test run: the GPU when there is one, else CPU through the interpreter."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
