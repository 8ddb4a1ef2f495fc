"""Kernel tests run the real Triton kernels: compiled on a GPU, through Triton's interpreter on CPU.

Triton fixes the mode of every `@triton.jit` function when it is defined, its own standard library
(`tl.zeros`, `tl.max`, ...) included, so `TRITON_INTERPRET=1` must be set before the first
`import triton` of the session. megatron.core imports triton and other test directories are collected
first, so the suite's root conftest does it; if the kernels still end up compiled on a CPU machine, the
tests here fail with that explanation instead of an obscure interpreter error.
"""

from __future__ import annotations


import pytest
import torch

_TOO_LATE = (
    "the Triton kernels were defined in compiled mode, so they cannot run on CPU in this session: "
    "tests/conftest.py imports spin_mega.kernels with TRITON_INTERPRET=1 before anything imports triton; "
    "keep that, or set TRITON_INTERPRET=1 in the environment"
)


@pytest.fixture(scope="session", autouse=True)
def _triton_kernels_run() -> None:
    from spin_mega.kernels import interpreter_enabled

    if not torch.cuda.is_available() and not interpreter_enabled():
        pytest.fail(_TOO_LATE)


@pytest.fixture(scope="session")
def device() -> torch.device:
    """Where the kernels under test run: the GPU when there is one, else CPU through the interpreter."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
