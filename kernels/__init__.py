"""Per-token log-prob kernels for SPIN: log p(label) per token and per sequence, plain, vocab-parallel
and fused with the lm-head matmul. Triton on CUDA (or on CPU under `TRITON_INTERPRET=1`, set before the
first import), a chunked PyTorch float32 fallback elsewhere; `backend_for(tensor)` tells which runs."""

from spin_mega.kernels._backend import backend_for, interpreter_enabled, triton_available
from spin_mega.kernels.fused_linear import fused_linear_token_logprobs
from spin_mega.kernels.logprobs import segment_logprobs, sequence_logprobs, token_logprobs
from spin_mega.kernels.reference import (
    reference_fused_linear_token_logprobs,
    reference_sequence_logprobs,
    reference_token_logprobs,
)
from spin_mega.kernels.vocab_parallel import vocab_parallel_token_logprobs

__all__ = [
    "backend_for",
    "fused_linear_token_logprobs",
    "interpreter_enabled",
    "reference_fused_linear_token_logprobs",
    "reference_sequence_logprobs",
    "reference_token_logprobs",
    "segment_logprobs",
    "sequence_logprobs",
    "token_logprobs",
    "triton_available",
    "vocab_parallel_token_logprobs",
]
