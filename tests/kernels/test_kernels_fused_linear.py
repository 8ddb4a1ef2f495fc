"""fused_linear_token_logprobs equals lm-head matmul + token_logprobs, forward and both gradients."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_cases import IGNORE

from spin_mega.kernels import fused_linear, fused_linear_token_logprobs, reference_fused_linear_token_logprobs, token_logprobs

# float32: a logit is a product over H <= 48 terms (~1e-6 relative error, logits of order 10), then the
# kernel's 2e-5; d hidden and d weight sum at most 200 products of order 1: 1e-5 absolute plus 1e-5 relative.
FP32_ATOL = 5e-5
FP32_GRAD_ATOL = 1e-5
FP32_GRAD_RTOL = 1e-5
# bfloat16: the fused path multiplies per vocabulary chunk, the unfused one in a single matmul; each
# rounds its float32-accumulated logits to bfloat16 (8-bit significand), so a logit may differ by one
# ulp (2^-7 relative) between them, and the gradients are bfloat16 products of those. Compared relative
# to the largest magnitude in each tensor.
BF16_REL = 2.0**-5


@st.composite
def fused_cases(draw):
    n = draw(st.integers(1, 20))
    h = draw(st.integers(1, 48))
    total = draw(st.integers(1, 200))
    vocab = total - draw(st.integers(0, min(7, total - 1)))
    chunk = draw(st.sampled_from([None, 13, 32, 1000]))
    seed = draw(st.integers(0, 2**31 - 1))
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=gen)
    weight = torch.randn(total, h, generator=gen) / max(h, 1) ** 0.5 * 3
    labels = torch.randint(vocab, (n,), generator=gen)
    labels[torch.rand(n, generator=gen) < 0.25] = IGNORE
    labels[-1] = vocab - 1
    grad_out = torch.randn(n, generator=gen) * 2
    return hidden, weight, labels, grad_out, vocab, chunk


def _fused_and_unfused(hidden, weight, labels, grad_out, vocab, chunk):
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    out = fused_linear_token_logprobs(h, w, labels, IGNORE, vocab_size=vocab, chunk_size=chunk)
    out.backward(grad_out)
    h_ref, w_ref = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    expected = token_logprobs(h_ref @ w_ref.T, labels, IGNORE, vocab_size=vocab)
    expected.backward(grad_out)
    return (out, h.grad, w.grad), (expected.detach(), h_ref.grad, w_ref.grad)


@settings(max_examples=25, deadline=None, derandomize=True)
@given(case=fused_cases())
def test_fused_linear_matches_linear_plus_kernel_fp32(case, device: torch.device) -> None:
    hidden, weight, labels, grad_out, vocab, chunk = (t.to(device) if isinstance(t, torch.Tensor) else t for t in case)
    (out, gh, gw), (expected, gh_ref, gw_ref) = _fused_and_unfused(hidden, weight, labels, grad_out, vocab, chunk)
    assert out.dtype == torch.float32 and (out <= 0).all()
    torch.testing.assert_close(out, expected, atol=FP32_ATOL, rtol=0)
    oracle = reference_fused_linear_token_logprobs(hidden, weight, labels, IGNORE, vocab)
    torch.testing.assert_close(out.double(), oracle, atol=FP32_ATOL, rtol=0)
    torch.testing.assert_close(gh, gh_ref, atol=FP32_GRAD_ATOL, rtol=FP32_GRAD_RTOL)
    torch.testing.assert_close(gw, gw_ref, atol=FP32_GRAD_ATOL, rtol=FP32_GRAD_RTOL)
    assert (gw[vocab:] == 0).all()


def _close_relative(actual: torch.Tensor, expected: torch.Tensor, rel: float) -> None:
    scale = float(expected.abs().max()) or 1.0
    torch.testing.assert_close(actual.float(), expected.float(), atol=rel * scale, rtol=0)


@pytest.mark.parametrize("chunk", [None, 24])
def test_fused_linear_bf16(chunk: int | None, device: torch.device) -> None:
    gen = torch.Generator().manual_seed(11)
    hidden = torch.randn(17, 32, generator=gen).to(torch.bfloat16).to(device)
    weight = (torch.randn(130, 32, generator=gen) * 0.3).to(torch.bfloat16).to(device)
    labels = torch.randint(128, (17,), generator=gen).to(device)
    labels[3] = IGNORE
    grad_out = (torch.randn(17, generator=gen) * 2).to(device)
    (out, gh, gw), (expected, gh_ref, gw_ref) = _fused_and_unfused(hidden, weight, labels, grad_out, 128, chunk)
    assert gh.dtype == torch.bfloat16 and gw.dtype == torch.bfloat16
    _close_relative(out, expected, BF16_REL)
    _close_relative(gh, gh_ref, BF16_REL)
    _close_relative(gw, gw_ref, BF16_REL)


def test_fused_linear_gradient_for_one_input_only(device: torch.device) -> None:
    gen = torch.Generator().manual_seed(4)
    hidden = torch.randn(5, 8, generator=gen).to(device)
    weight = torch.randn(40, 8, generator=gen).to(device)
    labels = torch.randint(40, (5,), generator=gen).to(device)
    frozen_weight = hidden.clone().requires_grad_()
    fused_linear_token_logprobs(frozen_weight, weight, labels, chunk_size=16).sum().backward()
    frozen_hidden = weight.clone().requires_grad_()
    fused_linear_token_logprobs(hidden, frozen_hidden, labels, chunk_size=16).sum().backward()
    _, (_, gh_ref, gw_ref) = _fused_and_unfused(hidden, weight, labels, torch.ones(5, device=device), None, 16)
    torch.testing.assert_close(frozen_weight.grad, gh_ref, atol=FP32_GRAD_ATOL, rtol=FP32_GRAD_RTOL)
    torch.testing.assert_close(frozen_hidden.grad, gw_ref, atol=FP32_GRAD_ATOL, rtol=FP32_GRAD_RTOL)


def test_fused_linear_rejects_bad_input(device: torch.device) -> None:
    hidden = torch.randn(4, 8, device=device)
    weight = torch.randn(30, 8, device=device)
    labels = torch.tensor([0, 1, 29, 30], device=device)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 30\).*30"):
        fused_linear_token_logprobs(hidden, weight, labels)
    with pytest.raises(ValueError, match=r"labels must be in \[0, 25\)"):
        fused_linear_token_logprobs(hidden, weight, labels.clamp(max=29), vocab_size=25)
    with pytest.raises(ValueError, match="hidden"):
        fused_linear_token_logprobs(hidden, weight[:, :7], labels.clamp(max=29))


def test_fp32_accumulation_is_probed_and_falls_back_where_torch_lacks_it() -> None:
    """CPU torch has neither the float32-output addmm nor mm for 16-bit operands: the probe says so for each
    and the backward accumulates through widened operands. (On CUDA the same probe decides; the preflight
    reports its choice.)"""
    fused_linear.fp32_accumulation.cache_clear()
    chosen = fused_linear.fp32_accumulation(torch.device("cpu"), torch.bfloat16)
    assert chosen.name == fused_linear.FP32_ACCUMULATIONS[2][0]
    assert [name for name, _ in chosen.rejected] == [name for name, _ in fused_linear.FP32_ACCUMULATIONS[:2]]
    assert all(why.startswith("NotImplementedError") for _, why in chosen.rejected)


def test_fp32_accumulation_skips_forms_that_fail_or_round(monkeypatch) -> None:
    """A formulation that raises (as torch.addmm with a float32 `self` and bf16 operands does on the torch
    versions whose CUDA check wants one dtype) or that rounds the product to 16 bits is passed over."""

    def refuses(acc, a, b):
        raise RuntimeError("self and mat2 must have the same dtype, but got Float and BFloat16")

    def rounds(acc, a, b):
        acc.add_((a @ b).float())

    monkeypatch.setattr(fused_linear, "FP32_ACCUMULATIONS", (("refuses", refuses), ("rounds", rounds), ("exact", fused_linear._upcast_then_addmm)))
    fused_linear.fp32_accumulation.cache_clear()
    try:
        chosen = fused_linear.fp32_accumulation(torch.device("cpu"), torch.bfloat16)
        assert chosen.name == "exact"
        reasons = dict(chosen.rejected)
        assert reasons["refuses"].startswith("RuntimeError: self and mat2") and reasons["rounds"].startswith("off by")
        # The backward uses the choice: d hidden of a multi-chunk bf16 call is the float64 reference's.
        gen = torch.Generator().manual_seed(5)
        hidden = torch.randn(6, 32, generator=gen).bfloat16().requires_grad_()
        weight = (torch.randn(70, 32, generator=gen) / 4).bfloat16()
        labels = torch.randint(70, (6,), generator=gen)
        fused_linear_token_logprobs(hidden, weight, labels, chunk_size=16).sum().backward()
        h64 = hidden.detach().double().requires_grad_()
        torch.log_softmax(h64 @ weight.double().T, -1).gather(-1, labels[:, None]).sum().backward()
        torch.testing.assert_close(hidden.grad.double(), h64.grad, rtol=0, atol=2.0**-7 * h64.grad.abs().max().item())
    finally:
        fused_linear.fp32_accumulation.cache_clear()
