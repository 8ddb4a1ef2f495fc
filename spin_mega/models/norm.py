"""RMSNorm for Megatron's local (non-Transformer-Engine) layers that works under sequence parallelism.

Megatron's local spec wraps torch's norm in `WrappedTorchNorm`, which refuses `config.sequence_parallel`. The
norm itself is per token, so sharding the sequence over TP ranks changes nothing in its forward; what changes
is its weight gradient: each TP rank sees only its slice of the tokens, so the weight's gradient is a partial
sum. megatron-core's `finalize_model_grads` all-reduces over the TP group exactly the parameters that carry a
true `sequence_parallel` attribute (Transformer Engine's and apex's norms set it the same way), so marking
the weight is all sequence parallelism needs. Without sequence parallelism the attribute is False and the
module is plain `torch.nn.RMSNorm` (same parameter names, so checkpoints are interchangeable).
"""

from __future__ import annotations

import torch
from megatron.core.transformer.transformer_config import TransformerConfig


class RMSNorm(torch.nn.RMSNorm):
    def __init__(
        self,
        config: TransformerConfig,
        hidden_size: int,
        eps: float = 1e-5,
        persist_layer_norm: bool = False,
        zero_centered_gamma: bool = False,
        normalization: str = "RMSNorm",
    ):
        if normalization != "RMSNorm" or config.layernorm_zero_centered_gamma:
            raise ValueError("spin_mega.models.norm.RMSNorm implements plain RMSNorm only")
        super().__init__(normalized_shape=hidden_size, eps=eps, dtype=config.params_dtype)
        self.weight.sequence_parallel = config.sequence_parallel
