"""Only labelled (response) positions reach the output layer: `sequence_logprobs` gathers their hidden
states first, in every log-prob implementation, with and without tensor and sequence parallelism, and
still returns the per-sequence sums and gradients of the full computation (float64 autograd oracle)."""

from __future__ import annotations

import torch
import torch.multiprocessing as mp

from spin_mega.parallel.rendezvous import free_port
from spin_mega.training.logprobs import check_label_range, response_rows
from tests.training.response_rows_worker import run_case


def test_response_rows_are_the_labelled_positions_in_sequence_major_order() -> None:
    labels = torch.tensor([[-100, -100, 5, 6], [-100, 7, 8, -100]])
    # [b, s] labels; the model's [s, b, h] output flattens position t of sequence i to t * b + i.
    assert response_rows(labels).tolist() == [3, 4, 5, 6]


def test_label_range_is_checked_on_the_host() -> None:
    check_label_range(torch.tensor([[-100, 0, 9]]), vocab_size=10)
    for bad in (10, -1):
        try:
            check_label_range(torch.tensor([[-100, bad]]), vocab_size=10)
        except ValueError as exc:
            assert f"e.g. {bad}" in str(exc)
        else:
            raise AssertionError(f"label {bad} passed the range check")


def test_single_rank_every_impl_matches_the_full_computation() -> None:
    mp.spawn(run_case, args=(1, free_port(), False), nprocs=1, join=True)


def test_tensor_parallel_every_impl_matches_the_full_computation() -> None:
    mp.spawn(run_case, args=(2, free_port(), False), nprocs=2, join=True)


def test_sequence_parallel_every_impl_matches_the_full_computation() -> None:
    mp.spawn(run_case, args=(2, free_port(), True), nprocs=2, join=True)

