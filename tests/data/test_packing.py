"""Sequence packing's data side: the bin packer, the packed sampler (same pairs as the padded one, none
skipped or repeated, resumable), the THD collator against the padded one, and pairs cut to fit a row."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from spin_mega.config import DataConfig, config_from_dict
from spin_mega.data import PairBatchSampler, TokenizeStats, collate_pairs, load_rows, tokenize_pairs
from spin_mega.data.packing import PackedPairSampler, collate_packed, fit_pair, pack, pad_packed, pair_tokens
from spin_mega.errors import ConfigError, DataError

PAD = 0


def ultrachat_like_pair_tokens(n: int, seed: int) -> np.ndarray:
    """Tokens per pair (2 prompt + chosen + rejected) for benchmarks/packing.py's length law at full scale."""
    rng = np.random.default_rng(seed)
    mu = np.log(309.3) - 0.75**2 / 2
    prompt = np.minimum(np.rint(rng.lognormal(mu, 0.75, n)), 512)
    chosen = np.minimum(np.rint(rng.lognormal(mu, 0.75, n)), 1024 - prompt)
    rejected = np.minimum(np.rint(rng.lognormal(mu, 0.75, n)), 256)
    return (2 * prompt + np.maximum(chosen, 1) + np.maximum(rejected, 1)).astype(np.int64)


