"""Plain-PyTorch stand-ins for the Triton kernels, with the same signatures and semantics.

Used where Triton cannot run: CPU tensors without `TRITON_INTERPRET=1`. Rows are processed in chunks so
the float32 upcast never holds more than about `_CHUNK_ELEMENTS` elements at once.
"""

from __future__ import annotations

import torch

_CHUNK_ELEMENTS = 1 << 22


def _rows_per_chunk(n_cols: int) -> int:
    return max(1, _CHUNK_ELEMENTS // max(n_cols, 1))


def forward_stats(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int,
    n_valid: int,
    label_offset: int = 0,
    write_logprob: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    """See `logprobs_kernel.forward_stats`."""
    n_rows = logits.shape[0]
    lse = torch.full((n_rows,), float("-inf"), dtype=torch.float32, device=logits.device)
    out = torch.zeros(n_rows, dtype=torch.float32, device=logits.device)
    if n_valid == 0:
        return lse, out
    step = _rows_per_chunk(n_valid)
    for r0 in range(0, n_rows, step):
        r1 = min(r0 + step, n_rows)
        x = logits[r0:r1, :n_valid].float()
        lab = labels[r0:r1]
        active = lab != ignore_index
        local = lab - label_offset
        owned = active & (local >= 0) & (local < n_valid)
        chunk_lse = torch.where(active, torch.logsumexp(x, dim=1), float("-inf"))
        x_label = torch.where(owned, x.gather(1, local.clamp(0, n_valid - 1)[:, None]).squeeze(1), 0.0)
        lse[r0:r1] = chunk_lse
        if write_logprob:
            out[r0:r1] = torch.where(active, (x_label - chunk_lse).clamp(max=0.0), 0.0)
        else:
            out[r0:r1] = x_label
    return lse, out


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
    """See `logprobs_kernel.backward_grad`."""
    n_rows, n_cols = logits.shape
    if out is None:
        out = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    step = _rows_per_chunk(n_cols)
    for r0 in range(0, n_rows, step):
        r1 = min(r0 + step, n_rows)
        lab = labels[r0:r1]
        active = lab != ignore_index
        local = lab - label_offset
        owned = active & (local >= 0) & (local < n_valid)
        g = torch.where(active, grad_out[r0:r1].float(), 0.0)
        # An owned float32 copy (`.float()` would alias float32 logits), updated in place: one buffer,
        # five passes. Ignored rows may hold anything (their exp can overflow): they are zeroed last.
        grad = logits[r0:r1, :n_valid].to(torch.float32, copy=True)
        grad.sub_(torch.where(active, lse[r0:r1], 0.0)[:, None]).exp_().mul_(-g[:, None])
        grad.masked_fill_(~active[:, None], 0.0)
        if n_valid > 0:
            label_col = local.clamp(0, n_valid - 1)[:, None]
            grad.scatter_add_(1, label_col, torch.where(owned, g, 0.0)[:, None])
        out[r0:r1, :n_valid].copy_(grad)
        out[r0:r1, n_valid:] = 0
    return out
