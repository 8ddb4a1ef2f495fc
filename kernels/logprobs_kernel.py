"""Triton kernels: one streaming pass over the vocabulary per row (online log-sum-exp), and the backward.

Both kernels work on a 2-D tile of BLOCK_N rows x BLOCK_V columns so that small vocabularies (and the
CPU interpreter, whose cost is per program and per op) still give each program enough work; for LLM
vocabularies BLOCK_N is 1 and a program streams one row.

The same kernels serve the plain, vocab-parallel and fused-linear paths: a program sees a *local* slice
of the vocabulary `[label_offset, label_offset + n_valid)`, so a vocabulary shard or a vocabulary chunk is
just a different offset, and its partial log-sum-exp is combined by the caller.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

from spin_mega.kernels._backend import interpreter_enabled

@dataclass(frozen=True)
class LaunchConfig:
    """How a kernel is launched for one vocabulary width: tile shape and, compiled, warps and pipeline depth."""

    block_n: int
    block_v: int
    num_warps: int
    num_stages: int

    def launch_kwargs(self) -> dict[str, int]:
        return {} if interpreter_enabled() else {"num_warps": self.num_warps, "num_stages": self.num_stages}


# Compiled, an LLM vocabulary (32k-152k) streams through one row per program in tiles of 4096 columns.
# Elements per thread per tile, read off the AOT-compiled SASS at sm_90 (python -m spin_mega.kernels.aot):
# the forward's per-tile cross-thread max costs ~40 instructions, so 32 elements per thread (4 warps) cut
# it to 6.6 instructions per element from 7.6 at 16, at 95 registers (5 programs of 128 threads per SM,
# 40 KB of loads in flight); the backward has no reduction and gains little from more (5.7 vs 5.8), so it
# keeps 16 per thread at 32 registers. Larger tiles (8192 columns) save < 0.5 more and double registers.
# Triton's software pipeliner leaves this loop as it is (no dot to feed): num_stages 1-3 give the same SASS.
# Small vocabularies put several rows in a program; 2048 elements per program keeps the backward's
# per-row state from spilling (4096 spilled at 256 and 1024 columns).
# Interpreter: every op is one numpy call, so fewer, wider programs win, but tiles stay small enough that
# the tests' vocabularies span several tiles.
_GPU_MAX_BLOCK_V = 4096
_GPU_ROWS_TILE = 2048
_GPU_ELEMENTS_PER_THREAD = {"fwd": 32, "bwd": 16}
_GPU_MAX_WARPS = 8
_GPU_NUM_STAGES = 1
_INTERP_MAX_BLOCK_V = 256
_INTERP_ROWS_TILE = 4096
# Below 16 columns a tile would only add programs: a 5-column vocabulary is one masked 16-column tile.
_MIN_BLOCK_V = 16


def launch_config(n_cols: int, kernel: str, *, interpreted: bool | None = None) -> LaunchConfig:
    """The tile and launch options of `kernel` ("fwd" or "bwd") for `n_cols` vocabulary columns: what
    every launch uses, and what the AOT compile check builds, so the two cannot drift."""
    if interpreted is None:
        interpreted = interpreter_enabled()
    max_v, rows_tile = (_INTERP_MAX_BLOCK_V, _INTERP_ROWS_TILE) if interpreted else (_GPU_MAX_BLOCK_V, _GPU_ROWS_TILE)
    block_v = min(max(triton.next_power_of_2(max(n_cols, 1)), _MIN_BLOCK_V), max_v)
    block_n = max(1, min(16, rows_tile // block_v))
    threads = block_n * block_v // _GPU_ELEMENTS_PER_THREAD[kernel]
    num_warps = max(1, min(_GPU_MAX_WARPS, threads // 32))
    return LaunchConfig(block_n, block_v, num_warps, _GPU_NUM_STAGES)


def gpu_launch_configs(kernel: str) -> list[tuple[int, LaunchConfig]]:
    """Every distinct compiled launch configuration of `kernel`, each with the smallest column count
    that selects it."""
    seen: dict[LaunchConfig, int] = {}
    n_cols = 1
    while n_cols <= 2 * _GPU_MAX_BLOCK_V:
        seen.setdefault(launch_config(n_cols, kernel, interpreted=False), n_cols)
        n_cols *= 2
    return [(n, config) for config, n in seen.items()]


if interpreter_enabled():

    @triton.jit
    def _exp2(x):
        return tl.exp2(x)

else:

    @triton.jit
    def _exp2(x):
        # tl.exp2 lowers to the IEEE-denormal-safe ex2.approx.f32 (a compare, two multiplies and a select
        # around MUFU.EX2); flushing denormal results to zero changes no sum here, which are all >= 1.
        return tl.inline_asm_elementwise("ex2.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32, is_pure=True, pack=1)


@triton.jit
def _online_lse_step(x, m, s, LOG2E: tl.constexpr):
    """Fold tile x [BLOCK_N, BLOCK_V] (float32, -inf where masked) into the running max m [BLOCK_N] and
    the per-column running sums s [BLOCK_N, BLOCK_V] (scaled to exp(-m)). Only the max crosses threads
    every tile; the sum is reduced once, after the loop."""
    m_new = tl.maximum(m, tl.max(x, axis=1))
    # A row that has seen only -inf so far keeps m = -inf; shifting by 0 instead avoids
    # exp(-inf - -inf) = NaN while every exp term is still exactly 0.
    shift = tl.where(m_new == float("-inf"), 0.0, m_new) * LOG2E
    alpha = _exp2(m * LOG2E - shift)
    s = tl.fma(s, alpha[:, None], _exp2(tl.fma(x, LOG2E, -shift[:, None])))
    return m_new, s


@triton.jit
def _sweep_bounds(active, n_valid, n_cols, BLOCK_N: tl.constexpr, BLOCK_V: tl.constexpr):
    """(end of the whole tiles of valid columns, end of the sweep). With one row per program (every LLM
    vocabulary), an ignored row has no steady state at all: its loads can then go unmasked."""
    n_full = n_valid - n_valid % BLOCK_V
    n_end = n_cols
    if BLOCK_N == 1:
        row_active = tl.sum(active.to(tl.int32), axis=0) > 0
        n_full = tl.where(row_active, n_full, 0)
        n_end = tl.where(row_active, n_cols, 0)
    return n_full, n_end


@triton.jit
def _load_tile(ptrs, active, ROW_MASK: tl.constexpr):
    if ROW_MASK:
        return tl.load(ptrs, mask=active[:, None], other=float("-inf"))
    else:
        return tl.load(ptrs)


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
    # exp(x) = exp2(x * LOG2E): each exponential is one fused multiply-add and one MUFU.EX2.
    LOG2E: tl.constexpr = 1.4426950408889634
    LN2: tl.constexpr = 0.6931471805599453
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_in = rows < n_rows
    # Labels are checked to lie in [0, vocab) or equal ignore_index, both 32-bit: all index math below
    # is 32-bit except the one row offset.
    labels = tl.load(LABELS + rows, mask=row_in, other=ignore_index).to(tl.int32)
    # Ignored rows (prompt tokens, padding) never touch memory: their loads are masked off.
    active = row_in & (labels != ignore_index)
    row_ptr = X + rows.to(tl.int64) * stride_x
    cols = tl.arange(0, BLOCK_V)

    m = tl.full([BLOCK_N], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_N, BLOCK_V], tl.float32)
    n_full, n_end = _sweep_bounds(active, n_valid, n_valid, BLOCK_N, BLOCK_V)
    # Steady state: whole tiles, masked by row only (one row: not at all), so loads stay vectorised
    # whatever n_valid is; the pointers advance instead of being recomputed.
    ptrs = row_ptr[:, None] + cols[None, :]
    for _ in range(0, n_full, BLOCK_V):
        x = _load_tile(ptrs, active, BLOCK_N > 1)
        m, s = _online_lse_step(x.to(tl.float32), m, s, LOG2E)
        ptrs += BLOCK_V
    for start in range(n_full, n_end, BLOCK_V):  # the partial last tile, if any
        tail = start + cols
        x = tl.load(row_ptr[:, None] + tail[None, :], mask=active[:, None] & (tail[None, :] < n_valid), other=float("-inf"))
        m, s = _online_lse_step(x.to(tl.float32), m, s, LOG2E)
    # Once a row has a finite max, the max's own term is exp(0) = 1, so the sum is >= 1; below 1 only
    # when it is 0 (no finite column: ignored row, all -inf, or an all-padding slice), and then
    # lse = -inf + 0 = -inf without evaluating log(0).
    lse = m + tl.log2(tl.maximum(tl.sum(s, axis=1), 1.0)) * LN2

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
    LOG2E: tl.constexpr = 1.4426950408889634
    pid = tl.program_id(0)
    rows = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    row_in = rows < n_rows
    labels = tl.load(LABELS + rows, mask=row_in, other=ignore_index).to(tl.int32)
    active = row_in & (labels != ignore_index)
    g = tl.load(G + rows, mask=active, other=0.0).to(tl.float32)
    lse_log2 = tl.load(LSE + rows, mask=active, other=0.0) * LOG2E
    local_label = labels - label_offset
    owned = active & (local_label >= 0) & (local_label < n_valid)
    row_x = X + rows.to(tl.int64) * stride_x
    row_gx = GX + rows.to(tl.int64) * stride_gx
    cols = tl.arange(0, BLOCK_V)
    neg_g = -g

    # The label's own gradient g * (1 - p) is read now and written after the sweep, so the sweep
    # writes the same -g * p everywhere with no per-element label compare. Read first because the
    # gradient buffer may be the logits buffer itself.
    x_label = tl.load(row_x + local_label, mask=owned, other=float("-inf")).to(tl.float32)
    grad_label = g - g * _exp2(tl.fma(x_label, LOG2E, -lse_log2))

    # Every column of every row is written (zeros for ignored rows and padding columns), so the
    # gradient buffer may be uninitialised or may be the logits buffer itself: each element is read
    # and written by the same thread in the same iteration.
    n_full, _ = _sweep_bounds(active, n_valid, n_cols, BLOCK_N, BLOCK_V)
    x_ptrs = row_x[:, None] + cols[None, :]
    gx_ptrs = row_gx[:, None] + cols[None, :]
    for _ in range(0, n_full, BLOCK_V):
        x = _load_tile(x_ptrs, active, BLOCK_N > 1).to(tl.float32)
        grad = neg_g[:, None] * _exp2(tl.fma(x, LOG2E, -lse_log2[:, None]))
        if BLOCK_N > 1:
            tl.store(gx_ptrs, grad.to(GX.dtype.element_ty), mask=row_in[:, None])
        else:
            tl.store(gx_ptrs, grad.to(GX.dtype.element_ty))
        x_ptrs += BLOCK_V
        gx_ptrs += BLOCK_V
    # The rest: the last partial tile of valid columns, then Megatron's padding columns (gradient 0);
    # for an ignored row (one row per program), every column, as zeros, without reading the logits.
    for start in range(n_full, n_cols, BLOCK_V):
        offs = start + cols
        live = active[:, None] & (offs[None, :] < n_valid)
        x = tl.load(row_x[:, None] + offs[None, :], mask=live, other=float("-inf")).to(tl.float32)
        grad = tl.where(live, neg_g[:, None] * _exp2(tl.fma(x, LOG2E, -lse_log2[:, None])), 0.0)
        store_mask = row_in[:, None] & (offs[None, :] < n_cols)
        tl.store(row_gx[:, None] + offs[None, :], grad.to(GX.dtype.element_ty), mask=store_mask)
    # The label column was written with -g * p by whichever thread holds it; the barrier orders that
    # store before this one.
    tl.debug_barrier()
    tl.store(row_gx + local_label, grad_label.to(GX.dtype.element_ty), mask=owned)


def _config(n_cols: int, kernel: str, block_n: int | None, block_v: int | None) -> LaunchConfig:
    """launch_config(n_cols, kernel), with the tile overridden where a test asks for one."""
    config = launch_config(n_cols, kernel)
    if block_v is not None:
        config = replace(config, block_v=block_v, block_n=block_n or config.block_n)
    elif block_n is not None:
        config = replace(config, block_n=block_n)
    return config


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
    config = _config(n_valid, "fwd", block_n, block_v)
    grid = (triton.cdiv(n_rows, config.block_n),)
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
        BLOCK_N=config.block_n,
        BLOCK_V=config.block_v,
        **config.launch_kwargs(),
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
    config = _config(n_cols, "bwd", block_n, block_v)
    grid = (triton.cdiv(n_rows, config.block_n),)
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
        BLOCK_N=config.block_n,
        BLOCK_V=config.block_v,
        **config.launch_kwargs(),
    )
    return out
