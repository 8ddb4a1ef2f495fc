"""log p(label) under softmax(hidden @ weight.T) without ever holding the [N, V] logits.

The vocabulary is walked in chunks of `chunk_size` columns: each chunk's logits [N, chunk] are made by
one matmul, reduced by the log-prob kernel to a partial log-sum-exp and label logit, and dropped. Chunks
combine exactly like vocabulary shards, so tensor parallelism (`group`) is one more level of the same
combination.

Why the gradient is not computed in the forward pass (as Liger-Kernel's fused-linear cross-entropy
does): d weight = sum over tokens of g_token * (d logprob_token / d weight) needs the upstream gradient g
of every token, which is unknown until backward. Precomputing with g = 1 and rescaling later is exact for
d hidden (row-wise) but wrong for d weight whenever g differs between tokens, which is always the case in
SPIN (each sequence has its own loss weight). So the backward recomputes each chunk's logits: one extra
lm-head matmul (4 instead of 3 in total), no [N, V] memory, and correct gradients for any g.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

from spin_mega.kernels import _ops
from spin_mega.kernels._checks import check_labels, check_logits
from spin_mega.kernels.vocab_parallel import all_reduce_sum_, global_statistics, shard_layout

# A chunk's logits hold about max(N * H, _MIN_CHUNK_ELEMENTS) elements: as much memory as the hidden
# states themselves (Liger's rule of thumb), but never so few columns that the matmuls get inefficient.
_MIN_CHUNK_ELEMENTS = 1 << 24
_CHUNK_MULTIPLE = 128


def default_chunk_size(n_tokens: int, hidden_size: int, n_columns: int) -> int:
    columns = max(hidden_size, _MIN_CHUNK_ELEMENTS // max(n_tokens, 1))
    columns = -(-columns // _CHUNK_MULTIPLE) * _CHUNK_MULTIPLE
    return max(1, min(columns, n_columns))


def _chunks(n_valid: int, chunk_size: int) -> list[tuple[int, int]]:
    # Columns past n_valid are vocabulary padding: they are never multiplied at all.
    return [(c0, min(c0 + chunk_size, n_valid)) for c0 in range(0, n_valid, chunk_size)]


def _addmm_out_dtype(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)


def _mm_out_dtype_then_add(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    acc.add_(torch.mm(a, b, out_dtype=torch.float32))


def _upcast_then_addmm(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    acc.addmm_(a.float(), b.float())


# acc += a @ b for 16-bit a, b and a float32 acc, accumulated in float32, best first. The first is one cuBLAS
# call with beta = 1 and a float32 output: no [N, H] product is rounded to 16 bits, allocated or added. Its
# CUDA support for a float32 `self` with 16-bit operands differs across the torch versions pyproject allows
# (some require self to have the operands' dtype); the second allocates a float32 product; the third widens
# the operands (float32 copies of both) and works on every device. CPU has no 16-bit-in, float32-out GEMM.
FP32_ACCUMULATIONS: tuple[tuple[str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None]], ...] = (
    ("torch.addmm(out_dtype=float32) into the accumulator", _addmm_out_dtype),
    ("torch.mm(out_dtype=float32), then add", _mm_out_dtype_then_add),
    ("operands widened to float32, then addmm", _upcast_then_addmm),
)


@dataclass(frozen=True)
class Fp32Accumulation:
    name: str
    apply: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], None]
    rejected: tuple[tuple[str, str], ...]  # (formulation, why) of each better one that failed here


def _probe(apply, device: torch.device, dtype: torch.dtype) -> str | None:
    """None when `apply` accumulates a small product into float32 in place, as float64 does; else why not."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(16, 64, generator=gen).to(dtype)
    b = torch.randn(64, 24, generator=gen).to(dtype)
    acc = torch.randn(16, 24, generator=gen)
    expected = acc.double() + a.double() @ b.double()
    acc_dev = acc.to(device)
    try:
        apply(acc_dev, a.to(device), b.to(device))
    except Exception as exc:  # NotImplementedError, RuntimeError (dtype checks), TypeError (no out_dtype)
        return f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
    error = (acc_dev.double().cpu() - expected).abs().max().item()
    # Products of 16-bit numbers are exact in float32 and 64-term sums lose ~1e-6; a 16-bit rounded
    # product is off by ~1e-2 of its size.
    if acc_dev.dtype != torch.float32 or not error <= 1e-4 * expected.abs().max().item():
        return f"off by {error:.3g} from the float64 sum (not float32 accumulation)"
    return None


@functools.lru_cache(maxsize=None)
def fp32_accumulation(device: torch.device, dtype: torch.dtype) -> Fp32Accumulation:
    """The first formulation in FP32_ACCUMULATIONS that works on `device` for `dtype` operands, found once
    per process by trying each on small tensors against float64."""
    rejected = []
    for name, apply in FP32_ACCUMULATIONS:
        why = _probe(apply, device, dtype)
        if why is None:
            return Fp32Accumulation(name, apply, tuple(rejected))
        rejected.append((name, why))
    raise RuntimeError(f"no float32-accumulating GEMM works on {device} for {dtype}: {rejected}")


