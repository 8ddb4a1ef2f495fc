"""Bodies of the 2-rank gloo tests. Spawned processes import this module by name, so it holds only
import-safe definitions; each worker checks its own rank's results and raises on a mismatch, which
`torch.multiprocessing.spawn` re-raises in the test process."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
import torch.distributed as dist
from kernel_cases import IGNORE, fwd_atol, grad_atol

from spin_mega.kernels import (
    backend_for,
    fused_linear_token_logprobs,
    reference_fused_linear_token_logprobs,
    reference_token_logprobs,
    token_logprobs,
    vocab_parallel_token_logprobs,
)


def _init(rank: int, world: int, port: int) -> torch.device:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    # One GPU is shared by both ranks on a single-GPU machine; gloo moves the few collective bytes
    # through host memory (the kernels handle that).
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@dataclass(frozen=True)
class ShardCase:
    batch_shape: tuple[int, ...]
    local_columns: int
    vocab_size: int  # global valid columns; the rest of the world * local_columns are padding
    dtype: torch.dtype
    seed: int


VOCAB_PARALLEL_CASES = (
    ShardCase((13,), 37, 74, torch.float32, 0),  # no padding
    ShardCase((13,), 37, 69, torch.bfloat16, 1),  # padding at the end of the last shard
    ShardCase((2, 5), 40, 33, torch.float32, 2),  # the last shard is all padding, the first partly
    ShardCase((1,), 300, 600, torch.float32, 3),  # one token, several tiles per shard
)


def _full_inputs(case: ShardCase, world: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # Same seed on every rank: every rank builds the same unsharded problem and keeps its slice.
    gen = torch.Generator().manual_seed(case.seed)
    total = world * case.local_columns
    logits = torch.randn(*case.batch_shape, total, generator=gen) * 3
    logits[..., 1] = float("-inf")
    logits.view(-1, total)[0, 2] = 1e4
    logits[..., case.vocab_size :] = 1e4  # padding must be excluded, so make it dominant if it were not
    labels = torch.randint(case.vocab_size, case.batch_shape, generator=gen)
    labels.view(-1)[-1] = case.vocab_size - 1
    labels.view(-1)[0] = 0
    if labels.numel() > 2:
        labels.view(-1)[1] = IGNORE
    grad_out = torch.randn(case.batch_shape, generator=gen) * 2
    return logits.to(case.dtype).to(device), labels.to(device), grad_out.to(device)


def vocab_parallel_worker(rank: int, world: int, port: int) -> None:
    device = _init(rank, world, port)
    try:
        group = dist.group.WORLD
        for case in VOCAB_PARALLEL_CASES:
            logits, labels, grad_out = _full_inputs(case, world, device)
            assert backend_for(logits) == "triton"
            cols = slice(rank * case.local_columns, (rank + 1) * case.local_columns)
            shard = logits[..., cols].clone().requires_grad_()
            out = vocab_parallel_token_logprobs(shard, labels, group, vocab_size=case.vocab_size, ignore_index=IGNORE)

            unsharded = logits.clone().requires_grad_()
            expected = token_logprobs(unsharded, labels, IGNORE, vocab_size=case.vocab_size)
            oracle = reference_token_logprobs(logits, labels, IGNORE, case.vocab_size)
            atol = fwd_atol(logits[..., : case.vocab_size])
            torch.testing.assert_close(out, expected.detach(), atol=atol, rtol=0)
            torch.testing.assert_close(out.double(), oracle, atol=atol, rtol=0)
            assert (out <= 0).all() and not torch.isnan(out).any()

            out.backward(grad_out)
            expected.backward(grad_out)
            torch.testing.assert_close(
                shard.grad.double(), unsharded.grad[..., cols].double(), atol=grad_atol(logits[..., : case.vocab_size], grad_out), rtol=0
            )

        # Labels are checked against the global vocabulary on every rank before any collective starts,
        # so all ranks raise together and none is left waiting in the all-gather.
        logits, labels, _ = _full_inputs(VOCAB_PARALLEL_CASES[1], world, device)
        shard = logits[..., rank * 37 : (rank + 1) * 37]
        for bad in (69, 73, -3):
            labels_bad = labels.clone()
            labels_bad.view(-1)[0] = bad
            with pytest.raises(ValueError, match=r"labels must be in \[0, 69\)"):
                vocab_parallel_token_logprobs(shard, labels_bad, group, vocab_size=69)
        dist.barrier()
    finally:
        dist.destroy_process_group()


@dataclass(frozen=True)
class FusedCase:
    n_tokens: int
    hidden: int
    local_rows: int
    vocab_size: int
    chunk_size: int | None
    seed: int


FUSED_PARALLEL_CASES = (
    FusedCase(11, 16, 45, 90, 16, 0),  # chunks that do not divide the shard
    FusedCase(11, 16, 45, 83, 20, 1),  # padding in the last shard
    FusedCase(6, 8, 30, 25, None, 2),  # the last shard is all padding; default chunking
)

# float32 throughout: the lm-head product over H <= 16 terms adds ~1e-6 relative error to each logit;
# d hidden sums V grad-logit * weight products (V <= 90): within 1e-5 of the unsharded result.
FUSED_FP32_ATOL = 1e-5


def fused_linear_worker(rank: int, world: int, port: int) -> None:
    device = _init(rank, world, port)
    try:
        group = dist.group.WORLD
        for case in FUSED_PARALLEL_CASES:
            gen = torch.Generator().manual_seed(case.seed)
            total = world * case.local_rows
            hidden = (torch.randn(case.n_tokens, case.hidden, generator=gen)).to(device)
            weight = (torch.randn(total, case.hidden, generator=gen) * 0.5).to(device)
            labels = torch.randint(case.vocab_size, (case.n_tokens,), generator=gen).to(device)
            labels[0], labels[1], labels[-1] = IGNORE, 0, case.vocab_size - 1
            grad_out = (torch.randn(case.n_tokens, generator=gen) * 2).to(device)
            rows = slice(rank * case.local_rows, (rank + 1) * case.local_rows)

            h = hidden.clone().requires_grad_()
            w_shard = weight[rows].clone().requires_grad_()
            out = fused_linear_token_logprobs(
                h, w_shard, labels, IGNORE, group=group, vocab_size=case.vocab_size, chunk_size=case.chunk_size
            )

            h_ref = hidden.clone().requires_grad_()
            w_ref = weight.clone().requires_grad_()
            expected = token_logprobs(h_ref @ w_ref.T, labels, IGNORE, vocab_size=case.vocab_size)
            oracle = reference_fused_linear_token_logprobs(hidden, weight, labels, IGNORE, case.vocab_size)
            torch.testing.assert_close(out, expected.detach(), atol=FUSED_FP32_ATOL, rtol=0)
            torch.testing.assert_close(out.double(), oracle, atol=FUSED_FP32_ATOL, rtol=0)

            out.backward(grad_out)
            expected.backward(grad_out)
            # The returned d hidden is the full one (all-reduced over the group inside the kernel).
            torch.testing.assert_close(h.grad, h_ref.grad, atol=FUSED_FP32_ATOL, rtol=1e-5)
            torch.testing.assert_close(w_shard.grad, w_ref.grad[rows], atol=FUSED_FP32_ATOL, rtol=1e-5)
            assert (w_shard.grad[max(0, case.vocab_size - rank * case.local_rows) :] == 0).all()
        dist.barrier()
    finally:
        dist.destroy_process_group()
