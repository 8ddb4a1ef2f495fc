"""Shared test inputs and tolerances for the log-prob kernel tests."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from hypothesis import strategies as st

IGNORE = -100

# Forward tolerance against the float64 oracle. The oracle sees exactly the same (bf16/fp16/fp32)
# input values, so the only error is the kernel's float32 arithmetic: x - max, exp, a sum over at most a
# few thousand terms (relative error ~1e-6 on these sizes) and a log -> 2e-5 absolute; plus rounding of
# lse = max + log(sum) and of x_label - lse, each half an ulp of the largest |logit| in the row
# (2^-24 * |x|): 4 such units leave headroom. At |logit| = 1e4 that is 2.4e-3.
FWD_ATOL = 2e-5
FWD_ULPS_OF_MAX_LOGIT = 4 * 2.0**-24

# Gradient g * (onehot - p): p = exp(x - lse) inherits the forward error of (x - lse) as a relative
# error, and |onehot - p| <= 1, so the float32 gradient is within |g| * (forward tolerance). A 16-bit
# gradient is then rounded once more to the input dtype: allow one ulp relative to |g| (2^-7 for
# bfloat16's 8-bit significand, 2^-10 for float16's 11-bit one). A whole ulp, not half, because Triton's
# interpreter converts float32 -> bfloat16 by truncation where compiled Triton rounds to nearest.
GRAD_ROUNDING = {torch.float32: 0.0, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}


def finite_max_abs(x: torch.Tensor) -> float:
    finite = x[torch.isfinite(x)]
    return float(finite.abs().max()) if finite.numel() else 0.0


def fwd_atol(logits: torch.Tensor) -> float:
    return FWD_ATOL + FWD_ULPS_OF_MAX_LOGIT * finite_max_abs(logits.float())


def grad_atol(logits: torch.Tensor, grad_out: torch.Tensor) -> float:
    g = float(grad_out.abs().max()) if grad_out.numel() else 0.0
    return g * (fwd_atol(logits) + GRAD_ROUNDING[logits.dtype]) + 1e-7


@dataclass
class Case:
    logits: torch.Tensor  # [..., total_columns], the last `total - vocab` columns are padding
    labels: torch.Tensor
    grad_out: torch.Tensor  # float32, arbitrary per-token upstream gradient
    vocab_size: int


@st.composite
def cases(draw, max_rows: int = 24, max_columns: int = 700, dtypes=(torch.float32, torch.bfloat16, torch.float16)) -> Case:
    rows = draw(st.integers(1, max_rows))
    total = draw(st.integers(1, max_columns))
    pad = draw(st.integers(0, min(9, total - 1)))
    vocab = total - pad
    dtype = draw(st.sampled_from(dtypes))
    scale = draw(st.sampled_from([0.1, 1.0, 8.0]))
    ignore_fraction = draw(st.sampled_from([0.0, 0.3, 1.0]))
    n_neg_inf = draw(st.integers(0, 4))
    n_extreme = draw(st.integers(0, 3))
    three_d = draw(st.booleans()) and rows % 2 == 0
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))

    x = torch.randn(rows, total, generator=gen) * scale
    for _ in range(n_extreme):
        r, c = int(torch.randint(rows, (), generator=gen)), int(torch.randint(total, (), generator=gen))
        x[r, c] = 1e4 if torch.rand((), generator=gen) < 0.5 else -1e4
    for _ in range(n_neg_inf):
        r, c = int(torch.randint(rows, (), generator=gen)), int(torch.randint(vocab, (), generator=gen))
        x[r, c] = float("-inf")
    # Padding must never be read: poison it with values that would dominate or break the softmax.
    if pad:
        x[:, vocab:] = 1e4
        x[:, -1] = float("nan")
        if pad > 1:
            x[:, vocab] = float("inf")

    labels = torch.randint(vocab, (rows,), generator=gen)
    labels[0] = 0
    labels[-1] = vocab - 1
    labels[torch.rand(rows, generator=gen) < ignore_fraction] = IGNORE
    # A row whose valid logits are all -inf has no log-probability; keep one finite value.
    dead = ~torch.isfinite(x[:, :vocab]).any(dim=1)
    x[dead, 0] = 0.0

    grad_out = torch.randn(rows, generator=gen) * 3.0
    grad_out[torch.rand(rows, generator=gen) < 0.2] = 0.0
    logits = x.to(dtype)
    if three_d:
        logits, labels, grad_out = (t.reshape(2, rows // 2, *t.shape[1:]) for t in (logits, labels, grad_out))
    return Case(logits=logits, labels=labels, grad_out=grad_out, vocab_size=vocab)
