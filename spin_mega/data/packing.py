"""Sequence packing of SPIN pairs: many pairs' sequences in one flat token stream per micro-batch.

A padded micro-batch pads every row to its longest sequence; a packed one lays the sequences end to end
(THD: one row of `t` tokens), so no FLOP goes to padding except the few tokens the layout needs (a
multiple of the tensor-parallel size under sequence parallelism). Both sequences of a pair travel in the
same micro-batch, since the loss needs both.

Which pairs an optimizer step trains on is the padded sampler's choice (`PairBatchSampler`): packing
regroups the same global batch, so packed and padded training see the same pairs at every step, resume
at any step without skipping or repeating a pair, and give the same losses to float rounding. Per step:
the global batch's pairs are dealt to the data-parallel ranks (each gets its share of pairs, tokens
evened by a snake deal in length order), then each rank's pairs go into rows of at most `pack_tokens`
tokens: first-fit decreasing finds the number of rows, a longest-first deal onto the least-filled row
evens them (equal rows keep pipeline stages in step and leave the interleaved schedule, which needs one
length per step, little to pad).
"""

from __future__ import annotations

import heapq
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import pyarrow.compute as pc
import torch

from spin_mega.data.batching import IGNORE_INDEX, PairBatchSampler
from spin_mega.errors import DataError


def resolve_pack_tokens(pack_tokens: Optional[int], micro_batch_size: int, max_length: int) -> int:
    """`data.pack_tokens`, or its default: the token count of a padded micro-batch at the length limit
    (2 x micro_batch_size x max_length), so packing never holds more activations than padding could."""
    return pack_tokens if pack_tokens is not None else 2 * micro_batch_size * max_length


def fit_pair(prompt: int, chosen: int, rejected: int, pack_tokens: int) -> int:
    """The tokens each response may keep so that both sequences of a pair fit one packed row: the
    tokenizer's response policy (cut at the end, both responses to the same room) applied to the row.
    Returns a room >= max(chosen, rejected) when nothing needs cutting."""
    budget = pack_tokens - 2 * prompt
    if chosen + rejected <= budget:
        return max(chosen, rejected)
    shorter = min(chosen, rejected)
    return budget - shorter if 2 * shorter < budget else budget // 2


def pair_tokens(tokenized) -> np.ndarray:
    """Per pair, the tokens it takes in a packed row: prompt + chosen and prompt + rejected (int64)."""
    table = tokenized.with_format("arrow")
    lengths = [pc.list_value_length(table[c]).to_numpy(zero_copy_only=False) for c in ("prompt_ids", "chosen_ids", "rejected_ids")]
    return (2 * lengths[0] + lengths[1] + lengths[2]).astype(np.int64)


