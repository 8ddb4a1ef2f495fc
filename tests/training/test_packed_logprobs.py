"""A packed row through a real megatron GPTModel gives the per-sequence log-prob sums and weight gradients of
the padded batch, in every log-prob path (fused linear, the Triton kernel and, under tensor parallelism,
its vocab-parallel form, the float64 reference), with and without tensor + sequence parallelism."""

from __future__ import annotations

import torch.multiprocessing as mp

from spin_mega.parallel.distributed import free_port
from tests.training.packing_worker import run_case


def test_packed_row_matches_the_padded_batch_in_every_logprob_path(monkeypatch):
    """TP 2 with sequence parallelism, then TP 1, in the same two processes."""
    # The spawned ranks import Triton afresh: with the interpreter on, the "triton" path runs the kernels.
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    mp.spawn(run_case, args=(2, free_port()), nprocs=2, join=True)