@settings(max_examples=80, deadline=None, database=None)
@given(
    st.lists(st.integers(1, 300), min_size=1, max_size=60),
    st.integers(300, 1200),
    st.sampled_from([1, 2, 4]),
)
def test_pack_places_every_item_once_within_capacity(sizes, capacity, multiple):
    try:
        rows = pack(sizes, capacity, multiple)
    except DataError as refused:
        # Only when the rows, rounded up to the multiple, outnumber the items (never in the trainer: a
        # rank's pairs per step are a multiple of PP under the interleaved schedule).
        assert "cannot fill" in str(refused) and len(sizes) % multiple
        return
    assert sorted(i for row in rows for i in row) == list(range(len(sizes)))
    loads = [sum(sizes[i] for i in row) for row in rows]
    assert max(loads) <= capacity and all(row for row in rows)
    assert len(rows) % multiple == 0
    # First-fit decreasing uses at most 11/9 OPT + 1 rows, and OPT >= total / capacity.
    optimal_bound = -(-sum(sizes) // capacity)
    assert len(rows) <= -(-(11 * optimal_bound // 9 + 1) // multiple) * multiple + multiple
    assert loads == sorted(loads, reverse=True)


def test_pack_evens_the_rows_and_is_deterministic():
    sizes = ultrachat_like_pair_tokens(64, seed=1)
    rows = pack(sizes, 4096)
    loads = [int(sizes[r].sum()) for r in rows]
    assert len(rows) == -(-int(sizes.sum()) // 4096)  # no row more than the volume needs, on this data
    # Longest-first onto the least-filled row: rows end within one (small, last-placed) pair of each other.
    assert max(loads) - min(loads) <= int(np.sort(sizes)[len(sizes) // 2])
    assert pack(sizes, 4096) == rows


def test_pack_keeps_first_fit_rows_where_the_even_deal_misses_a_fit():
    # First-fit decreasing: [5, 5] and [4, 3, 3]; dealt onto the least-filled of 2 rows, the last 3 fits neither.
    assert pack([5, 5, 4, 3, 3], 10) == [[0, 1], [2, 3, 4]]
    rows = pack([5, 5, 4, 3, 3], 10, multiple=4)  # first-fit's 2 rows split up to 4
    assert len(rows) == 4 and sorted(i for r in rows for i in r) == [0, 1, 2, 3, 4]


def test_pack_refuses_an_item_over_capacity():
    with pytest.raises(DataError, match="does not fit a packed row of data.pack_tokens=100"):
        pack([50, 101], 100)


@pytest.mark.parametrize("dp_size, multiple", [(1, 1), (2, 1), (2, 2)])
def test_packed_sampler_trains_the_padded_sampler_pairs_once_each(dp_size, multiple):
    """Every step, the ranks' packed rows together hold exactly the padded sampler's global batch; over two
    epochs no pair repeats within an epoch; each rank gets its share; a fresh sampler (a resumed run)
    answers any step with the same rows."""
    n, global_batch = 100, 16
    tokens = ultrachat_like_pair_tokens(n, seed=2)
    lengths = tokens // 2

    def samplers(rank):
        base = PairBatchSampler(lengths, micro_batch_size=2, global_batch_size=global_batch, dp_rank=rank, dp_size=dp_size, seed=5)
        return base, PackedPairSampler(base, tokens, pack_tokens=4096, multiple=multiple)

    ranks = [samplers(rank) for rank in range(dp_size)]
    steps = ranks[0][0].steps_per_epoch
    for epoch in range(2):
        seen = []
        for step in range(epoch * steps, (epoch + 1) * steps):
            rows = [packed.microbatches_for_step(step) for _, packed in ranks]
            padded = [i for base, _ in ranks for mb in base.microbatches_for_step(step) for i in mb]
            packed_pairs = [i for per_rank in rows for row in per_rank for i in row]
            assert sorted(packed_pairs) == sorted(padded)
            for per_rank in rows:
                assert sum(len(r) for r in per_rank) == global_batch // dp_size
                assert len(per_rank) % multiple == 0
                assert all(tokens[r].sum() <= 4096 for r in per_rank)
            seen += packed_pairs
        assert len(seen) == len(set(seen)) == steps * global_batch
    resumed = samplers(dp_size - 1)[1]
    assert resumed.microbatches_for_step(steps + 1) == ranks[-1][1].microbatches_for_step(steps + 1)


def test_equal_rows_give_every_rank_the_row_count_of_the_rank_that_needs_most():
    """MoE over data-parallel ranks: every rank packs its own pairs (the same ones as without the option) into
    as many rows as the fullest rank needs; without it, the counts differ at some step of this data."""
    n, global_batch, dp_size = 100, 16, 4
    tokens = ultrachat_like_pair_tokens(n, seed=2)

    def packed(rank, equal_rows):
        base = PairBatchSampler(tokens // 2, micro_batch_size=2, global_batch_size=global_batch, dp_rank=rank, dp_size=dp_size, seed=5)
        return PackedPairSampler(base, tokens, pack_tokens=2048, equal_rows=equal_rows)

    unequal_steps = 0
    for step in range(6):
        free = [packed(rank, False).microbatches_for_step(step) for rank in range(dp_size)]
        equal = [packed(rank, True).microbatches_for_step(step) for rank in range(dp_size)]
        counts = {len(rows) for rows in free}
        unequal_steps += len(counts) > 1
        assert {len(rows) for rows in equal} == {max(counts)}
        for rows_free, rows_equal in zip(free, equal):
            assert sorted(i for r in rows_equal for i in r) == sorted(i for r in rows_free for i in r)
            assert all(tokens[r].sum() <= 2048 for r in rows_equal)
    assert unequal_steps > 0


def test_packing_pads_under_five_percent_on_ultrachat_like_data():
    """Rows padded only to a multiple of TP = 2: the padding fraction of a whole epoch stays far below 5%."""
    tokens = ultrachat_like_pair_tokens(256, seed=3)
    base = PairBatchSampler(tokens // 2, micro_batch_size=1, global_batch_size=64, dp_rank=0, dp_size=1, seed=0)
    packed = PackedPairSampler(base, tokens, pack_tokens=2048)
    real = stream = 0
    for step in range(base.steps_per_epoch):
        for row in packed.microbatches_for_step(step):
            t = int(tokens[row].sum())
            real, stream = real + t, stream + t + t % 2
    assert 1 - real / stream < 0.05


def pair_strategy():
    tokens = lambda lo, hi: st.lists(st.integers(1, 99), min_size=lo, max_size=hi)  # noqa: E731
    return st.fixed_dictionaries({"prompt_ids": tokens(1, 12), "chosen_ids": tokens(1, 12), "rejected_ids": tokens(1, 12)})


@settings(max_examples=60, deadline=None, database=None)
@given(st.lists(pair_strategy(), min_size=1, max_size=5), st.sampled_from([1, 2, 8]))
def test_packed_batch_is_the_padded_batch_laid_end_to_end(examples, multiple):
    """Each sequence of the packed row is the padded row without its padding: same tokens, same labels,
    positions from 0; the log-prob slots sum every response token into its own sequence, in order."""
    padded = collate_pairs(examples, PAD, pad_to_multiple_of=None)
    packed = collate_packed(examples, PAD, pad_to_multiple_of=multiple)
    cu = packed["cu_seqlens"]
    sequences = 2 * len(examples)
    t = packed["input_ids"].shape[1]
    assert cu[0] == 0 and cu[-1] == t and t % multiple == 0 and t - cu[sequences] < multiple
    assert len(cu) == sequences + 1 + (t > cu[sequences])
    assert torch.equal(packed["num_response_tokens"], padded["num_response_tokens"])
    fake_logps = torch.randn(t, dtype=torch.float64)
    labelled = packed["labels"][0] != -100
    width = packed["logp_width"]
    sums = torch.zeros(sequences * width, dtype=torch.float64).index_put((packed["logp_slots"],), fake_logps[labelled])
    sums = sums.view(sequences, width).sum(1)
    for row in range(sequences):
        n = cu[row + 1] - cu[row]
        assert packed["input_ids"][0, cu[row] : cu[row + 1]].tolist() == padded["input_ids"][row, :n].tolist()
        assert packed["labels"][0, cu[row] : cu[row + 1]].tolist() == padded["labels"][row, :n].tolist()
        assert packed["position_ids"][0, cu[row] : cu[row + 1]].tolist() == list(range(n))
        expected = fake_logps[cu[row] : cu[row + 1]][packed["labels"][0, cu[row] : cu[row + 1]] != -100].sum()
        assert sums[row].item() == pytest.approx(expected.item(), abs=1e-12)
    assert packed["max_seqlen"] == max(cu[i + 1] - cu[i] for i in range(sequences))
    assert (packed["labels"][0, cu[sequences] :] == -100).all()


def test_pad_packed_extends_the_padding_tail():
    examples = [{"prompt_ids": [5, 6], "chosen_ids": [7], "rejected_ids": [8, 9]}]
    batch = collate_packed(examples, PAD, pad_to_multiple_of=2)
    assert batch["cu_seqlens"] == [0, 3, 7, 8]
    longer = pad_packed(batch, 12, PAD)
    assert longer["cu_seqlens"] == [0, 3, 7, 12]
    assert longer["input_ids"][0].tolist() == [5, 6, 7, 5, 6, 8, 9] + [PAD] * 5
    assert longer["position_ids"][0].tolist() == [0, 1, 2, 0, 1, 2, 3, 0, 1, 2, 3, 4]
    assert (longer["labels"][0, 7:] == -100).all() and torch.equal(longer["logp_slots"], batch["logp_slots"])


def test_the_routers_padding_mask_of_a_packed_row_is_its_tail():
    """The MoE routers leave padding out of the balancing loss's statistics (models/moe.py): in a packed row
    that is the tail after the last sequence, and nothing between sequences (whose last tokens predict
    nothing), however far the all-gather dispatcher lengthens the row."""
    from unittest.mock import create_autospec

    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer import TransformerConfig

    from spin_mega.models.moe import routing_padding_mask

    chunk = create_autospec(GPTModel, instance=True)
    chunk.config = TransformerConfig(
        num_layers=1, hidden_size=8, num_attention_heads=1, num_moe_experts=2, moe_router_topk=2,
        moe_ffn_hidden_size=8,
    )
    chunk.pre_process = True
    examples = [
        {"prompt_ids": [5, 6], "chosen_ids": [7], "rejected_ids": [8, 9]},
        {"prompt_ids": [3], "chosen_ids": [4, 4, 4], "rejected_ids": [2]},
    ]
    batch = collate_packed(examples, PAD, pad_to_multiple_of=4)
    for row in (batch, pad_packed(batch, 20, PAD)):
        real = row["cu_seqlens"][4]
        mask = routing_padding_mask(chunk, row["labels"])
        assert mask.shape == row["input_ids"].shape
        assert mask[0].tolist() == [False] * real + [True] * (row["input_ids"].shape[1] - real)


@pytest.mark.parametrize(
    "prompt, chosen, rejected, pack_tokens, room",
    [
        (10, 30, 20, 100, 30),  # fits: nothing cut
        (10, 100, 20, 100, 60),  # the longer response alone is cut
        (10, 100, 90, 100, 40),  # both cut to the same room
        (49, 100, 90, 100, 1),
    ],
)
def test_fit_pair_cuts_responses_at_the_end_to_one_room(prompt, chosen, rejected, pack_tokens, room):
    assert fit_pair(prompt, chosen, rejected, pack_tokens) == room
    assert 2 * prompt + min(chosen, room) + min(rejected, room) <= pack_tokens


def test_a_pair_longer_than_the_row_is_cut_and_counted_never_dropped(tmp_path, write_jsonl, tiny_tokenizer):
    rows = [
        {"prompt": "Hi", "chosen": "The sea is wide and deep and blue. " * 6, "rejected": "The sea is blue. " * 6},
        {"prompt": "Hi", "chosen": "Blue.", "rejected": "Paris."},
    ]
    cfg = DataConfig(max_prompt_length=16, max_length=80, packing=True, pack_tokens=80)
    out, stats = tokenize_pairs(load_rows(write_jsonl(tmp_path / "r.jsonl", rows)), tiny_tokenizer, cfg)
    assert stats == TokenizeStats(rows_in=2, rows_kept=2, cut_to_pack_tokens=1)
    assert "cut 1 pairs to fit data.pack_tokens" in stats.summary()
    assert pair_tokens(out).tolist()[0] == 80 and pair_tokens(out).tolist()[1] < 80
    unpacked_cfg = DataConfig(max_prompt_length=16, max_length=80, packing=False)
    unpacked, _ = tokenize_pairs(load_rows(write_jsonl(tmp_path / "r.jsonl", rows)), tiny_tokenizer, unpacked_cfg)
    assert out[1] == unpacked[1]  # a pair that fits is untouched
    for side in ("chosen_ids", "rejected_ids"):  # the cut keeps each response's beginning
        assert unpacked[0][side][: len(out[0][side])] == out[0][side]


@pytest.mark.parametrize(
    "pack_tokens, message",
    [
        (100, "data.pack_tokens (100) is smaller than data.max_length (128): a packed row must hold at least one whole sequence"),
        (128, "must be at least 2 x (data.max_prompt_length + 1) = 130"),
    ],
)
def test_a_row_too_small_is_refused_in_one_sentence(pack_tokens, message):
    raw = {"data": {"max_prompt_length": 64, "max_length": 128, "packing": True, "pack_tokens": pack_tokens}}
    with pytest.raises(ConfigError) as refused:
        config_from_dict(raw)
    assert message in str(refused.value) and str(refused.value).count(". ") == 0
    raw["data"]["packing"] = False  # the row size matters only to packing
    config_from_dict(raw)
