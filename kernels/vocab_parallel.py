"""Per-token log-probs with the vocabulary sharded over a process group (Megatron tensor parallelism).

Each rank reduces its own shard to two float32 numbers per token, its partial log-sum-exp and the label
logit if it owns the label (else 0); one all-gather of those 8 bytes per token gives every rank the
global statistics. Transformer Engine ships 12 bytes (max, sum-exp, label logit); a shard's log-sum-exp
carries the max and the sum in one number. The backward needs only the global log-sum-exp saved from the
forward, so it communicates nothing.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from spin_mega.kernels import _ops
from spin_mega.kernels._checks import check_labels, check_logits, resolve_vocab_size


def shard_layout(local_columns: int, group: dist.ProcessGroup | None, vocab_size: int | None) -> tuple[int, int, int]:
    """(global vocab_size, this rank's first global column, this rank's number of valid columns)."""
    rank = dist.get_rank(group) if group is not None else 0
    world = dist.get_world_size(group) if group is not None else 1
    total = resolve_vocab_size(vocab_size, local_columns * world)
    offset = rank * local_columns
    return total, offset, max(0, min(local_columns, total - offset))


# torch 2.13 renamed all_gather_into_tensor (deprecated there) to all_gather_single; 2.11 has only the former.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def _host_side(tensor: torch.Tensor, group: dist.ProcessGroup) -> bool:
    # gloo's CUDA support differs by collective and version; it is never the training backend for GPU
    # tensors, so when it meets one (tests on a single GPU) the few bytes go through host memory.
    return tensor.is_cuda and dist.get_backend(group) == "gloo"


def all_gather_stacked(tensor: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """[...] on each rank -> [world, ...] on every rank, in one collective."""
    world = dist.get_world_size(group)
    if world == 1:
        return tensor.unsqueeze(0)
    host = _host_side(tensor, group)
    src = (tensor.cpu() if host else tensor).contiguous()
    out = torch.empty((world * src.shape[0],) + tuple(src.shape[1:]), dtype=src.dtype, device=src.device)
    _all_gather_single(out, src, group=group)
    out = out.view((world,) + tuple(src.shape))
    return out.to(tensor.device) if host else out


def all_reduce_sum_(tensor: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    if dist.get_world_size(group) == 1:
        return tensor
    if _host_side(tensor, group):
        host = tensor.cpu()
        dist.all_reduce(host, group=group)
        tensor.copy_(host)
    else:
        dist.all_reduce(tensor, group=group)
    return tensor


def global_statistics(
    lse_local: torch.Tensor, label_logit_local: torch.Tensor, group: dist.ProcessGroup | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Whole-vocabulary (lse, label logit) from this rank's shard statistics: one all-gather of [N, 2]."""
    if group is None or dist.get_world_size(group) == 1:
        return lse_local, label_logit_local
    gathered = all_gather_stacked(torch.stack([lse_local, label_logit_local], dim=1), group)
    return _ops.combine_partials(gathered[..., 0], gathered[..., 1])


class VocabParallelTokenLogprobsFunction(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx,
        logits_shard: torch.Tensor,
        labels: torch.Tensor,
        group: dist.ProcessGroup,
        ignore_index: int,
        offset: int,
        n_valid: int,
    ) -> torch.Tensor:
        rows = _ops.rows_view(logits_shard)
        flat_labels = labels.reshape(-1)
        lse_local, label_logit = _ops.forward_stats(
            rows, flat_labels, ignore_index=ignore_index, n_valid=n_valid, label_offset=offset, write_logprob=False
        )
        lse, label_logit = global_statistics(lse_local, label_logit, group)
        ctx.save_for_backward(rows, flat_labels, lse)
        ctx.ignore_index = ignore_index
        ctx.offset = offset
        ctx.n_valid = n_valid
        ctx.logits_shape = logits_shard.shape
        return _ops.finish_logprobs(lse, label_logit, flat_labels, ignore_index).view(labels.shape)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        rows, flat_labels, lse = ctx.saved_tensors
        grad = _ops.backward_grad(
            rows,
            flat_labels,
            lse,
            grad_out.reshape(-1),
            ignore_index=ctx.ignore_index,
            n_valid=ctx.n_valid,
            label_offset=ctx.offset,
        )
        return grad.view(ctx.logits_shape), None, None, None, None, None


def vocab_parallel_token_logprobs(
    logits_shard: torch.Tensor,
    labels: torch.Tensor,
    group: dist.ProcessGroup,
    *,
    vocab_size: int | None = None,
    ignore_index: int = -100,
    range_check: bool = True,
) -> torch.Tensor:
    """float32 log p(label) per token, with logits sharded along the vocabulary over `group`.

    Rank r holds global columns [r * V_local, (r + 1) * V_local) of the logits in `logits_shard`
    [..., V_local]; `labels` [...] are global ids, identical on every rank. `vocab_size` is the global
    number of valid columns (default V_local * world); columns past it are padding at the end of the
    last shard(s) and are excluded. Every rank returns the same values, equal to `token_logprobs` on the
    unsharded logits; the gradient each rank gets is its own shard's, computed without communication.
    Forward: one all-gather of 8 bytes per token. Collective call: every rank of `group` must call it.
    `range_check=False` skips the per-call label range check (see `token_logprobs`).
    """
    check_logits(logits_shard, "logits_shard")
    if labels.device != logits_shard.device:
        raise ValueError(f"labels are on {labels.device} but logits_shard on {logits_shard.device}")
    total, offset, n_valid = shard_layout(logits_shard.shape[-1], group, vocab_size)
    labels = check_labels(labels, logits_shard.shape[:-1], total, ignore_index, range_check)
    return VocabParallelTokenLogprobsFunction.apply(logits_shard, labels, group, int(ignore_index), offset, n_valid)
