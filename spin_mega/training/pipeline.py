"""The trainer's view of the pipeline layout: checked before start-up, and the per-chunk pieces megatron's
schedules want (one DDP wrapper and one data iterator per model chunk under interleaving)."""

from __future__ import annotations

from typing import Iterable, Optional

from spin_mega.config import ModelConfig, SpinConfig
from spin_mega.errors import ConfigError, SpinMegaError
from spin_mega.parallel.layout import PipelineLayout, check_expert_parallel, check_tensor_parallel, resolve_layout


def start_model_shape(cfg: SpinConfig) -> ModelConfig:
    """The model shape the run will train, read from files only (no process group needed)."""
    from spin_mega.models import checkpoint as model_ckpt
    from spin_mega.models.hf_config import resolve_model_config

    if cfg.start_model and model_ckpt.is_model_checkpoint(cfg.start_model):
        return model_ckpt.read_meta(cfg.start_model)[0]
    return resolve_model_config(cfg.model, cfg.start_model)


def check_layout(cfg: SpinConfig) -> PipelineLayout:
    """Refuses a TP x PP x VPP (x EP x expert TP) layout the model cannot be split into (ConfigError, one
    sentence)."""
    p = cfg.parallel
    model = start_model_shape(cfg)
    check_tensor_parallel(model.num_attention_heads, model.num_query_groups, p.tensor_parallel)
    check_expert_parallel(
        model.num_experts, model.moe_router_topk, p.expert_parallel, p.expert_tensor_parallel, model.moe_ffn_hidden_size
    )
    if model.is_moe and p.tensor_parallel > 1 and not p.sequence_parallel:
        raise ConfigError(
            f"a mixture-of-experts model at tensor parallel {p.tensor_parallel} needs parallel.sequence_parallel: "
            "true (megatron-core does not train its MoE layers under TP without it)"
        )
    return resolve_layout(
        model.num_layers, p.pipeline_parallel, p.virtual_pipeline_parallel, p.first_stage_layers, p.last_stage_layers
    )


def check_microbatches(layout: PipelineLayout, num_microbatches: int) -> None:
    """megatron-core's interleaved schedule runs micro-batches in groups of `pipeline_parallel`."""
    p = layout.pipeline_parallel
    if layout.interleaved and num_microbatches % p:
        raise SpinMegaError(
            f"the interleaved pipeline schedule needs the micro-batches per step ({num_microbatches}: "
            f"train.global_batch_size / (micro_batch_size x data-parallel size)) to be a multiple of "
            f"pipeline_parallel {p}"
        )


def pad_microbatches(batches: list, layout: PipelineLayout) -> list:
    """Forward-only passes (the opponent precompute) take any number of micro-batches without interleaving;
    with it, repeats of the first batch fill the last group (their results are written twice, identically)."""
    p = layout.pipeline_parallel
    if not layout.interleaved or not batches or len(batches) % p == 0:
        return batches
    return batches + [batches[0]] * (p - len(batches) % p)


def wrap_chunks(modules: list, config, ddp_config) -> list:
    """One megatron DDP wrapper per chunk; only the first keeps gradient buckets for overlapped reduction,
    as megatron's own training does."""
    from megatron.core.distributed import DistributedDataParallel

    return [
        DistributedDataParallel(config=config, ddp_config=ddp_config, module=module, disable_bucketing=i > 0)
        for i, module in enumerate(modules)
    ]


def no_sync_func(chunks: list):
    return chunks[0].no_sync if len(chunks) == 1 else [chunk.no_sync for chunk in chunks]


def data_iterators(
    micro_batches: Iterable[dict], chunks: list, pad_id: int, fixed_length: Optional[int] = None, equal_across_ranks: bool = False
):
    """One iterator without interleaving. With it, the schedule draws each micro-batch once per chunk, so
    each chunk gets its own iterator over the same micro-batches, all of one length: `fixed_length` when
    given (each chunk then re-reads `micro_batches`, so nothing is held: the opponent precompute over the
    whole data set), else the step's longest (the step's micro-batches are held, a few per rank).

    Equal lengths because megatron-core 0.16 exchanges the shapes of variable-length activations with
    batched p2p even when the tensors go unbatched; at PP 2 a stage's previous and next peer are the same
    rank, and a shape sent backwards was matched to one expected forwards (a [40, b, h] gradient met a
    [48, b, h] output). Equal shapes make that crossing harmless.

    `equal_across_ranks` (MoE with the all-gather token dispatcher over expert-parallel ranks, which gathers
    equal token counts): every micro-batch of every rank has one length, `fixed_length` when given, else the
    longest of the step over all ranks (one all-reduce)."""
    if equal_across_ranks:
        if fixed_length is not None:
            return _each_chunk(chunks, lambda: (_pad_to(batch, fixed_length, pad_id) for batch in micro_batches))
        batches = list(micro_batches)
        length = _longest_over_ranks(max((batch["input_ids"].shape[1] for batch in batches), default=0))
        batches = [_pad_to(batch, length, pad_id) for batch in batches]
        return _each_chunk(chunks, lambda: iter(batches))
    if len(chunks) == 1:
        return iter(micro_batches)
    if fixed_length is not None:
        return [(_pad_to(batch, fixed_length, pad_id) for batch in micro_batches) for _ in chunks]
    batches = list(micro_batches)
    length = max(batch["input_ids"].shape[1] for batch in batches)
    batches = [_pad_to(batch, length, pad_id) for batch in batches]
    return [iter(batches) for _ in chunks]


def _each_chunk(chunks: list, make):
    return make() if len(chunks) == 1 else [make() for _ in chunks]


def _longest_over_ranks(length: int) -> int:
    import torch
    import torch.distributed as dist

    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")
    longest = torch.tensor([length], dtype=torch.int64, device=device)
    dist.all_reduce(longest, op=dist.ReduceOp.MAX)
    return int(longest.item())


def _pad_to(batch: dict, length: int, pad_id: int) -> dict:
    import torch
    import torch.nn.functional as F

    from spin_mega.data.batching import IGNORE_INDEX
    from spin_mega.data.packing import pad_packed

    if "cu_seqlens" in batch:
        return pad_packed(batch, length, pad_id)
    extra = length - batch["input_ids"].shape[1]
    if extra < 0:
        raise AssertionError(f"a micro-batch of length {batch['input_ids'].shape[1]} exceeds {length}")
    if extra == 0:
        return batch
    padded = dict(batch)
    padded["input_ids"] = F.pad(batch["input_ids"], (0, extra), value=pad_id)
    padded["labels"] = F.pad(batch["labels"], (0, extra), value=IGNORE_INDEX)
    rows = batch["position_ids"].shape[0]
    padded["position_ids"] = torch.arange(length, dtype=batch["position_ids"].dtype).expand(rows, length).contiguous()
    return padded
