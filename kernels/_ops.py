"""Route each primitive to the Triton kernel or its PyTorch stand-in, by where the tensor lives."""

from __future__ import annotations

from types import ModuleType

import torch

from spin_mega.kernels import torch_impl
from spin_mega.kernels._backend import backend_for


def _impl(tensor: torch.Tensor) -> ModuleType:
    if backend_for(tensor) == "triton":
        from spin_mega.kernels import logprobs_kernel

        return logprobs_kernel
    return torch_impl


def rows_view(logits: torch.Tensor) -> torch.Tensor:
    """[..., V] -> [N, V] with unit column stride (a view whenever the layout allows one)."""
    rows = logits.reshape(-1, logits.shape[-1])
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    return rows


def forward_stats(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int,
    n_valid: int,
    label_offset: int = 0,
    write_logprob: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    return _impl(logits).forward_stats(
        logits,
        labels.contiguous(),
        ignore_index=ignore_index,
        n_valid=n_valid,
        label_offset=label_offset,
        write_logprob=write_logprob,
    )


def backward_grad(
    logits: torch.Tensor,
    labels: torch.Tensor,
    lse: torch.Tensor,
    grad_out: torch.Tensor,
    *,
    ignore_index: int,
    n_valid: int,
    label_offset: int = 0,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    return _impl(logits).backward_grad(
        logits,
        labels.contiguous(),
        lse.contiguous(),
        grad_out.float().contiguous(),
        ignore_index=ignore_index,
        n_valid=n_valid,
        label_offset=label_offset,
        out=out,
    )


def finish_logprobs(lse: torch.Tensor, label_logit: torch.Tensor, labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """log p(label) = label_logit - lse, 0 on ignored rows, clamped to <= 0 (the contract, not a fix-up:
    lse >= label_logit holds already when both come from the same fp32 values)."""
    active = labels != ignore_index
    return torch.where(active, (label_logit - lse).clamp(max=0.0), 0.0)


def combine_partials(lse_parts: torch.Tensor, label_logit_parts: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge per-slice statistics [K, N] of disjoint vocabulary slices into whole-vocabulary ones [N].

    Exactly one slice owns each label and the others report 0, so the label logit is a sum.
    `torch.logsumexp` returns -inf (not NaN) when every slice is -inf (ignored rows, all-padding shards).
    """
    return torch.logsumexp(lse_parts, dim=0), label_logit_parts.sum(dim=0)
