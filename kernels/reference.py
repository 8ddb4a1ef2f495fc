"""float64 PyTorch oracles: log_softmax + gather, nothing shared with the kernels."""

from __future__ import annotations

import torch


def reference_token_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    vocab_size: int | None = None,
) -> torch.Tensor:
    """float64 log_softmax(logits[..., :vocab_size])[label], 0 where label == ignore_index.

    Differentiable w.r.t. `logits` (padding columns get zero gradient through the slice). Materialises
    the float64 logits: for tests and small checks only.
    """
    x = logits.double()
    if vocab_size is not None:
        x = x[..., :vocab_size]
    ignored = labels == ignore_index
    if bool(((labels < 0) | (labels >= x.shape[-1]))[~ignored].any()):
        raise ValueError(f"labels must be in [0, {x.shape[-1]}) or equal ignore_index={ignore_index}")
    safe = torch.where(ignored, 0, labels).long()
    picked = torch.log_softmax(x, dim=-1).gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    return torch.where(ignored, torch.zeros_like(picked), picked)


def reference_sequence_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    vocab_size: int | None = None,
) -> torch.Tensor:
    """float64 [B] sums over T of `reference_token_logprobs` for logits [B, T, V]."""
    return reference_token_logprobs(logits, labels, ignore_index, vocab_size).sum(dim=-1)


def reference_fused_linear_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    vocab_size: int | None = None,
) -> torch.Tensor:
    """float64 log-probs under softmax(hidden @ weight.T), the product taken in float64."""
    return reference_token_logprobs(hidden.double() @ weight.double().T, labels, ignore_index, vocab_size)
