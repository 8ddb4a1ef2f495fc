"""Packed (THD) attention: every backend keeps each sequence to itself, against a float64 reference with a
block-diagonal causal mask; the backend choice; torch's varlen_attn called as its signature asks."""

from __future__ import annotations

import inspect
from unittest import mock

import pytest
import torch

from spin_mega.models import packed_attention as pa

LENGTHS = [5, 1, 9, 3]  # a one-token sequence and a tail-like short one included
HEADS, GROUPS, DIM = 4, 2, 16


def _inputs(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    t = sum(LENGTHS)
    q = torch.randn(t, HEADS, DIM, generator=g, dtype=torch.float64)
    k = torch.randn(t, GROUPS, DIM, generator=g, dtype=torch.float64)
    v = torch.randn(t, GROUPS, DIM, generator=g, dtype=torch.float64)
    cu = [0]
    for n in LENGTHS:
        cu.append(cu[-1] + n)
    return q, k, v, cu


def _block_diagonal_reference(q, k, v, cu, scale):
    """float64 softmax attention over the whole stream with a mask that allows (i, j) only when j <= i
    and both lie in the same sequence."""
    t = q.shape[0]
    document = torch.repeat_interleave(torch.arange(len(cu) - 1), torch.tensor([b - a for a, b in zip(cu[:-1], cu[1:])]))
    allowed = (document[:, None] == document[None, :]) & (torch.arange(t)[None, :] <= torch.arange(t)[:, None])
    kk = k.repeat_interleave(HEADS // GROUPS, dim=1)
    vv = v.repeat_interleave(HEADS // GROUPS, dim=1)
    scores = torch.einsum("qhd,khd->hqk", q, kk) * scale
    probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
    return torch.einsum("hqk,khd->qhd", probs, vv)


@pytest.mark.parametrize("backend", ["sdpa_per_segment", "flex_document_mask"])
def test_backends_keep_each_sequence_to_itself(backend):
    q, k, v, cu = _inputs()
    scale = 0.3
    expected = _block_diagonal_reference(q, k, v, cu, scale)
    params = pa.packed_seq_params(cu, torch.device("cpu"), backend)
    out = pa.packed_attention(q.float(), k.float(), v.float(), params, scale, backend)
    torch.testing.assert_close(out.double(), expected, atol=2e-6, rtol=1e-5)
    # A leak would show here: the same stream attended without boundaries is far from it.
    one_sequence = pa.packed_seq_params([0, cu[-1]], torch.device("cpu"), backend)
    leaked = pa.packed_attention(q.float(), k.float(), v.float(), one_sequence, scale, backend)
    assert (leaked.double() - expected).abs().max() > 0.1


def _varlen_reference(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, causal, scale, gqa):
    """What the varlen kernel computes: causal attention within each [cu[i], cu[i+1]) slice."""
    assert torch.equal(cu_seq_q, cu_seq_k) and cu_seq_q.dtype == torch.int32 and causal
    cu = cu_seq_q.tolist()
    assert max_q == max_k == max(b - a for a, b in zip(cu[:-1], cu[1:]))
    if key.shape[1] != query.shape[1]:
        assert gqa, "K/V with fewer heads than Q without enable_gqa"
        key, value = (x.repeat_interleave(query.shape[1] // x.shape[1], dim=1) for x in (key, value))
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    q, k, v = query.double(), key.double(), value.double()
    outs = []
    for a, b in zip(cu[:-1], cu[1:]):
        s = torch.einsum("qhd,khd->hqk", q[a:b], k[a:b]) * scale
        s = s.masked_fill(torch.triu(torch.ones(b - a, b - a, dtype=torch.bool), 1), float("-inf"))
        outs.append(torch.einsum("hqk,khd->qhd", torch.softmax(s, -1), v[a:b]))
    return torch.cat(outs).to(query.dtype)


# The signature between torch 2.10 (`is_causal=`) and 2.12 (`enable_gqa=` added), transcribed from
# pytorch/pytorch's torch/nn/attention/varlen.py at commit 255ac567: keyword-only scale and window_size,
# causality as window_size == (-1, 0), no enable_gqa. The GPU image's torch 2.11 has this form or 2.12's.
def _varlen_attn_2_11(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, *, return_aux=None, scale=None, window_size=(-1, -1)):
    raise NotImplementedError


@pytest.mark.parametrize("flavour", ["installed", "2.11"])
def test_torch_varlen_is_called_as_its_signature_asks(flavour, monkeypatch):
    """varlen_attn runs on CUDA only; a double with the real function's signature (autospec: a wrong
    keyword fails) computes what the kernel computes, so the adaptation to each signature is checked."""
    from torch.nn.attention.varlen import varlen_attn

    spec = varlen_attn if flavour == "installed" else _varlen_attn_2_11
    names = set(inspect.signature(spec).parameters)

    def fake(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, **kwargs):
        causal = kwargs.get("window_size") == (-1, 0) if "window_size" in names else kwargs.get("is_causal", False)
        return _varlen_reference(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, causal=causal,
                                 scale=kwargs.get("scale"), gqa=kwargs.get("enable_gqa", False))

    double = mock.create_autospec(spec, side_effect=fake)
    monkeypatch.setattr(pa, "_torch_varlen", lambda: double)
    pa._varlen_parameters.cache_clear()
    try:
        q, k, v, cu = _inputs()
        params = pa.packed_seq_params(cu, torch.device("cpu"), "torch_varlen")
        out = pa.packed_attention(q.float(), k.float(), v.float(), params, 0.3, "torch_varlen")
    finally:
        pa._varlen_parameters.cache_clear()
    torch.testing.assert_close(out.double(), _block_diagonal_reference(q, k, v, cu, 0.3), atol=2e-6, rtol=1e-5)
    kwargs = double.call_args.kwargs
    assert kwargs["window_size"] == (-1, 0) and kwargs["scale"] == 0.3
    assert kwargs.get("enable_gqa") is (True if "enable_gqa" in names else None)


@pytest.mark.parametrize(
    "cuda, dtype, te, flash, varlen, expected",
    [
        (False, torch.float32, False, False, True, "sdpa_per_segment"),
        (False, torch.bfloat16, False, True, True, "sdpa_per_segment"),
        (True, torch.bfloat16, True, True, True, "transformer_engine"),
        (True, torch.bfloat16, False, True, True, "flash_attn_varlen"),
        (True, torch.bfloat16, False, False, True, "torch_varlen"),  # the lent GPU image: neither TE nor flash-attn
        (True, torch.float32, False, False, True, "flex_document_mask"),
        (True, torch.bfloat16, False, False, False, "flex_document_mask"),
    ],
)
def test_backend_choice(cuda, dtype, te, flash, varlen, expected, monkeypatch):
    monkeypatch.setattr(pa, "flash_attn_varlen_func", object() if flash else None)
    monkeypatch.setattr(pa, "_torch_varlen", lambda: object() if varlen else None)
    backend, why = pa.choose_backend(cuda, dtype, te)
    assert backend == expected and why


def test_packed_params_keep_host_boundaries_for_megatron_rope():
    """Without TE the standard fields are host tensors: megatron's RoPE split reads them as a list, which
    costs a device synchronisation per layer when they live on the GPU."""
    params = pa.packed_seq_params([0, 3, 7, 8], torch.device("cpu"), "sdpa_per_segment")
    assert params.qkv_format == "thd" and params.max_seqlen_q == params.max_seqlen_kv == 4
    assert params.cu_seqlens_q.device.type == "cpu" and params.cu_seqlens_q.dtype == torch.int32
    assert params.boundaries == (0, 3, 7, 8)
