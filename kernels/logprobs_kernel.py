"""Triton kernels: one streaming pass over the vocabulary per row (online log-sum-exp), and the backward.

Both kernels work on a 2-D tile of BLOCK_N rows x BLOCK_V columns so that small vocabularies (and the
CPU interpreter, whose cost is per program and per op) still give each program enough work; for LLM
vocabularies BLOCK_N is 1 and a program streams one row.

The same kernels serve the plain, vocab-parallel and fused-linear paths: a program sees a *local* slice
of the vocabulary `[label_offset, label_offset + n_valid)`, so a vocabulary shard or a vocabulary chunk is
just a different offset, and its partial log-sum-exp is combined by the caller.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from spin_mega.kernels._backend import interpreter_enabled

# Compiled: a row of a 32k-152k vocabulary streams through 4096-column tiles (8 KiB of bf16 per load,
# 16 elements per thread at 8 warps). Interpreter: every op is one numpy call, so fewer, wider programs
# win, but tiles stay small enough that the tests' vocabularies span several tiles.
_GPU_MAX_BLOCK_V = 4096
_GPU_TILE = 4096
_GPU_NUM_WARPS = 8
_INTERP_MAX_BLOCK_V = 256
_INTERP_TILE = 4096


@triton.jit
def _logprob_fwd_kernel(
    X,
    stride_x,
    LABELS,
    LSE,
    OUT,
    n_rows,
    n_valid,
    label_offset,
    ignore_index,
    WRITE_LOGPROB: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_in = rows < n_rows
    labels = tl.load(LABELS + rows, mask=row_in, other=ignore_index)
    # Ignored rows (prompt tokens, padding) never touch memory: their loads are masked off.
    active = row_in & (labels != ignore_index)
    row_ptr = X + rows.to(tl.int64) * stride_x

    m = tl.full([BLOCK_N], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_N], tl.float32)
    for start in range(0, n_valid, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        mask = active[:, None] & (cols[None, :] < n_valid)
        x = tl.load(row_ptr[:, None] + cols[None, :], mask=mask, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, axis=1))
        # A row that has seen only -inf so far keeps m = -inf; shifting by 0 instead avoids
        # exp(-inf - -inf) = NaN while every exp term is still exactly 0.
        shift = tl.where(m_new == float("-inf"), 0.0, m_new)
        s = s * tl.exp(m - shift) + tl.sum(tl.exp(x - shift[:, None]), axis=1)
        m = m_new
    # Once a row has a finite max, the max's own term is exp(0) = 1, so s >= 1; s < 1 only when s = 0
    # (no finite column: ignored row, all -inf, or an all-padding slice), and then lse = -inf + 0 = -inf
    # without evaluating log(0).
    lse = m + tl.log(tl.maximum(s, 1.0))

    local_label = labels - label_offset
    owned = active & (local_label >= 0) & (local_label < n_valid)
    x_label = tl.load(row_ptr + local_label, mask=owned, other=0.0).to(tl.float32)
    tl.store(LSE + rows, lse, mask=row_in)
    if WRITE_LOGPROB:
        # Rounding is monotone and lse >= max >= x_label, so this is already <= 0; the clamp only
        # documents the contract.
        logprob = tl.where(active, tl.minimum(x_label - lse, 0.0), 0.0)
        tl.store(OUT + rows, logprob, mask=row_in)
    else:
        tl.store(OUT + rows, x_label, mask=row_in)


@triton.jit
def _logprob_bwd_kernel(
    X,
    stride_x,
    GX,
    stride_gx,
    LABELS,
    LSE,
    G,
    n_rows,
    n_valid,
    n_cols,
    label_offset,
    ignore_index,
    BLOCK_N: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_in = rows < n_rows
    labels = tl.load(LABELS + rows, mask=row_in, other=ignore_index)
    active = row_in & (labels != ignore_index)
    g = tl.load(G + rows, mask=active, other=0.0).to(tl.float32)
    lse = tl.load(LSE + rows, mask=active, other=0.0)
    local_label = labels - label_offset
    row_x = X + rows.to(tl.int64) * stride_x
    row_gx = GX + rows.to(tl.int64) * stride_gx

    # Every column of every row is written (zeros for ignored rows and padding columns), so the
    # gradient buffer may be uninitialised or may be the logits buffer itself: each element is read
    # and written by the same program in the same iteration.
    for start in range(0, n_cols, BLOCK_V):
        cols = start + tl.arange(0, BLOCK_V)
        live = active[:, None] & (cols[None, :] < n_valid)
        x = tl.load(row_x[:, None] + cols[None, :], mask=live, other=float("-inf")).to(tl.float32)
        p = tl.exp(x - lse[:, None])
        onehot = tl.where(cols[None, :] == local_label[:, None], 1.0, 0.0)
        grad = tl.where(live, g[:, None] * (onehot - p), 0.0)
        store_mask = row_in[:, None] & (cols[None, :] < n_cols)
        tl.store(row_gx[:, None] + cols[None, :], grad.to(GX.dtype.element_ty), mask=store_mask)


def _blocks(n_cols: int, block_n: int | None, block_v: int | None) -> tuple[int, int]:
    max_v, tile = (_INTERP_MAX_BLOCK_V, _INTERP_TILE) if interpreter_enabled() else (_GPU_MAX_BLOCK_V, _GPU_TILE)
    if block_v is None:
        block_v = min(triton.next_power_of_2(max(n_cols, 1)), max_v)
    if block_n is None:
        block_n = max(1, min(16, tile // block_v))
    return block_n, block_v


def _launch_kwargs() -> dict[str, int]:
    return {} if interpreter_enabled() else {"num_warps": _GPU_NUM_WARPS}


def forward_stats(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    ignore_index: int,
    n_valid: int,
    label_offset: int = 0,
    write_logprob: bool,
    block_n: int | None = None,
    block_v: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row log-sum-exp over the first `n_valid` columns of `logits` [N, V], and either the log-prob
    of the label (`write_logprob=True`) or the raw label logit (0 where this slice does not own the label).

    Labels are global ids; this slice holds global columns `[label_offset, label_offset + n_valid)`.
    Both outputs are float32 [N]; ignored rows get lse = -inf and output 0.
    """
    n_rows = logits.shape[0]
    lse = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    out = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    if n_rows == 0:
        return lse, out
    bn, bv = _blocks(n_valid, block_n, block_v)
    grid = (triton.cdiv(n_rows, bn),)
    _logprob_fwd_kernel[grid](
        logits,
        logits.stride(0),
        labels,
        lse,
        out,
        n_rows,
        n_valid,
        label_offset,
        ignore_index,
        WRITE_LOGPROB=write_logprob,
        BLOCK_N=bn,
        BLOCK_V=bv,
        **_launch_kwargs(),
    )
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
    block_n: int | None = None,
    block_v: int | None = None,
) -> torch.Tensor:
    """grad_logits = g * (onehot(label) - exp(logits - lse)) in the logits dtype; 0 on padding columns
    and ignored rows. `out` may be `logits` itself (in-place backward)."""
    n_rows, n_cols = logits.shape
    if out is None:
        out = torch.empty(logits.shape, dtype=logits.dtype, device=logits.device)
    if n_rows == 0:
        return out
    bn, bv = _blocks(n_cols, block_n, block_v)
    grid = (triton.cdiv(n_rows, bn),)
    _logprob_bwd_kernel[grid](
        logits,
        logits.stride(0),
        out,
        out.stride(0),
        labels,
        lse,
        grad_out,
        n_rows,
        n_valid,
        n_cols,
        label_offset,
        ignore_index,
        BLOCK_N=bn,
        BLOCK_V=bv,
        **_launch_kwargs(),
    )
    return out
