"""Causal attention over a packed (THD) token stream: every sequence attends to itself only.

A packed micro-batch is one flat stream of tokens [t, heads, head_dim] holding many sequences back to back;
`cu_seqlens` ([0, len_0, len_0 + len_1, ..., t]) marks where each starts. Attention must never cross a
boundary. Which kernel does that is chosen here, in `choose_backend`, and nowhere else (`spin-mega env`
prints the same choice):

  transformer_engine  TE's fused attention takes megatron's PackedSeqParams itself (TE's layer spec);
  flash_attn_varlen   flash-attn's varlen kernel (CUDA, 16-bit), when flash-attn is installed;
  torch_varlen        torch.nn.attention.varlen.varlen_attn (torch >= 2.10, CUDA, 16-bit): flash kernels
                      built into torch, for images with neither TE nor flash-attn;
  flex_document_mask  FlexAttention with a document mask (CUDA, compiled), e.g. fp32 on a GPU;
  sdpa_per_segment    PyTorch SDPA over each sequence's slice (CPU, and the reference of the others).

Rotary positions restart at every sequence: megatron's RoPE splits the stream at `cu_seqlens` (TE's fused
rope, or megatron's own per-sequence split without TE). Without TE the boundaries travel as a host
tensor, so megatron's split (a `.tolist()` per layer) costs no device synchronisation; the varlen kernels
get the device copy made once per micro-batch.
"""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass, field
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core.packed_seq_params import PackedSeqParams

try:
    from flash_attn import flash_attn_varlen_func
except ImportError:
    flash_attn_varlen_func = None

BACKENDS = ("transformer_engine", "flash_attn_varlen", "torch_varlen", "flex_document_mask", "sdpa_per_segment")


def _torch_varlen():
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def choose_backend(cuda: bool, dtype: torch.dtype, transformer_engine: bool) -> tuple[str, str]:
    """(backend, why) for packed attention on this machine: the one place the choice is made."""
    if transformer_engine:
        return "transformer_engine", "Transformer Engine's attention takes packed sequences (THD) itself"
    if not cuda:
        return "sdpa_per_segment", "no CUDA: torch SDPA over each sequence of the packed row"
    sixteen_bit = dtype in (torch.float16, torch.bfloat16)
    if flash_attn_varlen_func is not None and sixteen_bit:
        return "flash_attn_varlen", "flash-attn installed, 16-bit on CUDA"
    if _torch_varlen() is not None and sixteen_bit:
        return "torch_varlen", "neither Transformer Engine nor flash-attn; torch's varlen_attn (flash kernels in torch), 16-bit on CUDA"
    return "flex_document_mask", "no varlen kernel for this dtype or torch: compiled FlexAttention with a document mask"


@dataclass
class SpinPackedSeqParams(PackedSeqParams):
    """megatron's PackedSeqParams plus what the kernels here need: the boundaries on the host (the
    per-segment path and megatron's RoPE split read them without a device sync), their device copy (the
    varlen kernels), and a per-micro-batch cache shared by all layers (FlexAttention's block mask)."""

    boundaries: tuple[int, ...] = ()
    cu_seqlens_device: Optional[torch.Tensor] = None
    cache: dict = field(default_factory=dict)


def packed_seq_params(cu_seqlens: list[int], device: torch.device, backend: str) -> SpinPackedSeqParams:
    """The parameters of one packed micro-batch whose sequences (the padding tail included, as a sequence
    of its own) start at `cu_seqlens[:-1]` of a stream of `cu_seqlens[-1]` tokens."""
    host = torch.tensor(cu_seqlens, dtype=torch.int32)
    on_device = host.to(device, non_blocking=True) if device.type != "cpu" else host
    longest = max(b - a for a, b in zip(cu_seqlens[:-1], cu_seqlens[1:]))
    # TE reads the standard fields on the device; megatron's own RoPE split reads them as a list.
    standard = on_device if backend == "transformer_engine" else host
    return SpinPackedSeqParams(
        qkv_format="thd", cu_seqlens_q=standard, cu_seqlens_kv=standard, max_seqlen_q=longest, max_seqlen_kv=longest,
        boundaries=tuple(cu_seqlens), cu_seqlens_device=on_device,
    )