def _addmm_fp32_(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b, accumulated in float32 (acc is float32, a and b 16-bit)."""
    fp32_accumulation(acc.device, a.dtype).apply(acc, a, b)


class FusedLinearTokenLogprobsFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        labels: torch.Tensor,
        ignore_index: int,
        group: dist.ProcessGroup | None,
        offset: int,
        n_valid: int,
        chunk_size: int,
    ) -> torch.Tensor:
        lse_parts, label_parts = [], []
        for c0, c1 in _chunks(n_valid, chunk_size):
            logits = hidden @ weight[c0:c1].T
            lse_c, label_c = _ops.forward_stats(
                logits, labels, ignore_index=ignore_index, n_valid=c1 - c0, label_offset=offset + c0, write_logprob=False
            )
            lse_parts.append(lse_c)
            label_parts.append(label_c)
        if lse_parts:
            lse, label_logit = _ops.combine_partials(torch.stack(lse_parts), torch.stack(label_parts))
        else:  # this rank's shard is all padding
            lse = torch.full(labels.shape, float("-inf"), dtype=torch.float32, device=hidden.device)
            label_logit = torch.zeros(labels.shape, dtype=torch.float32, device=hidden.device)
        lse, label_logit = global_statistics(lse, label_logit, group)
        ctx.save_for_backward(hidden, weight, labels, lse)
        ctx.ignore_index = ignore_index
        ctx.group = group
        ctx.offset = offset
        ctx.n_valid = n_valid
        ctx.chunk_size = chunk_size
        return _ops.finish_logprobs(lse, label_logit, labels, ignore_index)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        hidden, weight, labels, lse = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        chunks = _chunks(ctx.n_valid, ctx.chunk_size)
        grad_weight = torch.zeros_like(weight) if need_weight else None
        # Several chunks add into d hidden: accumulate in float32 so bf16 rounding does not pile up.
        accumulate_fp32 = need_hidden and len(chunks) > 1 and hidden.dtype != torch.float32
        grad_hidden = None
        if need_hidden:
            grad_hidden = torch.zeros(hidden.shape, dtype=torch.float32 if accumulate_fp32 else hidden.dtype, device=hidden.device)
        g = grad_out.float().contiguous()
        for c0, c1 in chunks:
            w = weight[c0:c1]
            logits = hidden @ w.T
            # The recomputed logits are private to this loop, so their gradient overwrites them.
            grad_logits = _ops.backward_grad(
                logits, labels, lse, g, ignore_index=ctx.ignore_index, n_valid=c1 - c0, label_offset=ctx.offset + c0, out=logits
            )
            if need_weight:
                torch.mm(grad_logits.T, hidden, out=grad_weight[c0:c1])
            if need_hidden:
                if accumulate_fp32:
                    _addmm_fp32_(grad_hidden, grad_logits, w)
                else:
                    grad_hidden.addmm_(grad_logits, w)
        if need_hidden:
            if ctx.group is not None:
                # Each rank holds d hidden through its own vocabulary shard only; the caller gets the sum.
                all_reduce_sum_(grad_hidden, ctx.group)
            grad_hidden = grad_hidden.to(hidden.dtype)
        return grad_hidden, grad_weight, None, None, None, None, None, None


def fused_linear_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    *,
    group: dist.ProcessGroup | None = None,
    vocab_size: int | None = None,
    chunk_size: int | None = None,
    range_check: bool = True,
) -> torch.Tensor:
    """float32 [N] log p(label) under softmax(hidden @ weight.T), without materialising the logits.

    Args:
        hidden: [N, H] (bf16/fp16/fp32), the final hidden states.
        weight: [V_local, H], same dtype: the lm-head (output embedding) weight, or with `group` this
            rank's vocabulary shard (rank r holds global rows [r * V_local, (r + 1) * V_local)).
        labels: [N] global token ids or `ignore_index`.
        group: the tensor-parallel group the vocabulary is sharded over (None: unsharded). With a group,
            the forward all-gathers 8 bytes per token once, and the backward all-reduces d hidden over the
            group, so the returned d hidden is the FULL gradient (do not all-reduce it again, e.g. via
            Megatron's copy_to_tensor_model_parallel_region); d weight is this rank's shard's.
        vocab_size: global number of valid vocabulary rows; rows past it are padding (0 gradient, and
            never multiplied).
        chunk_size: vocabulary columns per chunk; default keeps a chunk's logits about the size of
            `hidden` (at least 2^24 elements).
        range_check: False skips the per-call label range check (see `token_logprobs`).

    Memory: one [N, chunk] logits buffer at a time, plus a float32 [N, H] accumulator for d hidden in
    backward when the inputs are 16-bit. Compute: 1 matmul forward, 3 backward (the logits are recomputed).
    """
    check_logits(hidden, "hidden")
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"expected hidden [N, H] and weight [V, H], got {tuple(hidden.shape)} and {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype or weight.device != hidden.device:
        raise ValueError(f"hidden ({hidden.dtype}, {hidden.device}) and weight ({weight.dtype}, {weight.device}) must match")
    if labels.device != hidden.device:
        raise ValueError(f"labels are on {labels.device} but hidden on {hidden.device}")
    total, offset, n_valid = shard_layout(weight.shape[0], group, vocab_size)
    labels = check_labels(labels, hidden.shape[:1], total, ignore_index, range_check).contiguous()
    if chunk_size is None:
        chunk_size = default_chunk_size(hidden.shape[0], hidden.shape[1], max(n_valid, 1))
    elif int(chunk_size) < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    return FusedLinearTokenLogprobsFunction.apply(
        hidden, weight, labels, int(ignore_index), group, offset, n_valid, int(chunk_size)
    )
