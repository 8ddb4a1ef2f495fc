"""Lets unmodified megatron-core run on CPU (over gloo) when no GPU is present.

megatron-core assumes CUDA in four places that matter for training a GPTModel: `torch.cuda.current_device()`
used as a device argument (rotary embeddings, buffers), the CUDA RNG state calls of its model-parallel RNG
tracker, factory calls with a hard-coded `device="cuda"` (the pipeline schedules, the DDP buffers, the
gradient-norm reduction), and a tensor-type assertion in gradient clipping.
`enable()` redirects exactly those to the CPU. It is a no-op when CUDA is available, so the GPU path runs
megatron-core untouched. No Megatron code is copied here; only torch entry points are redirected.
"""

from __future__ import annotations

import functools

import torch
from torch.overrides import TorchFunctionMode

_enabled = False


def _is_cuda_device(device) -> bool:
    if device is None:
        return False
    if isinstance(device, int) and not isinstance(device, bool):
        return True  # a bare ordinal means a CUDA device to torch
    if isinstance(device, str):
        return device.startswith("cuda")
    if isinstance(device, torch.device):
        return device.type == "cuda"
    return False


class _CudaToCpu(TorchFunctionMode):
    """Rewrites a CUDA `device=` argument of any torch call to the CPU."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if _is_cuda_device(kwargs.get("device")):
            kwargs = dict(kwargs, device="cpu")
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            # Megatron's gradient clipping asserts grads are 'torch.cuda.FloatTensor'; report a CPU tensor's
            # type under its CUDA name so that check passes unchanged.
            name = func(*args)
            return name.replace("torch.", "torch.cuda.", 1) if not name.startswith("torch.cuda.") else name
        if func in (torch.Tensor.to, torch.Tensor.cuda):
            args, kwargs = _strip_cuda_from_to(func, args, kwargs)
            if args is None:
                return kwargs  # nothing to move: the tensor itself
        return func(*args, **kwargs)


def _strip_cuda_from_to(func, args, kwargs):
    tensor = args[0]
    if func is torch.Tensor.cuda:
        non_blocking = kwargs.get("non_blocking", False)
        del non_blocking
        return None, tensor
    rest = [a for a in args[1:] if not _is_cuda_device(a)]
    kwargs = {k: v for k, v in kwargs.items() if not (k == "device" and _is_cuda_device(v))}
    return (tensor, *rest), kwargs


def _cpu_rng_state(*_args, **_kwargs) -> torch.Tensor:
    return torch.get_rng_state()


def _set_cpu_rng_state(state: torch.Tensor, *_args, **_kwargs) -> None:
    torch.set_rng_state(state)


def enable() -> bool:
    """Installs the redirections if CUDA is absent. Returns True when they are active. Idempotent."""
    global _enabled
    if torch.cuda.is_available():
        return False
    if _enabled:
        return True
    from megatron.core.tensor_parallel import random as mcore_random

    # The model-parallel RNG tracker forks "CUDA" RNG states around dropout and initialisation; on CPU the
    # default generator plays that role, which keeps the tracker's fork/restore semantics intact.
    mcore_random._get_cuda_rng_state = _cpu_rng_state
    mcore_random._set_cuda_rng_state = _set_cpu_rng_state
    torch.cuda.get_rng_state = _cpu_rng_state
    torch.cuda.set_rng_state = _set_cpu_rng_state
    torch.cuda.manual_seed = torch.manual_seed
    # The CPU device itself rather than ordinal 0: Megatron passes it as `device=` also inside autograd
    # backward functions (the sequence-parallel gather / reduce-scatter), which run while the mode below is
    # suspended (a TorchFunctionMode is popped while it handles torch.autograd.backward).
    torch.cuda.current_device = functools.partial(torch.device, "cpu")
    torch.cuda.synchronize = lambda *a, **k: None
    _CudaToCpu().__enter__()
    _enabled = True
    return True


def is_enabled() -> bool:
    return _enabled
