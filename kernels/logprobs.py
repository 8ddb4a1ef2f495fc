"""Per-token log-probs of labels and their per-sequence sums: autograd Function and functional API.

Where Triton cannot run (a CPU tensor without `TRITON_INTERPRET=1`), the same functions use a chunked
plain-PyTorch float32 implementation with identical semantics; `backend_for(tensor)` says which.
"""

from __future__ import annotations

import torch

from spin_mega.kernels import _ops
from spin_mega.kernels._checks import check_labels, check_logits, resolve_vocab_size


class TokenLogprobsFunction(torch.autograd.Function):
    """log_softmax(logits[..., :vocab_size])[label] with the gradient rebuilt from the saved log-sum-exp."""

    @staticmethod
    def forward(
        ctx,
        logits: torch.Tensor,
        labels: torch.Tensor,
        ignore_index: int,
        vocab_size: int,
        inplace_backward: bool,
    ) -> torch.Tensor:
        rows = _ops.rows_view(logits)
        flat_labels = labels.reshape(-1)
        lse, logprobs = _ops.forward_stats(
            rows, flat_labels, ignore_index=ignore_index, n_valid=vocab_size, write_logprob=True
        )
        ctx.save_for_backward(rows, flat_labels, lse)
        ctx.ignore_index = ignore_index
        ctx.vocab_size = vocab_size
        ctx.inplace_backward = inplace_backward
        ctx.logits_shape = logits.shape
        return logprobs.view(labels.shape)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        rows, flat_labels, lse = ctx.saved_tensors
        grad = _ops.backward_grad(
            rows,
            flat_labels,
            lse,
            grad_out.reshape(-1),
            ignore_index=ctx.ignore_index,
            n_valid=ctx.vocab_size,
            out=rows if ctx.inplace_backward else None,
        )
        return grad.view(ctx.logits_shape), None, None, None, None


def token_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    *,
    vocab_size: int | None = None,
    inplace_backward: bool = False,
    range_check: bool = True,
) -> torch.Tensor:
    """float32 log-probability of each label under softmax(logits), 0 where `label == ignore_index`.

    Args:
        logits: [..., V] bfloat16, float16 or float32. Read once, in one streaming pass per row with an
            online log-sum-exp accumulated in float32; never upcast as a whole.
        labels: [...] integer token ids in [0, vocab_size), or `ignore_index`.
        vocab_size: number of valid columns; columns `>= vocab_size` are Megatron's vocabulary padding
            and are excluded from the softmax (their gradient is 0). Defaults to V.
        inplace_backward: write grad_logits into the logits buffer instead of a new [..., V] tensor,
            saving one logits-sized allocation. Safe only when nothing else needs the logits values
            after this call: e.g. logits fresh from the lm-head matmul (whose backward needs its inputs,
            not its output) and used by no other loss, metric or hook. Unsafe when the logits are a leaf
            whose values you read after backward, are saved by another autograd node (a second loss or
            an entropy term on the same logits), or are reused after `backward()`: they are overwritten
            by the gradient. If the logits are not a dense [N, V] view, a contiguous copy is made and the
            gradient goes there instead (still correct, nothing saved).
        range_check: verify every label lies in [0, vocab_size) (one device-to-host sync per call).
            Pass False only when the labels were checked already, e.g. once per batch on the host: an
            out-of-range label then reads an arbitrary logit instead of raising.

    Returns:
        float32 tensor shaped like `labels`; every value is <= 0. Differentiable w.r.t. `logits`; the
        gradient g * (onehot(label) - softmax) is produced in the logits dtype.

    Raises:
        ValueError: for a label outside [0, vocab_size) other than `ignore_index`, or mismatched shapes.

    Backend: the Triton kernels for CUDA tensors (and for CPU tensors when `TRITON_INTERPRET=1` was set
    before the first import); otherwise a row-chunked plain-PyTorch float32 implementation with the same
    semantics, so the trainer calls this everywhere. `spin_mega.kernels.backend_for(logits)` says which.

    A -inf logit is fine (probability 0, no NaN) as long as a row has some finite valid logit; a +inf
    logit, or a non-ignored row whose valid logits are all -inf, has no finite log-probability.
    """
    check_logits(logits)
    if labels.device != logits.device:
        raise ValueError(f"labels are on {labels.device} but logits on {logits.device}")
    vocab_size = resolve_vocab_size(vocab_size, logits.shape[-1])
    labels = check_labels(labels, logits.shape[:-1], vocab_size, ignore_index, range_check)
    return TokenLogprobsFunction.apply(logits, labels, int(ignore_index), vocab_size, bool(inplace_backward))


def sequence_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    *,
    vocab_size: int | None = None,
) -> torch.Tensor:
    """float32 [B]: for each sequence, the sum over its non-ignored tokens of log p(label).

    logits [B, T, V], labels [B, T] (already shifted so that labels[b, t] is predicted by logits[b, t];
    prompt and padding positions set to `ignore_index`). The sum over T is a [B, T] reduction after the
    per-token kernel: negligible next to the B*T*V pass, and deterministic. Differentiable.
    """
    if logits.dim() != 3 or labels.dim() != 2:
        raise ValueError(
            f"sequence_logprobs expects logits [B, T, V] and labels [B, T], got {tuple(logits.shape)} and {tuple(labels.shape)}"
        )
    return token_logprobs(logits, labels, ignore_index, vocab_size=vocab_size).sum(dim=-1)


def segment_logprobs(
    logits: torch.Tensor,
    labels: torch.Tensor,
    segment_ids: torch.Tensor,
    num_segments: int,
    ignore_index: int = -100,
    *,
    vocab_size: int | None = None,
) -> torch.Tensor:
    """float32 [num_segments]: log-prob sums per segment, for packed rows holding several sequences.

    logits [..., V], labels [...], segment_ids [...] int with values in [0, num_segments) or negative
    (token belongs to no segment). Sums use `index_add`, whose CUDA implementation accumulates with
    atomics: the result is exact to float32 rounding but its bit pattern may vary between runs.
    """
    if segment_ids.shape != labels.shape:
        raise ValueError(f"segment_ids shape {tuple(segment_ids.shape)} must equal labels shape {tuple(labels.shape)}")
    if segment_ids.dtype.is_floating_point or segment_ids.dtype == torch.bool:
        raise ValueError(f"segment_ids must be an integer tensor, got {segment_ids.dtype}")
    num_segments = int(num_segments)
    seg = segment_ids.reshape(-1).long()
    if num_segments < 0 or (seg.numel() > 0 and int(seg.max()) >= num_segments):
        raise ValueError(f"segment_ids must be < num_segments={num_segments}")
    per_token = token_logprobs(logits, labels, ignore_index, vocab_size=vocab_size).reshape(-1)
    keep = seg >= 0
    sums = torch.zeros(num_segments, dtype=torch.float32, device=per_token.device)
    return sums.index_add(0, seg[keep], per_token[keep])
