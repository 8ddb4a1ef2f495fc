from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from spin_mega.data import PairBatchSampler, collate_pairs, padding_fraction
from spin_mega.errors import DataError

PAD = 0


def pair_strategy():
    token_lists = lambda lo, hi: st.lists(st.integers(1, 99), min_size=lo, max_size=hi)  # noqa: E731
    return st.fixed_dictionaries({"prompt_ids": token_lists(1, 12), "chosen_ids": token_lists(1, 12), "rejected_ids": token_lists(1, 12)})


@settings(max_examples=60, deadline=None, database=None)
@given(st.lists(pair_strategy(), min_size=1, max_size=5), st.sampled_from([None, 1, 8, 16]))
def test_labels_are_next_response_tokens(examples, multiple):
    batch = collate_pairs(examples, PAD, pad_to_multiple_of=multiple)
    b = len(examples)
    lengths = [len(e["prompt_ids"]) + len(e[k]) for k in ("chosen_ids", "rejected_ids") for e in examples]
    t = batch["input_ids"].shape[1]
    assert batch["input_ids"].shape == batch["labels"].shape == batch["position_ids"].shape == (2 * b, t)
    assert batch["input_ids"].dtype == batch["labels"].dtype == torch.int64
    assert t >= max(lengths) and (multiple in (None, 1) and t == max(lengths) or t % multiple == 0)
    for row in range(2 * b):
        ex = examples[row % b]
        response = ex["chosen_ids"] if row < b else ex["rejected_ids"]
        p = len(ex["prompt_ids"])
        expected = [-100] * t
        for pos in range(t - 1):
            # Position t predicts token t+1: labelled exactly when t+1 is a response token.
            if p <= pos + 1 < p + len(response):
                expected[pos] = int(batch["input_ids"][row, pos + 1])
        assert batch["labels"][row].tolist() == expected
        assert batch["input_ids"][row, : p + len(response)].tolist() == ex["prompt_ids"] + response
        assert batch["num_response_tokens"][row] == len(response)
    assert "opponent_logps" not in batch


def test_opponent_logps_order_chosen_then_rejected():
    examples = [
        {"prompt_ids": [1], "chosen_ids": [2], "rejected_ids": [3], "opponent_chosen_logp": -1.0, "opponent_rejected_logp": -2.0},
        {"prompt_ids": [1], "chosen_ids": [2], "rejected_ids": [3], "opponent_chosen_logp": -3.0, "opponent_rejected_logp": -4.0},
    ]
    assert collate_pairs(examples, PAD)["opponent_logps"].tolist() == [-1.0, -3.0, -2.0, -4.0]
    examples[1]["opponent_chosen_logp"] = None
    with pytest.raises(ValueError, match="some pairs of the batch have opponent log-probs"):
        collate_pairs(examples, PAD)


@pytest.mark.parametrize("field, message", [("prompt_ids", "empty prompt"), ("rejected_ids", "empty rejected response")])
def test_collate_refuses_empty_parts(field, message):
    example = {"prompt_ids": [1, 2], "chosen_ids": [3], "rejected_ids": [4]}
    example[field] = []
    with pytest.raises(ValueError, match=message):
        collate_pairs([example], PAD)


def varied_lengths(n=1024, seed=0):
    # Long-tailed, like chat data: most pairs short, some near the length limit.
    rng = np.random.default_rng(seed)
    return np.clip(rng.lognormal(mean=5.0, sigma=0.9, size=n), 8, 2048).astype(np.int64)


def epoch_batches(sampler):
    return [sampler.microbatches_for_step(s) for s in range(sampler.steps_per_epoch)]


def test_deterministic_given_seed():
    lengths = varied_lengths()
    a = PairBatchSampler(lengths, 4, 32, 0, 2, seed=7, num_buckets=8)
    b = PairBatchSampler(lengths, 4, 32, 0, 2, seed=7, num_buckets=8)
    assert epoch_batches(a) == epoch_batches(b)
    assert epoch_batches(a) != epoch_batches(PairBatchSampler(lengths, 4, 32, 0, 2, seed=8, num_buckets=8))