def pack(sizes: Sequence[int] | np.ndarray, capacity: int, multiple: int = 1, min_rows: int = 0) -> list[list[int]]:
    """Positions of `sizes` grouped into rows of at most `capacity`, the row count a multiple of
    `multiple` (the interleaved pipeline schedule runs micro-batches in groups of PP), at least `min_rows`
    and at most len(sizes). First-fit decreasing gives the row count; the items are then dealt longest first onto the
    least-filled row that has room, which evens the rows (where that deal misses a fit first-fit found,
    first-fit's rows are kept). Deterministic; rows longest first."""
    sizes = np.asarray(sizes, dtype=np.int64)
    if len(sizes) == 0:
        return []
    if sizes.max() > capacity:
        raise DataError(
            f"a pair of {int(sizes.max())} tokens does not fit a packed row of data.pack_tokens={capacity}; "
            "the tokenizer cuts pairs to fit, so this data was tokenized with another pack_tokens"
        )
    order = np.argsort(-sizes, kind="stable")
    first_fit: list[list[int]] = []
    free: list[int] = []
    for i in order:
        for row, room in enumerate(free):
            if sizes[i] <= room:
                free[row] -= sizes[i]
                first_fit[row].append(int(i))
                break
        else:
            free.append(capacity - int(sizes[i]))
            first_fit.append([int(i)])
    rows = -(-max(len(free), min_rows) // multiple) * multiple
    if rows > len(sizes):
        raise DataError(f"{len(sizes)} pairs cannot fill {rows} packed micro-batches (a multiple of {multiple})")
    dealt = _deal(sizes, order, capacity, rows)
    if dealt is None:
        # The even deal missed a fit that first-fit found: first-fit's rows, split up to the multiple.
        dealt = first_fit
        while len(dealt) < rows:
            fullest = max(dealt, key=len)  # some row holds two items: there are at least `rows` items
            dealt.append([fullest.pop()])
    return sorted(dealt, key=lambda r: (-int(sizes[r].sum()), r[0]))


def _deal(sizes: np.ndarray, order: np.ndarray, capacity: int, rows: int) -> Optional[list[list[int]]]:
    heap = [(0, row) for row in range(rows)]
    members: list[list[int]] = [[] for _ in range(rows)]
    for i in order:
        skipped = []
        while heap and heap[0][0] + sizes[i] > capacity:
            skipped.append(heapq.heappop(heap))
        if not heap:
            return None
        load, row = heapq.heappop(heap)
        members[row].append(int(i))
        heapq.heappush(heap, (load + int(sizes[i]), row))
        for entry in skipped:
            heapq.heappush(heap, entry)
    if any(not m for m in members):
        return None
    return members


class PackedPairSampler:
    """This rank's packed micro-batches at each optimizer step: the padded sampler's global batch for the
    step, dealt to data-parallel ranks and packed into rows (module docstring). A pure function of the
    step, like the sampler it wraps, so resuming at step k asks for step k."""

    def __init__(
        self, sampler: PairBatchSampler, tokens_per_pair: Sequence[int] | np.ndarray, pack_tokens: int, multiple: int = 1,
        equal_rows: bool = False,
    ):
        """`equal_rows`: every data-parallel rank packs its share into as many rows as the rank that needs the
        most (a mixture-of-experts model whose expert-parallel group spans data-parallel ranks exchanges
        tokens in every forward, so all of them must run the same micro-batch count). Each rank works the
        others' counts out from the shared sampler: no communication."""
        self.sampler = sampler
        self.tokens = np.asarray(tokens_per_pair, dtype=np.int64)
        if len(self.tokens) != len(sampler.lengths):
            raise ValueError("tokens_per_pair needs one entry per pair of the sampler")
        self.pack_tokens = pack_tokens
        self.multiple = multiple
        self.equal_rows = equal_rows

    def rank_pairs(self, step: int, dp_rank: Optional[int] = None) -> np.ndarray:
        """A rank's share of the step's global batch (this rank's by default): global_batch_size / dp_size pairs."""
        pairs = np.asarray(self.sampler.global_batch(step), dtype=np.int64)
        dp = self.sampler.dp_size
        ranked = pairs[np.lexsort((pairs, -self.tokens[pairs]))]
        slot = np.arange(len(ranked))
        round_, pos = slot // dp, slot % dp
        rank_of_slot = np.where(round_ % 2 == 0, pos, dp - 1 - pos)
        return ranked[rank_of_slot == (self.sampler.dp_rank if dp_rank is None else dp_rank)]

    def microbatches_for_step(self, step: int) -> list[list[int]]:
        mine = self.rank_pairs(step)
        min_rows = 0
        if self.equal_rows:
            min_rows = max(
                len(pack(self.tokens[self.rank_pairs(step, rank)], self.pack_tokens, self.multiple))
                for rank in range(self.sampler.dp_size)
            )
        return [mine[row].tolist() for row in pack(self.tokens[mine], self.pack_tokens, self.multiple, min_rows)]


def collate_packed(
    examples: Sequence[Mapping[str, Any]] | Mapping[str, Sequence[Any]], pad_id: int, pad_to_multiple_of: int = 1
) -> dict[str, Any]:
    """One packed micro-batch of B pairs: the 2B sequences (prompt + chosen for every pair, then prompt +
    rejected, the order `collate_pairs` gives its rows) end to end in one row, padded at the end to a
    multiple of `pad_to_multiple_of`.

    Returns what `collate_pairs` returns for the same pairs, in THD form: `input_ids` and `labels` [1, t]
    (labels[t'] the next token where it belongs to a response of the same sequence, -100 elsewhere: the
    last token of a sequence predicts nothing), `position_ids` [1, t] restarting at 0 for every sequence,
    `num_response_tokens` [2B]; plus `cu_seqlens` (list of 2B + 2 ints when there is a padding tail, which
    is a sequence of its own, else 2B + 1), `logp_slots` [n labelled positions] and `logp_width`: the
    per-sequence sums are dense[slot] summed over rows of `logp_width`, slot = sequence * width + k for
    the k-th response token of that sequence; `max_seqlen`, the longest sequence."""
    if isinstance(examples, Mapping):
        examples = [dict(zip(examples, values)) for values in zip(*examples.values())]
    if not examples:
        raise ValueError("collate_packed needs at least one pair")
    b = len(examples)
    prompts = [list(ex["prompt_ids"]) for ex in examples]
    for i, prompt in enumerate(prompts):
        if not prompt:
            raise ValueError(f"pair {i} of the batch has an empty prompt")
    responses = [list(ex[key]) for key in ("chosen_ids", "rejected_ids") for ex in examples]
    for j, response in enumerate(responses):
        if not response:
            raise ValueError(f"pair {j % b} of the batch has an empty {'chosen' if j < b else 'rejected'} response")
    prompts = prompts + prompts
    lengths = [len(p) + len(r) for p, r in zip(prompts, responses)]
    real = sum(lengths)
    total = -(-real // pad_to_multiple_of) * pad_to_multiple_of if pad_to_multiple_of > 1 else real
    cu_seqlens = [0, *np.cumsum(lengths).tolist()]
    if total > real:
        cu_seqlens.append(total)

    input_ids = np.full(total, pad_id, dtype=np.int64)
    labels = np.full(total, IGNORE_INDEX, dtype=np.int64)
    positions = np.empty(total, dtype=np.int64)
    width = max(len(r) for r in responses)
    slots = np.empty(sum(len(r) for r in responses), dtype=np.int64)
    filled = 0
    for seq, (prompt, response) in enumerate(zip(prompts, responses)):
        start, p, n = cu_seqlens[seq], len(prompt), len(response)
        input_ids[start : start + p] = prompt
        input_ids[start + p : start + p + n] = response
        labels[start + p - 1 : start + p + n - 1] = response
        positions[start : start + p + n] = np.arange(p + n)
        slots[filled : filled + n] = seq * width + np.arange(n)
        filled += n
    positions[real:] = np.arange(total - real)

    batch: dict[str, Any] = {
        "input_ids": torch.from_numpy(input_ids).unsqueeze(0),
        "labels": torch.from_numpy(labels).unsqueeze(0),
        "position_ids": torch.from_numpy(positions).unsqueeze(0),
        "num_response_tokens": torch.tensor([len(r) for r in responses], dtype=torch.int64),
        "cu_seqlens": cu_seqlens,
        "logp_slots": torch.from_numpy(slots),
        "logp_width": width,
        "max_seqlen": max(lengths),
    }
    chosen = [ex.get("opponent_chosen_logp") for ex in examples]
    rejected = [ex.get("opponent_rejected_logp") for ex in examples]
    present = [c is not None and r is not None for c, r in zip(chosen, rejected)]
    if all(present):
        batch["opponent_logps"] = torch.tensor(chosen + rejected, dtype=torch.float32)
    elif any(present):
        raise ValueError("some pairs of the batch have opponent log-probs and some do not")
    return batch


def pad_packed(batch: dict, length: int, pad_id: int) -> dict:
    """A packed micro-batch lengthened to `length` tokens: the extra tokens extend the padding tail (a
    sequence of its own, so they attend to nothing real)."""
    t = batch["input_ids"].shape[1]
    extra = length - t
    if extra < 0:
        raise AssertionError(f"a packed micro-batch of {t} tokens exceeds {length}")
    if extra == 0:
        return batch
    sequences = batch["num_response_tokens"].numel()
    real = batch["cu_seqlens"][sequences]
    padded = dict(batch)
    padded["input_ids"] = torch.cat([batch["input_ids"], torch.full((1, extra), pad_id, dtype=batch["input_ids"].dtype)], 1)
    padded["labels"] = torch.cat([batch["labels"], torch.full((1, extra), IGNORE_INDEX, dtype=batch["labels"].dtype)], 1)
    tail = torch.arange(length - real, dtype=batch["position_ids"].dtype).unsqueeze(0)
    padded["position_ids"] = torch.cat([batch["position_ids"][:, :real], tail], 1)
    padded["cu_seqlens"] = [*batch["cu_seqlens"][: sequences + 1], length]
    return padded

