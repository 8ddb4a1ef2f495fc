"""Vocab-parallel log-probs and the vocab-parallel fused-linear path on 2 gloo ranks equal the unsharded
results, forward and backward, with and without vocabulary padding."""

from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp
from kernel_dist_workers import fused_linear_worker, vocab_parallel_worker

from spin_mega.parallel.rendezvous import free_port

WORLD = 2


@pytest.fixture(autouse=True)
def _workers_interpret(monkeypatch) -> None:
    # The spawned ranks import the kernels afresh: on CPU they need the interpreter switched on too
    # (tests/conftest.py removes the variable from the environment other test processes inherit).
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")


def test_vocab_parallel_equals_unsharded() -> None:
    mp.spawn(vocab_parallel_worker, args=(WORLD, free_port()), nprocs=WORLD, join=True)


def test_fused_linear_vocab_parallel_equals_unsharded() -> None:
    mp.spawn(fused_linear_worker, args=(WORLD, free_port()), nprocs=WORLD, join=True)