@pytest.mark.parametrize("mbs, gbs, dp, buckets", [(4, 32, 2, 8), (1, 8, 4, 1), (2, 24, 3, 5), (8, 8, 1, 64)])
def test_ranks_disjoint_and_each_pair_at_most_once_per_epoch(mbs, gbs, dp, buckets):
    lengths = varied_lengths(n=500)
    samplers = [PairBatchSampler(lengths, mbs, gbs, rank, dp, seed=3, num_buckets=buckets) for rank in range(dp)]
    steps = samplers[0].steps_per_epoch
    assert steps == 500 // gbs
    for epoch in range(2):
        seen = []
        for step in range(epoch * steps, (epoch + 1) * steps):
            per_rank = [s.microbatches_for_step(step) for s in samplers]
            for micro_batches in per_rank:
                assert len(micro_batches) == gbs // (mbs * dp)
                assert all(len(mb) == mbs for mb in micro_batches)
            step_indices = [i for mbs_ in per_rank for mb in mbs_ for i in mb]
            assert len(step_indices) == gbs == len(set(step_indices))
            seen += step_indices
        assert len(seen) == len(set(seen)) == steps * gbs
        assert all(0 <= i < 500 for i in seen)


def test_epochs_differ_and_drop_different_pairs():
    lengths = varied_lengths(n=100)
    sampler = PairBatchSampler(lengths, 2, 16, 0, 1, seed=0)
    epoch0 = {i for step in range(6) for mb in sampler.microbatches_for_step(step) for i in mb}
    epoch1 = {i for step in range(6, 12) for mb in sampler.microbatches_for_step(step) for i in mb}
    assert len(epoch0) == len(epoch1) == 96
    assert epoch0 != epoch1


def test_resume_gives_the_same_indices():
    lengths = varied_lengths()
    uninterrupted = PairBatchSampler(lengths, 4, 32, 1, 2, seed=11)
    total = 2 * uninterrupted.steps_per_epoch + 3
    expected = [uninterrupted.microbatches_for_step(s) for s in range(total)]
    for k in (0, 5, uninterrupted.steps_per_epoch, total - 1):
        resumed = PairBatchSampler(lengths, 4, 32, 1, 2, seed=11)
        assert [resumed.microbatches_for_step(s) for s in range(k, total)] == expected[k:]


def test_bucketing_lowers_padding():
    lengths = varied_lengths(n=4096)
    kwargs = dict(micro_batch_size=8, global_batch_size=64, dp_rank=0, dp_size=1, seed=0)

    def padding(num_buckets):
        sampler = PairBatchSampler(lengths, num_buckets=num_buckets, **kwargs)
        return padding_fraction(lengths, [mb for step in epoch_batches(sampler) for mb in step])

    random_padding, coarse, fine = padding(1), padding(16), padding(64)
    assert random_padding > 0.4
    assert coarse < 0.5 * random_padding
    # More buckets trade micro-batch variety for less padding; the knob must move padding the right way.
    assert fine < 0.5 * coarse


def test_ranks_get_balanced_work():
    lengths = varied_lengths(n=4096)
    samplers = [PairBatchSampler(lengths, 4, 64, r, 4, seed=0, num_buckets=16) for r in range(4)]
    worst = []
    for step in range(samplers[0].steps_per_epoch):
        tokens = [sum(len(mb) * int(lengths[mb].max()) for mb in s.microbatches_for_step(step)) for s in samplers]
        worst.append(max(tokens) / (sum(tokens) / 4))
    assert np.median(worst) < 1.5


def test_padding_fraction_helper():
    lengths = [10, 5, 8, 8]
    assert padding_fraction(lengths, [[0, 1], [2, 3]]) == pytest.approx(1 - 31 / 36)
    assert PairBatchSampler([1] * 4, 1, 4, 0, 1, seed=0).padding_fraction([[0], [1]]) == 0.0


def test_global_batch_must_divide():
    with pytest.raises(DataError, match=r"global_batch_size \(30\) must be a multiple of train.micro_batch_size \(4\) times the data-parallel size \(2\)"):
        PairBatchSampler(varied_lengths(), 4, 30, 0, 2, seed=0)


def test_dataset_smaller_than_a_global_batch():
    with pytest.raises(DataError, match="the data has 10 pairs, fewer than one global batch of 16"):
        PairBatchSampler(varied_lengths(n=10), 2, 16, 0, 1, seed=0)


def test_bad_rank():
    with pytest.raises(ValueError, match="dp_rank 2 is outside 0..1"):
        PairBatchSampler(varied_lengths(), 2, 16, 2, 2, seed=0)