def packed_attention(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, params: SpinPackedSeqParams, scale: float, backend: str
) -> torch.Tensor:
    """query [t, heads, d], key/value [t, groups, d] (GQA: heads a multiple of groups) -> [t, heads, d]."""
    if backend == "sdpa_per_segment":
        return _per_segment(query, key, value, params.boundaries, scale)
    if backend == "flash_attn_varlen":
        cu = params.cu_seqlens_device
        return flash_attn_varlen_func(
            query, key, value, cu, cu, params.max_seqlen_q, params.max_seqlen_kv, softmax_scale=scale, causal=True
        )
    if backend == "torch_varlen":
        return _torch_varlen_call(query, key, value, params, scale)
    if backend == "flex_document_mask":
        return _flex(query, key, value, params, scale)
    raise ValueError(f"packed attention backend {backend!r} is not one of {', '.join(BACKENDS[1:])}")


def _per_segment(query, key, value, boundaries: tuple[int, ...], scale: float) -> torch.Tensor:
    gqa = key.shape[1] != query.shape[1]
    outs = []
    for start, stop in zip(boundaries[:-1], boundaries[1:]):
        # [1, heads, s, d]: SDPA's fused CPU kernel takes 4-D inputs only (3-D falls back to the math path).
        q, k, v = (x[start:stop].transpose(0, 1).unsqueeze(0) for x in (query, key, value))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
        outs.append(out.squeeze(0).transpose(0, 1))
    return torch.cat(outs, dim=0)


@functools.lru_cache(maxsize=1)
def _varlen_parameters() -> frozenset:
    return frozenset(inspect.signature(_torch_varlen()).parameters)


def _torch_varlen_call(query, key, value, params: SpinPackedSeqParams, scale: float) -> torch.Tensor:
    """varlen_attn's signature changed across torch versions: 2.10 takes `is_causal=` and neither a scale
    nor GQA; later ones keyword-only `scale=` and causality as `window_size=(-1, 0)`; 2.12 adds
    `enable_gqa=`. Read it once and call what this torch offers."""
    names = _varlen_parameters()
    kwargs = {}
    if "window_size" in names:
        kwargs["window_size"] = (-1, 0)  # 2.11 compares with this exact tuple to select the causal kernel
    else:
        kwargs["is_causal"] = True
    if "scale" in names:
        kwargs["scale"] = scale
    else:
        query = query * (scale * query.shape[-1] ** 0.5)  # the kernel applies 1/sqrt(d) itself
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        if "enable_gqa" in names:
            kwargs["enable_gqa"] = True
        else:
            key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    cu = params.cu_seqlens_device
    return _torch_varlen()(query, key, value, cu, cu, params.max_seqlen_q, params.max_seqlen_kv, **kwargs)


@functools.lru_cache(maxsize=1)
def _compiled_flex():
    from torch.nn.attention.flex_attention import flex_attention

    # Uncompiled, flex_attention materialises the score matrix; compiled it is a fused kernel.
    return torch.compile(flex_attention, dynamic=True) if torch.cuda.is_available() else flex_attention


def _flex(query, key, value, params: SpinPackedSeqParams, scale: float) -> torch.Tensor:
    from torch.nn.attention.flex_attention import create_block_mask

    t = query.shape[0]
    mask = params.cache.get("flex_block_mask")
    if mask is None:
        lengths = torch.diff(params.cu_seqlens_device.long())
        document = torch.repeat_interleave(
            torch.arange(lengths.numel(), device=query.device), lengths.to(query.device), output_size=t
        )

        def same_document_causal(b, h, q_idx, kv_idx):
            return (document[q_idx] == document[kv_idx]) & (q_idx >= kv_idx)

        mask = create_block_mask(same_document_causal, None, None, t, t, device=query.device)
        params.cache["flex_block_mask"] = mask  # one per micro-batch, shared by every layer
    out = _compiled_flex()(
        query.transpose(0, 1).unsqueeze(0), key.transpose(0, 1).unsqueeze(0), value.transpose(0, 1).unsqueeze(0),
        block_mask=mask, scale=scale, enable_gqa=key.shape[1] != query.shape[1],
    )
    return out.squeeze(0).transpose(0, 1)
