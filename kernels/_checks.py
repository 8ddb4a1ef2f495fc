"""Argument checks shared by every entry point: a wrong label must raise, never become a wrong number."""

from __future__ import annotations

import torch

SUPPORTED_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def check_logits(logits: torch.Tensor, name: str = "logits") -> None:
    if logits.dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"{name} must be bfloat16, float16 or float32, got {logits.dtype}")
    if logits.dim() < 1 or logits.shape[-1] == 0:
        raise ValueError(f"{name} must have a non-empty last (vocabulary) dimension, got shape {tuple(logits.shape)}")


def resolve_vocab_size(vocab_size: int | None, total_columns: int) -> int:
    """Number of valid columns; the rest are Megatron's vocabulary padding."""
    if vocab_size is None:
        return total_columns
    vocab_size = int(vocab_size)
    if not 0 < vocab_size <= total_columns:
        raise ValueError(f"vocab_size must be in [1, {total_columns}] (the number of logit columns), got {vocab_size}")
    return vocab_size


def check_labels(
    labels: torch.Tensor, batch_shape: torch.Size, vocab_size: int, ignore_index: int, range_check: bool = True
) -> torch.Tensor:
    """Validate labels against `vocab_size` and return them as int64.

    The range check costs one reduction and one device-to-host sync; `range_check=False` skips it for
    callers that checked the labels once on the host (the trainer, once per batch).
    """
    if labels.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise ValueError(f"labels must be an integer tensor, got {labels.dtype}")
    if labels.shape != batch_shape:
        raise ValueError(f"labels shape {tuple(labels.shape)} must equal the logits shape without its last dimension {tuple(batch_shape)}")
    labels = labels.long()
    if not range_check:
        return labels
    bad = (labels != ignore_index) & ((labels < 0) | (labels >= vocab_size))
    if bool(bad.any()):
        example = int(labels[bad][0])
        raise ValueError(
            f"labels must be in [0, {vocab_size}) or equal ignore_index={ignore_index}; "
            f"found {int(bad.sum())} out-of-range label(s), e.g. {example}"
        )
    return labels
