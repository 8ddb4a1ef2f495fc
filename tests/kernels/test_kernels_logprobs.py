"""token_logprobs / sequence_logprobs / segment_logprobs against the float64 oracle, on the Triton path."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_cases import IGNORE, Case, cases, fwd_atol, grad_atol

from spin_mega.kernels import (
    backend_for,
    reference_sequence_logprobs,
    reference_token_logprobs,
    segment_logprobs,
    sequence_logprobs,
    token_logprobs,
    triton_available,
)
from spin_mega.kernels import logprobs_kernel

FAST = settings(max_examples=30, deadline=None, derandomize=True)


def _on(case: Case, device: torch.device) -> Case:
    return Case(case.logits.to(device), case.labels.to(device), case.grad_out.to(device), case.vocab_size)


def _check_against_reference(case: Case, inplace_backward: bool = False) -> None:
    logits = case.logits.clone().requires_grad_()
    # A float64 leaf, so the oracle's gradient is not rounded to the input dtype.
    ref_logits = case.logits.double().requires_grad_()
    logprobs = token_logprobs(logits, case.labels, IGNORE, vocab_size=case.vocab_size, inplace_backward=inplace_backward)
    ref = reference_token_logprobs(ref_logits, case.labels, IGNORE, case.vocab_size)

    assert logprobs.dtype == torch.float32 and logprobs.shape == case.labels.shape
    assert not torch.isnan(logprobs).any()
    assert (logprobs <= 0).all()
    assert (logprobs[case.labels == IGNORE] == 0).all()
    torch.testing.assert_close(logprobs.double(), ref.detach(), atol=fwd_atol(case.logits[..., : case.vocab_size]), rtol=0)

    logprobs.backward(case.grad_out)
    ref.backward(case.grad_out.double())
    grad = logits.grad
    assert grad.dtype == case.logits.dtype and grad.shape == case.logits.shape
    assert not torch.isnan(grad).any()
    assert (grad[..., case.vocab_size :] == 0).all()
    torch.testing.assert_close(
        grad.double(), ref_logits.grad, atol=grad_atol(case.logits[..., : case.vocab_size], case.grad_out), rtol=0
    )


def test_triton_path_is_taken(device: torch.device) -> None:
    assert triton_available(device)
    assert backend_for(torch.zeros(1, device=device)) == "triton"


@FAST
@given(case=cases())
def test_token_logprobs_match_reference(case: Case, device: torch.device) -> None:
    _check_against_reference(_on(case, device))


@settings(max_examples=20, deadline=None, derandomize=True)
@given(
    case=cases(max_rows=9, max_columns=300, dtypes=(torch.float32, torch.bfloat16)),
    block_n=st.sampled_from([1, 2, 4]),
    block_v=st.sampled_from([16, 32, 64]),
    offset=st.integers(0, 50),
)
def test_kernel_tiles_and_slices(case: Case, block_n: int, block_v: int, offset: int, device: torch.device) -> None:
    """The raw kernels with tiles much smaller than the row (so the online rescaling runs many times, on
    the GPU too) and a vocabulary slice starting at `offset`, as vocab-parallel and fused-linear use them."""
    case = _on(case, device)
    logits = case.logits.reshape(-1, case.logits.shape[-1])
    labels = case.labels.reshape(-1)
    g = case.grad_out.reshape(-1)
    n_valid = case.vocab_size
    active = labels != IGNORE
    global_labels = torch.where(active, labels + offset, IGNORE)

    lse, label_logit = logprobs_kernel.forward_stats(
        logits, global_labels, ignore_index=IGNORE, n_valid=n_valid, label_offset=offset, write_logprob=False,
        block_n=block_n, block_v=block_v,
    )
    valid = logits[:, :n_valid].double()
    ref_lse = torch.where(active, torch.logsumexp(valid, dim=1), float("-inf"))
    ref_label = torch.where(active, valid.gather(1, labels.clamp(min=0)[:, None]).squeeze(1), 0.0)
    torch.testing.assert_close(lse.double(), ref_lse, atol=fwd_atol(valid), rtol=0)
    torch.testing.assert_close(label_logit.double(), ref_label, atol=0, rtol=0)

    grad = logprobs_kernel.backward_grad(
        logits, global_labels, lse, g, ignore_index=IGNORE, n_valid=n_valid, label_offset=offset,
        block_n=block_n, block_v=block_v,
    )
    ref_logits = logits.double().requires_grad_()
    reference_token_logprobs(ref_logits, labels, IGNORE, n_valid).backward(g.double())
    torch.testing.assert_close(grad.double(), ref_logits.grad.double(), atol=grad_atol(valid.to(logits.dtype), g), rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_inplace_backward_gives_the_same_gradient(dtype: torch.dtype, device: torch.device) -> None:
    gen = torch.Generator().manual_seed(3)
    logits = (torch.randn(6, 5, 301, generator=gen) * 4).to(dtype).to(device)
    labels = torch.randint(297, (6, 5), generator=gen).to(device)
    labels[0, :2] = IGNORE
    g = torch.randn(6, 5, generator=gen).to(device)

    out_of_place = logits.clone().requires_grad_()
    token_logprobs(out_of_place, labels, vocab_size=297).backward(g)

    # Logits produced by an op whose backward does not need them, as with the lm-head matmul.
    source = logits.clone().requires_grad_()
    produced = source * 1.0
    token_logprobs(produced, labels, vocab_size=297, inplace_backward=True).backward(g)

    assert torch.equal(source.grad, out_of_place.grad)
    # The gradient was written into the logits buffer itself.
    assert torch.equal(produced.detach(), out_of_place.grad)


def test_every_token_ignored(device: torch.device) -> None:
    logits = torch.randn(3, 4, 50, device=device).requires_grad_()
    labels = torch.full((3, 4), IGNORE, device=device)
    logprobs = token_logprobs(logits, labels)
    assert torch.equal(logprobs, torch.zeros(3, 4, device=device))
    assert torch.equal(sequence_logprobs(logits, labels), torch.zeros(3, device=device))
    logprobs.backward(torch.randn(3, 4, device=device))
    assert torch.equal(logits.grad, torch.zeros_like(logits))


def test_extremes_and_neg_inf_give_no_nan(device: torch.device) -> None:
    logits = torch.tensor(
        [
            [1e4, -1e4, 0.0, float("-inf")],
            [float("-inf"), float("-inf"), 3.0, float("-inf")],
            [-1e4, -1e4, -1e4, -1e4],
            [0.0, float("-inf"), 1e4, 1e4],
        ],
        device=device,
    ).requires_grad_()
    labels = torch.tensor([0, 2, 3, 1], device=device)
    logprobs = token_logprobs(logits, labels)
    ref = reference_token_logprobs(logits.detach(), labels)
    torch.testing.assert_close(logprobs.double(), ref, atol=fwd_atol(logits.detach()), rtol=0)
    assert logprobs[3] == float("-inf") and (logprobs <= 0).all()
    logprobs[:3].sum().backward()
    assert torch.isfinite(logits.grad).all()


@pytest.mark.parametrize("block_v", [16, None])
def test_tiles_that_are_entirely_neg_inf(block_v: int | None, device: torch.device) -> None:
    """Rows whose first tiles hold only -inf: the online max stays -inf across whole tiles, which must
    not turn into exp(-inf - -inf) = NaN. block_v=None uses the default tile (256 in the interpreter)."""
    logits = torch.randn(3, 600, device=device)
    logits[:, :520] = float("-inf")
    logits[1, 530:] = float("-inf")
    labels = torch.tensor([599, 525, 3], device=device)
    g = torch.tensor([1.5, -2.0, 0.5], device=device)
    lse, logprobs = logprobs_kernel.forward_stats(
        logits, labels, ignore_index=IGNORE, n_valid=600, write_logprob=True, block_n=1, block_v=block_v
    )
    ref_logits = logits.double().requires_grad_()
    ref = reference_token_logprobs(ref_logits, labels)
    torch.testing.assert_close(logprobs.double(), ref.detach(), atol=fwd_atol(logits), rtol=0)
    grad = logprobs_kernel.backward_grad(logits, labels, lse, g, ignore_index=IGNORE, n_valid=600, block_v=block_v)
    ref.backward(g.double())
    torch.testing.assert_close(grad.double(), ref_logits.grad, atol=grad_atol(logits, g), rtol=0)


@FAST
@given(case=cases(max_rows=12, max_columns=400))
def test_sequence_logprobs_match_reference(case: Case, device: torch.device) -> None:
    case = _on(case, device)
    logits = case.logits.reshape(1, -1, case.logits.shape[-1]) if case.logits.dim() == 2 else case.logits
    labels = case.labels.reshape(logits.shape[:-1])
    g = case.grad_out.reshape(-1)[: logits.shape[0]]

    x = logits.clone().requires_grad_()
    x_ref = logits.double().requires_grad_()
    sums = sequence_logprobs(x, labels, IGNORE, vocab_size=case.vocab_size)
    ref = reference_sequence_logprobs(x_ref, labels, IGNORE, case.vocab_size)
    assert sums.dtype == torch.float32 and sums.shape == (logits.shape[0],)
    # A sum of T per-token values: T times the per-token tolerance.
    tol_scale = labels.shape[1]
    torch.testing.assert_close(sums.double(), ref.detach(), atol=tol_scale * fwd_atol(logits[..., : case.vocab_size]), rtol=0)
    sums.backward(g)
    ref.backward(g.double())
    torch.testing.assert_close(
        x.grad.double(), x_ref.grad.double(), atol=grad_atol(logits[..., : case.vocab_size], g), rtol=0
    )


def test_segment_logprobs_sum_per_segment(device: torch.device) -> None:
    gen = torch.Generator().manual_seed(5)
    logits = torch.randn(2, 7, 90, generator=gen).to(device).requires_grad_()
    labels = torch.randint(90, (2, 7), generator=gen).to(device)
    labels[1, 0] = IGNORE
    segments = torch.tensor([[0, 0, 0, 1, 1, -1, -1], [2, 2, 3, 3, 3, 3, 3]], device=device)
    sums = segment_logprobs(logits, labels, segments, num_segments=5)
    per_token = reference_token_logprobs(logits.detach(), labels)
    expected = torch.stack([per_token[segments == s].sum() for s in range(5)])
    torch.testing.assert_close(sums.double(), expected, atol=7 * fwd_atol(logits.detach()), rtol=0)
    sums.sum().backward()
    assert (logits.grad[0, 5:] == 0).all()
    with pytest.raises(ValueError, match="num_segments"):
        segment_logprobs(logits, labels, segments, num_segments=3)


@pytest.mark.parametrize("bad", [-1, -101, 90, 95, 10**9])
def test_out_of_range_label_raises(bad: int, device: torch.device) -> None:
    logits = torch.randn(2, 3, 96, device=device)
    labels = torch.zeros(2, 3, dtype=torch.long, device=device)
    labels[1, 2] = bad
    with pytest.raises(ValueError, match=rf"labels must be in \[0, 90\).*out-of-range label.*{bad}"):
        token_logprobs(logits, labels, vocab_size=90)
    with pytest.raises(ValueError, match="out-of-range"):
        sequence_logprobs(logits, labels, vocab_size=90)


def test_bad_arguments_raise(device: torch.device) -> None:
    logits = torch.randn(4, 10, device=device)
    with pytest.raises(ValueError, match="shape"):
        token_logprobs(logits, torch.zeros(5, dtype=torch.long, device=device))
    with pytest.raises(ValueError, match="vocab_size"):
        token_logprobs(logits, torch.zeros(4, dtype=torch.long, device=device), vocab_size=11)
    with pytest.raises(ValueError, match="bfloat16, float16 or float32"):
        token_logprobs(logits.double(), torch.zeros(4, dtype=torch.long, device=device))
    with pytest.raises(ValueError, match="integer"):
        token_logprobs(logits, torch.zeros(4, device=device))


def test_non_contiguous_logits(device: torch.device) -> None:
    gen = torch.Generator().manual_seed(9)
    labels = torch.randint(130, (3, 7), generator=gen).to(device)
    g = torch.randn(3, 7, generator=gen).to(device)
    base = torch.randn(3, 8, 130, generator=gen).to(device)
    for transpose in (False, True):
        full = base.clone().requires_grad_()
        full_ref = base.double().requires_grad_()
        # logits[:, :-1] before the label shift cannot be viewed as [N, V] rows; transposed even less so.
        logits, lab, grad_out = full[:, :-1], labels, g
        if transpose:
            logits, lab, grad_out = logits.transpose(0, 1), labels.T, g.T
        out = token_logprobs(logits, lab)
        ref = reference_token_logprobs(full_ref[:, :-1], labels)
        torch.testing.assert_close((out.T if transpose else out).double(), ref.detach(), atol=fwd_atol(base), rtol=0)
        out.backward(grad_out)
        ref.backward(g.double())
        torch.testing.assert_close(full.grad.double(), full_ref.grad.double(), atol=grad_atol(base, g), rtol=0)
