"""Fused core attention for when Transformer Engine is absent: flash-attn when installed (GPU, 16-bit),
else PyTorch's scaled_dot_product_attention; packed (THD) micro-batches go to models/packed_attention.py.

Megatron's local `DotProductAttention` materialises the [b, heads, s, s] score matrix; both paths here
avoid that (SDPA dispatches to flash / memory-efficient kernels on GPU and a blocked kernel on CPU). The
module keeps Megatron's core-attention interface so it drops into the local layer spec.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.module import MegatronModule
from megatron.core.transformer.transformer_config import TransformerConfig
from megatron.core.utils import divide

from spin_mega.models.packed_attention import choose_backend, packed_attention

try:
    from flash_attn import flash_attn_func
except ImportError:
    flash_attn_func = None


class SDPAttention(MegatronModule):
    """Causal self-attention over [s, b, heads, head_dim] tensors; GQA without repeating K/V in memory."""

    def __init__(
        self,
        config: TransformerConfig,
        layer_number: int,
        attn_mask_type: AttnMaskType,
        attention_type: str,
        attention_dropout: Optional[float] = None,
        softmax_scale: Optional[float] = None,
        cp_comm_type: Optional[str] = None,
        pg_collection=None,
    ):
        super().__init__(config=config)
        if config.context_parallel_size != 1:
            raise ValueError("context parallelism needs Transformer Engine attention")
        if attn_mask_type not in (AttnMaskType.causal, AttnMaskType.padding_causal):
            raise ValueError(f"SDPAttention supports causal masks only, not {attn_mask_type}")
        self.dropout_p = config.attention_dropout if attention_dropout is None else attention_dropout
        head_dim = config.kv_channels
        self.softmax_scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(head_dim)
        self.projection_per_partition = divide(head_dim * config.num_attention_heads, config.tensor_model_parallel_size)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        attention_mask: Optional[torch.Tensor],
        attn_mask_type: Optional[AttnMaskType] = None,
        attention_bias: Optional[torch.Tensor] = None,
        packed_seq_params=None,
    ) -> torch.Tensor:
        if attention_bias is not None:
            raise ValueError("SDPAttention does not support attention bias")
        if packed_seq_params is not None:
            # megatron squeezed the THD stream to [t, heads, d]; each packed sequence attends to itself only.
            backend, _ = choose_backend(query.is_cuda, query.dtype, transformer_engine=False)
            out = packed_attention(query, key, value, packed_seq_params, self.softmax_scale, backend)
            return out.reshape(query.shape[0], self.projection_per_partition)
        # Right padding only: under a causal mask no real token attends to a later pad, so no explicit
        # padding mask is needed and SDPA keeps its fast causal path.
        sq, b = query.shape[0], query.shape[1]
        dropout = self.dropout_p if self.training else 0.0
        if flash_attn_func is not None and query.is_cuda and query.dtype in (torch.float16, torch.bfloat16):
            out = flash_attn_func(
                query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1),  # [b, s, heads, d]
                dropout_p=dropout, softmax_scale=self.softmax_scale, causal=True,
            )
            return out.transpose(0, 1).reshape(sq, b, self.projection_per_partition)
        q = query.permute(1, 2, 0, 3)  # [b, heads, s, d]
        k = key.permute(1, 2, 0, 3)
        v = value.permute(1, 2, 0, 3)
        out = F.scaled_dot_product_attention(
            q,
            k,
            v,
            dropout_p=dropout,
            is_causal=True,
            scale=self.softmax_scale,
            enable_gqa=k.shape[1] != q.shape[1],
        )
        return out.permute(2, 0, 1, 3).reshape(sq, b, self.projection_per_partition)
