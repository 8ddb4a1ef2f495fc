"""Per-sequence response log-prob sums from the last pipeline stage's hidden states.

Three interchangeable implementations, chosen by `train.logprobs` (`auto` is fused_linear):
- fused_linear: the kernel fusing the output projection with the log-softmax; full logits never exist.
- triton: the output layer's vocab-parallel logits, then the vocab-parallel log-prob kernel.
- reference: logits gathered over TP and the float64 reference (slow; for checking the others).
The kernels run as Triton on GPU and as their chunked PyTorch fallback on CPU (spin_mega.kernels). All
exclude Megatron's vocab padding from the softmax, so log-probs match HF transformers and vLLM.
"""

from __future__ import annotations

import torch
from megatron.core import parallel_state, tensor_parallel

IGNORE_INDEX = -100


def resolve_impl(name: str) -> str:
    return "fused_linear" if name == "auto" else name


def _reference_token_logprobs(logits: torch.Tensor, labels: torch.Tensor, vocab_size: int) -> torch.Tensor:
    from spin_mega.kernels import reference_token_logprobs

    full = tensor_parallel.gather_from_tensor_model_parallel_region(logits)
    return reference_token_logprobs(full, labels, ignore_index=IGNORE_INDEX, vocab_size=vocab_size).float()


def response_rows(labels: torch.Tensor) -> torch.Tensor:
    """Indices into the [s * b] (sequence-major, as the model's [s, b, h] output flattens) positions that
    carry a label. Computed from the host copy of the batch's labels [b, s], once per micro-batch, so that
    selecting them costs the device no synchronisation."""
    return (labels.t().reshape(-1) != IGNORE_INDEX).nonzero().squeeze(1)


def check_label_range(labels: torch.Tensor, vocab_size: int) -> None:
    """The kernels' label check, done once per batch on the host copy instead of per call on the device
    (where it costs a device-to-host synchronisation)."""
    bad = (labels != IGNORE_INDEX) & ((labels < 0) | (labels >= vocab_size))
    if bool(bad.any()):
        raise ValueError(
            f"labels must be in [0, {vocab_size}) or equal {IGNORE_INDEX}; found {int(bad.sum())} out-of-range, "
            f"e.g. {int(labels[bad][0])}"
        )


def _response_hidden(model, hidden: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """hidden [s, b, h] (sequence-sharded under sequence parallelism) -> [n, h], the rows that carry a
    label, identical on every tensor-parallel rank (the labels are). The output layer and the log-prob
    kernel then see response tokens only: prompt and padding rows cost neither the output GEMM nor the
    vocabulary pass. Under sequence parallelism the full sequence is gathered first; the gather's
    backward only splits, because every consumer below reduces d hidden over the TP group itself (the
    fused kernel's all-reduce, or copy_to_tensor_model_parallel_region before the logits GEMM)."""
    if model.config.sequence_parallel:
        hidden = tensor_parallel.gather_from_sequence_parallel_region(hidden, tensor_parallel_output_grad=False)
    s, b, h = hidden.shape
    return hidden.reshape(s * b, h).index_select(0, rows)


def sequence_logprobs(
    model,
    hidden: torch.Tensor,
    labels: torch.Tensor,
    vocab_size: int,
    impl: str,
    rows: torch.Tensor | None = None,
    segments: tuple[torch.Tensor, int, int] | None = None,
) -> torch.Tensor:
    """hidden [s, b, h] (sequence-parallel shards allowed), labels [b, s] -> float32 [b] sums over
    response tokens (labels != -100). `rows`: `response_rows(labels)` on the same device, precomputed
    from the host labels (default: computed here, at the cost of one device synchronisation). Labels
    must already be range-checked (`check_label_range`): the kernels are called without their per-call
    check.

    A packed micro-batch (b = 1, many sequences in the row) passes `segments` = (slots, sequences, width)
    from `collate_packed`: the i-th labelled position belongs to sum slots[i] // width, and the result is
    float32 [sequences]. Computed on the device from host-made indices: no synchronisation per sequence,
    and each sum adds its sequence's terms in position order, as the padded layout does."""
    b, s = labels.shape
    if rows is None:
        rows = response_rows(labels)
    flat_labels = labels.t().reshape(-1).index_select(0, rows)
    tp_group = parallel_state.get_tensor_model_parallel_group() if parallel_state.get_tensor_model_parallel_world_size() > 1 else None
    hidden_rows = _response_hidden(model, hidden, rows)
    impl = resolve_impl(impl)
    if impl == "fused_linear":
        from spin_mega.kernels import fused_linear_token_logprobs

        token_logps = fused_linear_token_logprobs(
            hidden_rows, model.output_weight(), flat_labels, ignore_index=IGNORE_INDEX, group=tp_group,
            vocab_size=vocab_size, range_check=False,
        )
    else:
        # The output layer's GEMM without its sequence-parallel input gather (done above, rows only):
        # forward identity, backward all-reduce of d hidden over TP, as ColumnParallelLinear does.
        logits = torch.matmul(tensor_parallel.copy_to_tensor_model_parallel_region(hidden_rows), model.output_weight().t())
        if impl == "triton":
            from spin_mega.kernels import token_logprobs, vocab_parallel_token_logprobs

            if tp_group is not None:
                token_logps = vocab_parallel_token_logprobs(
                    logits, flat_labels, tp_group, vocab_size=vocab_size, ignore_index=IGNORE_INDEX, range_check=False
                )
            else:
                token_logps = token_logprobs(logits, flat_labels, ignore_index=IGNORE_INDEX, vocab_size=vocab_size, range_check=False)
        elif impl == "reference":
            token_logps = _reference_token_logprobs(logits, flat_labels, vocab_size)
        else:
            raise ValueError(f"unknown log-prob implementation {impl!r}")
    if segments is not None:
        slots, sequences, width = segments
        dense = torch.zeros(sequences * width, dtype=torch.float32, device=token_logps.device)
        return dense.index_put((slots,), token_logps.float()).view(sequences, width).sum(dim=1)
    # Back to [s, b] positions (0 elsewhere) and summed over the sequence in position order: the same
    # sums, in the same order, as over the full [s, b] grid.
    dense = torch.zeros(s * b, dtype=torch.float32, device=token_logps.device).index_put((rows,), token_logps.float())
    return dense.view(s, b).sum(dim=0)
