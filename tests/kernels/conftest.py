"""Kernel tests run the real Triton kernels: compiled on a GPU, through Triton's interpreter on CPU.

Triton fixes the mode of every `@triton.jit` function when it is defined, its own standard library
(`tl.zeros`, `tl.max`, ...) included, so `TRITON_INTERPRET=1` must be set before the first
`import triton` of the session. megatron.core imports triton, so when other test directories are
collected first this file is too late; the suite's root conftest (or the environment) must set it, and
the tests here then fail with that explanation instead of an obscure interpreter error.
"""

from __future__ import annotations

import os
import sys

import pytest
import torch

_TOO_LATE = (
    "triton was imported before tests/kernels/conftest.py could set TRITON_INTERPRET=1, so the Triton "
    "kernels cannot run on CPU in this session. Set TRITON_INTERPRET=1 in the environment, or at the top "
    "of tests/conftest.py when torch.cuda.is_available() is False, or run tests/kernels on its own."
)


def _interpret_requested() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0").lower() in {"1", "true", "yes", "on"}


_interpreter_usable = torch.cuda.is_available() or _interpret_requested() or "triton" not in sys.modules
if not torch.cuda.is_available() and _interpreter_usable:
    os.environ["TRITON_INTERPRET"] = "1"


@pytest.fixture(scope="session", autouse=True)
def _triton_kernels_run() -> None:
    if not _interpreter_usable:
        pytest.fail(_TOO_LATE)


@pytest.fixture(scope="session")
def device() -> torch.device:
    """Where the kernels under test run: the GPU when there is one, else CPU through the interpreter."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
