"""Per-sequence response log-prob sums from the last pipeline stage's hidden states.

Three interchangeable implementations, chosen by `train.logprobs` (`auto` is fused_linear):
- fused_linear: the kernel fusing the output projection with the log-softmax; full logits never exist.
- triton: the output layer's vocab-parallel logits, then the vocab-parallel log-prob kernel.
- reference: logits gathered over TP and the float64 reference (slow; for checking the others).
The kernels run as Triton on GPU and as their chunked PyTorch fallback on CPU (spin_mega.kernels). All
exclude Megatron's vocab padding from the softmax, so log-probs match HF transformers and vLLM.
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state, tensor_parallel

IGNORE_INDEX = -100


def resolve_impl(name: str) -> str:
    return "fused_linear" if name == "auto" else name


def _reference_token_logprobs(logits: torch.Tensor, labels: torch.Tensor, vocab_size: int) -> torch.Tensor:
    from spin_mega.kernels import reference_token_logprobs

    full = tensor_parallel.gather_from_tensor_model_parallel_region(logits)
    return reference_token_logprobs(full, labels, ignore_index=IGNORE_INDEX, vocab_size=vocab_size).float()


def sequence_logprobs(model, hidden: torch.Tensor, labels: torch.Tensor, vocab_size: int, impl: str) -> torch.Tensor:
    """hidden [s, b, h] (sequence-parallel shards allowed), labels [b, s] -> float32 [b] sums over
    response tokens (labels != -100)."""
    labels_sb = labels.t().contiguous()
    impl = resolve_impl(impl)
    if impl == "fused_linear":
        from spin_mega.kernels import fused_linear_token_logprobs

        if model.config.sequence_parallel:
            # The kernel all-reduces the hidden-state gradient itself, so the gather's backward only splits.
            hidden = tensor_parallel.gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=False)
        s, b, h = hidden.shape
        token_logps = fused_linear_token_logprobs(
            hidden.reshape(s * b, h),
            model.output_weight(),
            labels_sb.reshape(s * b),
            ignore_index=IGNORE_INDEX,
            group=parallel_state.get_tensor_model_parallel_group()
            if parallel_state.get_tensor_model_parallel_world_size() > 1
            else None,
            vocab_size=vocab_size,
        ).reshape(s, b)
    else:
        logits = model.vocab_parallel_logits(hidden)  # [s, b, V_padded / TP]
        if impl == "triton":
            from spin_mega.kernels import token_logprobs, vocab_parallel_token_logprobs

            if parallel_state.get_tensor_model_parallel_world_size() > 1:
                token_logps = vocab_parallel_token_logprobs(
                    logits,
                    labels_sb,
                    parallel_state.get_tensor_model_parallel_group(),
                    vocab_size=vocab_size,
                    ignore_index=IGNORE_INDEX,
                )
            else:
                token_logps = token_logprobs(logits, labels_sb, ignore_index=IGNORE_INDEX, vocab_size=vocab_size)
        elif impl == "reference":
            token_logps = _reference_token_logprobs(logits, labels_sb, vocab_size)
        else:
            raise ValueError(f"unknown log-prob implementation {impl!r}")
    return token_logps.float().sum(dim=0)
