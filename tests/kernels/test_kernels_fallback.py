"""The PyTorch fallback (CPU without TRITON_INTERPRET) has the kernels' semantics."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from kernel_cases import IGNORE, Case, cases, fwd_atol, grad_atol

from spin_mega.kernels import reference_token_logprobs, torch_impl


@settings(max_examples=40, deadline=None, derandomize=True)
@given(case=cases(), offset=st.integers(0, 20), inplace=st.booleans())
def test_torch_primitives_match_reference(case: Case, offset: int, inplace: bool) -> None:
    logits = case.logits.reshape(-1, case.logits.shape[-1])
    labels = case.labels.reshape(-1)
    g = case.grad_out.reshape(-1)
    active = labels != IGNORE
    global_labels = torch.where(active, labels + offset, IGNORE)
    n_valid = case.vocab_size

    lse, label_logit = torch_impl.forward_stats(
        logits, global_labels, ignore_index=IGNORE, n_valid=n_valid, label_offset=offset, write_logprob=False
    )
    _, logprobs = torch_impl.forward_stats(logits, labels, ignore_index=IGNORE, n_valid=n_valid, write_logprob=True)
    valid = logits[:, :n_valid].double()
    ref_lse = torch.where(active, torch.logsumexp(valid, dim=1), float("-inf"))
    ref_label = torch.where(active, valid.gather(1, labels.clamp(min=0)[:, None]).squeeze(1), 0.0)
    ref_logprobs = reference_token_logprobs(logits, labels, IGNORE, n_valid)
    atol = fwd_atol(valid)
    torch.testing.assert_close(lse.double(), ref_lse, atol=atol, rtol=0)
    torch.testing.assert_close(label_logit.double(), ref_label, atol=0, rtol=0)
    torch.testing.assert_close(logprobs.double(), ref_logprobs, atol=atol, rtol=0)
    assert (logprobs <= 0).all()

    buffer = logits.clone()
    grad = torch_impl.backward_grad(
        buffer, global_labels, lse, g, ignore_index=IGNORE, n_valid=n_valid, label_offset=offset,
        out=buffer if inplace else None,
    )
    ref_logits = logits.double().requires_grad_()
    reference_token_logprobs(ref_logits, labels, IGNORE, n_valid).backward(g.double())
    torch.testing.assert_close(grad.double(), ref_logits.grad, atol=grad_atol(valid.to(logits.dtype), g), rtol=0)


_PUBLIC_API_ON_FALLBACK = textwrap.dedent(
    """
    import torch
    from spin_mega.kernels import (backend_for, fused_linear_token_logprobs, reference_token_logprobs,
                                   sequence_logprobs, token_logprobs)
    assert backend_for(torch.zeros(1)) == "torch", backend_for(torch.zeros(1))
    gen = torch.Generator().manual_seed(0)
    logits = (torch.randn(3, 5, 70, generator=gen) * 3).requires_grad_()
    labels = torch.randint(66, (3, 5), generator=gen)
    labels[0, 0] = -100
    g = torch.randn(3, 5, generator=gen)
    out = token_logprobs(logits, labels, vocab_size=66)
    ref_logits = logits.detach().double().requires_grad_()
    ref = reference_token_logprobs(ref_logits, labels, vocab_size=66)
    torch.testing.assert_close(out.double(), ref.detach(), atol=1e-5, rtol=0)
    out.backward(g)
    ref.backward(g.double())
    torch.testing.assert_close(logits.grad.double(), ref_logits.grad, atol=1e-5, rtol=0)
    source = logits.detach().clone().requires_grad_()
    produced = source * 1.0
    token_logprobs(produced, labels, vocab_size=66, inplace_backward=True).backward(g)
    assert torch.equal(source.grad, logits.grad) and torch.equal(produced.detach(), logits.grad)
    torch.testing.assert_close(sequence_logprobs(logits, labels, vocab_size=66).double(), ref.detach().sum(-1), atol=1e-4, rtol=0)
    hidden, weight = torch.randn(4, 8, generator=gen), torch.randn(20, 8, generator=gen)
    torch.testing.assert_close(
        fused_linear_token_logprobs(hidden, weight, labels[0, :4].clamp(0, 19), chunk_size=7),
        token_logprobs(hidden @ weight.T, labels[0, :4].clamp(0, 19)), atol=1e-5, rtol=0)
    try:
        token_logprobs(logits, labels, vocab_size=10)
    except ValueError as err:
        assert "out-of-range" in str(err)
    else:
        raise AssertionError("no ValueError")
    print("fallback ok")
    """
)


def test_public_api_falls_back_to_pytorch_without_triton_interpreter() -> None:
    """A fresh interpreter without TRITON_INTERPRET: CPU tensors take the PyTorch path, same results."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""  # on a GPU machine too, CPU tensors have no Triton path
    result = subprocess.run(
        [sys.executable, "-c", _PUBLIC_API_ON_FALLBACK], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert "fallback ok" in result.stdout
