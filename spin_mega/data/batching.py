"""Micro-batches of SPIN pairs: the collator and the length-bucketed, data-parallel, resumable sampler."""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import torch

from spin_mega.errors import DataError

IGNORE_INDEX = -100


def collate_pairs(
    examples: Sequence[Mapping[str, Any]] | Mapping[str, Sequence[Any]], pad_id: int, pad_to_multiple_of: Optional[int] = 8
) -> dict[str, torch.Tensor]:
    """One batch of 2B sequences for B pairs: rows 0..B-1 are prompt+chosen, rows B..2B-1 prompt+rejected
    in the same pair order, so one forward pass serves both and the loss pairs row i with row B+i.

    Returns `input_ids` [2B, T] (right-padded with `pad_id`), `labels` [2B, T] with labels[:, t] the token
    at t+1 where that token belongs to the response and -100 elsewhere (prompt, padding, last column),
    so that per-token log-probs of the logits at t against labels[:, t] sum to log p(response | prompt);
    `position_ids` [2B, T]; `num_response_tokens` [2B]; and, when every pair has them,
    `opponent_logps` [2B] float32 (chosen then rejected). T is the longest sequence rounded up to
    `pad_to_multiple_of` (pass a multiple of the tensor-parallel size when sequence parallelism splits T).

    `examples` is a list of rows, or the column dict that `dataset[list_of_indices]` returns (one Arrow
    read for the whole micro-batch instead of one per pair).
    """
    if isinstance(examples, Mapping):
        examples = [dict(zip(examples, values)) for values in zip(*examples.values())]
    if not examples:
        raise ValueError("collate_pairs needs at least one pair")
    b = len(examples)
    prompts = [list(ex["prompt_ids"]) for ex in examples]
    for i, prompt in enumerate(prompts):
        # The first response token is predicted from the last prompt token; without one it has no label.
        if not prompt:
            raise ValueError(f"pair {i} of the batch has an empty prompt")
    responses = [list(ex[key]) for key in ("chosen_ids", "rejected_ids") for ex in examples]
    for j, response in enumerate(responses):
        if not response:
            side = "chosen" if j < b else "rejected"
            raise ValueError(f"pair {j % b} of the batch has an empty {side} response")
    prompts = prompts + prompts
    lengths = [len(p) + len(r) for p, r in zip(prompts, responses)]
    t = max(lengths)
    if pad_to_multiple_of and pad_to_multiple_of > 1:
        t = -(-t // pad_to_multiple_of) * pad_to_multiple_of

    input_ids = np.full((2 * b, t), pad_id, dtype=np.int64)
    labels = np.full((2 * b, t), IGNORE_INDEX, dtype=np.int64)
    for row, (prompt, response) in enumerate(zip(prompts, responses)):
        p, n = len(prompt), len(prompt) + len(response)
        input_ids[row, :p] = prompt
        input_ids[row, p:n] = response
        labels[row, p - 1 : n - 1] = response

    batch = {
        "input_ids": torch.from_numpy(input_ids),
        "labels": torch.from_numpy(labels),
        "position_ids": torch.arange(t, dtype=torch.int64).expand(2 * b, t).contiguous(),
        "num_response_tokens": torch.tensor([len(r) for r in responses], dtype=torch.int64),
    }
    chosen = [ex.get("opponent_chosen_logp") for ex in examples]
    rejected = [ex.get("opponent_rejected_logp") for ex in examples]
    present = [c is not None and r is not None for c, r in zip(chosen, rejected)]
    if all(present):
        batch["opponent_logps"] = torch.tensor(chosen + rejected, dtype=torch.float32)
    elif any(present):
        raise ValueError("some pairs of the batch have opponent log-probs and some do not")
    return batch


def padding_fraction(lengths: Sequence[int] | np.ndarray, micro_batches: Sequence[Sequence[int]]) -> float:
    """The fraction of token slots that are padding when each micro-batch is padded to its longest pair
    (counted on pair lengths, before rounding T up; the chosen/rejected difference within a pair is not
    the sampler's to remove)."""
    lengths = np.asarray(lengths, dtype=np.int64)
    real = padded = 0
    for mb in micro_batches:
        sizes = lengths[np.asarray(mb, dtype=np.int64)]
        real += int(sizes.sum())
        padded += int(sizes.max()) * len(sizes) if len(sizes) else 0
    return 0.0 if padded == 0 else 1.0 - real / padded


class PairBatchSampler:
    """Which pairs each data-parallel rank trains on at each optimizer step.

    Per epoch e, the pairs are permuted with (seed, e); the first `steps_per_epoch * global_batch_size`
    of them are used and the rest (fewer than one global batch) are dropped for that epoch, so that every
    step has a full global batch and the loss scale never changes; different pairs are dropped each
    epoch. The used pairs are split into `num_buckets` length quantiles; each bucket, in its shuffled
    order, is cut into micro-batches of `micro_batch_size` pairs (the few left over in each bucket are
    pooled, sorted by length and cut the same way); the micro-batches are then shuffled and dealt out
    `dp_size * micro_batches_per_step` per step. Within a step they go to ranks longest-first in snake
    order, which evens the padded tokens per rank so no rank idles at the gradient all-reduce.

    `num_buckets` trades padding for variety: 1 is plain random batching; more buckets pad less but put
    the same neighbours together more often (at len(lengths) it is a sort with random tie-breaks). Which
    pairs share a micro-batch does not change the gradient (the loss is a per-pair mean over the global
    batch); the shuffled order of micro-batches keeps the global batches random.

    `microbatches_for_step(step)` is a pure function of its arguments (steps count across epochs), so
    resuming at step k is asking for step k; the sampler holds no iterator state.
    """

    def __init__(
        self,
        lengths: Sequence[int] | np.ndarray,
        micro_batch_size: int,
        global_batch_size: int,
        dp_rank: int,
        dp_size: int,
        seed: int,
        num_buckets: int = 8,
    ) -> None:
        self.lengths = np.asarray(lengths, dtype=np.int64)
        if self.lengths.ndim != 1:
            raise ValueError("lengths must be a 1-D sequence of pair lengths")
        if micro_batch_size < 1 or dp_size < 1 or num_buckets < 1:
            raise ValueError("micro_batch_size, dp_size and num_buckets must be at least 1")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} is outside 0..{dp_size - 1}")
        if seed < 0:
            raise ValueError(f"seed must be non-negative, got {seed}")
        if global_batch_size % (micro_batch_size * dp_size):
            raise DataError(
                f"train.global_batch_size ({global_batch_size}) must be a multiple of train.micro_batch_size "
                f"({micro_batch_size}) times the data-parallel size ({dp_size})"
            )
        n = len(self.lengths)
        if n < global_batch_size:
            raise DataError(f"the data has {n} pairs, fewer than one global batch of {global_batch_size}")
        self.micro_batch_size = micro_batch_size
        self.global_batch_size = global_batch_size
        self.dp_rank = dp_rank
        self.dp_size = dp_size
        self.seed = seed
        self.num_buckets = num_buckets
        self.micro_batches_per_step = global_batch_size // (micro_batch_size * dp_size)
        self.steps_per_epoch = n // global_batch_size
        # Equal-count buckets by rank, not by value, so that ties (many pairs of one length) cannot leave
        # one bucket holding most of the data.
        order = np.argsort(self.lengths, kind="stable")
        self._bucket = np.empty(n, dtype=np.int64)
        self._bucket[order] = np.arange(n) * num_buckets // n
        self._cached: Optional[tuple[int, np.ndarray]] = None

    def steps_for_epochs(self, epochs: float) -> int:
        """Optimizer steps in `epochs` (fractional epochs allowed), at least one."""
        return max(1, math.floor(epochs * self.steps_per_epoch))

    def epoch_of(self, step: int) -> int:
        return step // self.steps_per_epoch

    def _epoch_plan(self, epoch: int) -> np.ndarray:
        """[steps_per_epoch, dp_size, micro_batches_per_step, micro_batch_size] pair indices."""
        if self._cached is not None and self._cached[0] == epoch:
            return self._cached[1]
        mbs = self.micro_batch_size
        rng = np.random.default_rng([self.seed, epoch])
        used = rng.permutation(len(self.lengths))[: self.steps_per_epoch * self.global_batch_size]
        by_bucket = used[np.argsort(self._bucket[used], kind="stable")]
        bucket_of = self._bucket[by_bucket]
        full, leftover = [], []
        for start, stop in _runs(bucket_of):
            members = by_bucket[start:stop]
            cut = len(members) // mbs * mbs
            full.append(members[:cut])
            leftover.append(members[cut:])
        rest = np.concatenate(leftover)
        rest = rest[np.argsort(self.lengths[rest], kind="stable")]
        micro = np.concatenate(full + [rest]).reshape(-1, mbs)
        micro = micro[rng.permutation(len(micro))]

        per_step = self.dp_size * self.micro_batches_per_step
        steps = micro.reshape(self.steps_per_epoch, per_step, mbs)
        plan = np.empty((self.steps_per_epoch, self.dp_size, self.micro_batches_per_step, mbs), dtype=np.int64)
        slot = np.arange(per_step)
        round_, pos = slot // self.dp_size, slot % self.dp_size
        rank_of_slot = np.where(round_ % 2 == 0, pos, self.dp_size - 1 - pos)
        for s in range(self.steps_per_epoch):
            cost = self.lengths[steps[s]].max(axis=1)
            ranked = steps[s][np.argsort(-cost, kind="stable")]
            for rank in range(self.dp_size):
                plan[s, rank] = ranked[rank_of_slot == rank]
        self._cached = (epoch, plan)
        return plan

    def microbatches_for_step(self, step: int) -> list[list[int]]:
        """The pair indices this rank uses at optimizer step `step` (0-based, counted across epochs):
        `micro_batches_per_step` lists of `micro_batch_size` indices, longest micro-batch first."""
        if step < 0:
            raise ValueError(f"step must be non-negative, got {step}")
        plan = self._epoch_plan(self.epoch_of(step))
        return plan[step % self.steps_per_epoch, self.dp_rank].tolist()

    def global_batch(self, step: int) -> list[int]:
        """Every pair of optimizer step `step`, over all data-parallel ranks (what packing regroups)."""
        if step < 0:
            raise ValueError(f"step must be non-negative, got {step}")
        return self._epoch_plan(self.epoch_of(step))[step % self.steps_per_epoch].reshape(-1).tolist()

    def padding_fraction(self, micro_batches: Sequence[Sequence[int]]) -> float:
        return padding_fraction(self.lengths, micro_batches)


def _runs(sorted_keys: np.ndarray) -> list[tuple[int, int]]:
    """(start, stop) of each run of equal values in a sorted array."""
    if len(sorted_keys) == 0:
        return []
    edges = np.flatnonzero(np.diff(sorted_keys)) + 1
    starts = np.concatenate([[0], edges])
    stops = np.concatenate([edges, [len(sorted_keys)]])
    return list(zip(starts.tolist(), stops.tolist()))
