"""Body of the packed-model tests, one process per tensor-parallel rank over gloo (spawned processes import it
by name): a real megatron GPTModel (the trainer's layer spec, RoPE) runs the same pairs padded and packed,
and every log-prob path gives the same per-sequence sums and the same weight gradients."""

from __future__ import annotations

import os

import torch

from spin_mega.data import collate_pairs
from spin_mega.data.packing import collate_packed

IMPLS = ("fused_linear", "triton", "reference")
PAIRS = [  # prompts and responses of different lengths; a one-token response included
    {"prompt_ids": [3, 17, 9, 40], "chosen_ids": [5, 6, 7, 8, 9, 10, 11], "rejected_ids": [12]},
    {"prompt_ids": [2, 30], "chosen_ids": [44, 45, 46], "rejected_ids": [47, 48, 49, 50, 51, 52, 53, 54, 55]},
    {"prompt_ids": [8, 8, 8, 8, 8, 8, 8, 8, 8], "chosen_ids": [60, 61], "rejected_ids": [62, 63, 64, 65]},
]
VOCAB = 100
MODEL = dict(vocab_size=VOCAB, hidden_size=64, ffn_hidden_size=128, num_layers=2, num_attention_heads=4,
             num_query_groups=2, head_dim=16, max_position_embeddings=64)


def run_case(rank: int, world: int, port: int) -> None:
    """Tensor parallelism over all `world` ranks (with sequence parallelism), then TP 1 on every rank: one
    process start covers the vocab-parallel kernel and the plain one."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    from megatron.core import parallel_state

    from spin_mega.parallel import distributed

    try:
        for tp in sorted({world, 1}, reverse=True):
            distributed.initialize(tensor_parallel=tp, seed=3)
            _check_packed_equals_padded(rank, tp)
            parallel_state.destroy_model_parallel()
    finally:
        distributed.shutdown()


def _check_packed_equals_padded(rank: int, tp: int) -> None:
    from megatron.core import parallel_state

    from spin_mega.config import ModelConfig
    from spin_mega.kernels import backend_for
    from spin_mega.models.gpt import build_model, transformer_config
    from spin_mega.models.packed_attention import packed_seq_params
    from spin_mega.training.logprobs import response_rows, sequence_logprobs

    model_cfg = ModelConfig(**MODEL)
    model = build_model(model_cfg, transformer_config(model_cfg, tensor_parallel=tp, sequence_parallel=tp > 1))
    padded = collate_pairs(PAIRS, 0, pad_to_multiple_of=tp)
    packed = collate_packed(PAIRS, 0, pad_to_multiple_of=tp)
    assert packed["input_ids"].shape[1] < padded["input_ids"].numel()
    sequences = 2 * len(PAIRS)
    coeff = torch.linspace(-1.0, 2.0, sequences)
    params = packed_seq_params(packed["cu_seqlens"], torch.device("cpu"), "sdpa_per_segment")
    segments = (packed["logp_slots"], sequences, packed["logp_width"])
    results = {}
    for impl in IMPLS:
        for layout in ("padded", "packed"):
            batch = padded if layout == "padded" else packed
            model.zero_grad()
            hidden = model(batch["input_ids"], batch["position_ids"], None, packed_seq_params=params if layout == "packed" else None)
            sums = sequence_logprobs(model, hidden, batch["labels"], VOCAB, impl, response_rows(batch["labels"]),
                                     segments if layout == "packed" else None)
            (sums * coeff).sum().backward()
            grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
            for name, p in model.named_parameters():
                # Under sequence parallelism a norm weight's gradient is a partial sum over this rank's tokens,
                # reduced over TP by finalize_model_grads; packed and padded rows shard the tokens differently.
                if getattr(p, "sequence_parallel", False) and tp > 1:
                    torch.distributed.all_reduce(grads[name], group=parallel_state.get_tensor_model_parallel_group())
            results[impl, layout] = (sums.detach(), grads)
        what = f"{impl} tp={tp} rank {rank}"
        (padded_sums, padded_grads), (packed_sums, packed_grads) = results[impl, "padded"], results[impl, "packed"]
        assert packed_sums.shape == (sequences,) and (packed_sums < 0).all(), what
        torch.testing.assert_close(packed_sums, padded_sums, rtol=1e-5, atol=1e-5, msg=what)
        assert packed_grads.keys() == padded_grads.keys()
        for name, grad in padded_grads.items():
            torch.testing.assert_close(packed_grads[name], grad, rtol=1e-4, atol=1e-6, msg=f"{what}: d {name}")
    # Rotary positions restart at every sequence: megatron's RoPE, given the packed row's parameters, rotates
    # each sequence's queries as it rotates that sequence alone from position 0. (Attention within a sequence
    # only sees position differences, so the sums above cannot tell; this can.)
    from megatron.core.models.common.embeddings.rope_utils import apply_rotary_pos_emb

    head_dim = MODEL["head_dim"]
    stream = torch.randn(packed["input_ids"].shape[1], 2, head_dim, generator=torch.Generator().manual_seed(5))
    freqs = model.rotary_pos_emb(params.max_seqlen_q, packed_seq=True)
    rotated = apply_rotary_pos_emb(stream, freqs, model.config, cu_seqlens=params.cu_seqlens_q)
    bounds = packed["cu_seqlens"]
    for start, stop in zip(bounds[:-1], bounds[1:]):
        alone = apply_rotary_pos_emb(stream[start:stop].unsqueeze(1), freqs[: stop - start], model.config).squeeze(1)
        torch.testing.assert_close(rotated[start:stop], alone, rtol=0, atol=0, msg=f"RoPE of [{start}, {stop}) tp={tp}")
    # Every implementation agrees with the float64 reference on the packed row.
    for impl in IMPLS:
        torch.testing.assert_close(results[impl, "packed"][0], results["reference", "packed"][0], rtol=1e-5, atol=1e-5)
    # The Triton path ran the real kernels (the interpreter on CPU), not their PyTorch fallback.
    assert backend_for(torch.zeros(1)) == "triton", backend_for(torch.zeros(1))
