"""Mixture-of-experts layers (Qwen3-MoE, Mixtral) on megatron-core: the layer spec, the TransformerConfig fields
and the choices that depend on the machine.

Routing. HF's Mixtral and Qwen3-MoE (norm_topk_prob=True) take a softmax over all experts, keep the top k and
renormalise them, which equals megatron-core's default: top k of the logits, softmax over those k. Qwen3-MoE
with norm_topk_prob=False keeps the full softmax's probabilities of the chosen experts: megatron-core's
`moe_router_pre_softmax`. The router's GEMM runs in fp32 (`moe_router_dtype`), as megatron-core advises for
16-bit training; in fp32 it changes nothing.

Load balancing. megatron-core's switch-transformer loss with the HF config's `router_aux_loss_coef` is attached
to each MoE layer's routing probabilities in training mode with gradients enabled; the schedule scales its
gradient like the main loss (1 / micro-batches). Per layer, as Megatron-LM and Megatron-Bridge do; HF instead
computes one loss over all layers' logits pooled, so with L MoE layers the total pull is about L times HF's.

Token dispatch. The all-gather dispatcher runs on gloo (CPU); the all-to-all one needs CUDA streams, so it is
the GPU choice. Experts run as one grouped GEMM when Transformer Engine (TEGroupedMLP) or the `grouped_gemm`
package (megatron-core's GroupedMLP) is there with CUDA, else one GEMM per local expert (SequentialMLP). All
three save the same checkpoint tensors: experts stacked under `decoder.layers.mlp.experts.experts.linear_fc{1,2}.weight`
with a layer and an expert axis, so a checkpoint loads at any EP / ETP / TP / PP and with either kind of expert.
"""

from __future__ import annotations

import contextlib

import torch
from megatron.core.transformer.spec_utils import ModuleSpec

from spin_mega.config import ModelConfig

# The key megatron-core's local spec maps the pre-MLP norm to in checkpoints: right for a dense MLP, where
# Transformer Engine fuses that norm into linear_fc1, wrong for an MoE layer, whose Transformer Engine spec
# keeps a separate `pre_mlp_layernorm`. Dropping the mapping gives the local MoE layer the TE checkpoint's name.
_PRE_MLP_NORM_KEY = "pre_mlp_layernorm."
IGNORE_INDEX = -100  # the labels' "no label" value (spin_mega.data.batching)


def have_grouped_gemm(transformer_engine: bool) -> bool:
    """A grouped GEMM for the experts is available: Transformer Engine's (`transformer_engine`: TE importable with
    CUDA, models/gpt.py's have_transformer_engine) or the `grouped_gemm` package's, on CUDA."""
    if not torch.cuda.is_available():
        return False
    from megatron.core.transformer.moe import grouped_gemm_util

    return transformer_engine or grouped_gemm_util.grouped_gemm_is_available()


def token_dispatcher() -> str:
    """all-to-all on GPU (NCCL); all-gather on CPU, where gloo runs it and the all-to-all's CUDA streams do not exist."""
    return "alltoall" if torch.cuda.is_available() else "allgather"


def needs_equal_token_counts(model: ModelConfig, expert_parallel: int, expert_tensor_parallel: int, tensor_parallel: int) -> bool:
    """The all-gather dispatcher gathers tokens over the expert-TP x EP ranks, which must then hold equally
    many: once that group reaches beyond a tensor-parallel group it spans data-parallel ranks, whose
    micro-batches differ in length, so the trainer pads them to a common length."""
    return (
        model.is_moe
        and token_dispatcher() == "allgather"
        and (expert_parallel > 1 or expert_tensor_parallel > tensor_parallel)
    )


def allow_router_without_transformer_engine() -> None:
    """megatron-core 0.16.1's router GEMM (`moe_utils.RouterGatingLinearFunction`) tests `te_general_gemm is not
    None`, but the name is only bound when Transformer Engine imports: without TE the router raises NameError.
    Binding it to None selects the router's own torch GEMM, which is what the test intends. Only when TE is
    missing; with TE the name is TE's GEMM and stays."""
    from megatron.core.transformer.moe import moe_utils

    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None


def transformer_kwargs(
    model: ModelConfig,
    expert_parallel: int = 1,
    expert_tensor_parallel: int = 1,
    dtype: torch.dtype = torch.float32,
    transformer_engine: bool = False,
) -> dict:
    """The TransformerConfig fields of an MoE model (none for a dense one)."""
    if not model.is_moe:
        return {}
    return dict(
        num_moe_experts=model.num_experts,
        moe_ffn_hidden_size=model.moe_ffn_hidden_size,
        moe_router_topk=model.moe_router_topk,
        moe_router_pre_softmax=not model.moe_norm_topk_prob,
        moe_router_score_function="softmax",
        moe_router_load_balancing_type="aux_loss" if model.moe_aux_loss_coeff > 0 else "none",
        moe_aux_loss_coeff=model.moe_aux_loss_coeff,
        moe_router_dtype="fp32" if dtype != torch.float32 else None,
        moe_token_dispatcher_type=token_dispatcher(),
        moe_grouped_gemm=have_grouped_gemm(transformer_engine),
        expert_model_parallel_size=expert_parallel,
        expert_tensor_parallel_size=expert_tensor_parallel,
    )


def local_layer_spec(config) -> ModuleSpec:
    """megatron-core's local MoE layer (models/gpt.py puts the project's attention and norms in), its pre-MLP
    norm saved under the Transformer Engine MoE layer's name."""
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec

    allow_router_without_transformer_engine()
    spec = get_gpt_layer_local_spec(
        num_experts=config.num_moe_experts,
        moe_grouped_gemm=config.moe_grouped_gemm,
        qk_layernorm=config.qk_layernorm,
        normalization="RMSNorm",
    )
    spec.submodules.sharded_state_dict_keys_map = {
        k: v for k, v in spec.submodules.sharded_state_dict_keys_map.items() if k != _PRE_MLP_NORM_KEY
    }
    return spec


def te_layer_spec(config) -> ModuleSpec:
    from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

    return get_gpt_layer_with_transformer_engine_spec(
        num_experts=config.num_moe_experts, moe_grouped_gemm=config.moe_grouped_gemm, qk_layernorm=config.qk_layernorm
    )


def _router_buffers(chunks) -> list[torch.Tensor]:
    """The routers' running state: token counts for the expert bias and the global-batch balancing loss."""
    from megatron.core.transformer.moe.router import Router

    names = ("local_tokens_per_expert", "expert_bias", "global_tokens_per_expert", "ga_steps")
    buffers = []
    for chunk in chunks:
        for module in chunk.modules():
            if isinstance(module, Router):
                buffers += [b for b in (getattr(module, n, None) for n in names) if b is not None]
    return buffers


@contextlib.contextmanager
def isolated_router_state(*chunks):
    """Around a forward pass of the opponent (theta_t, frozen): whatever it routes leaves megatron's aux-loss
    tracker (read for the `aux_loss` metric) and the routers' running counts as the policy's passes left them.

    The opponent runs without gradients and in eval mode, in which megatron-core computes no balancing loss
    and records nothing; this makes that hold whatever mode a caller runs it in: SPIN's balancing loss belongs to
    the policy alone."""
    from megatron.core.transformer.moe.moe_utils import get_moe_layer_wise_logging_tracker

    tracker = get_moe_layer_wise_logging_tracker()
    saved_tracker = {name: entry["values"].clone() for name, entry in tracker.items()}
    buffers = _router_buffers([c for c in chunks if c is not None])
    saved_buffers = [b.clone() for b in buffers]
    try:
        yield
    finally:
        for name in list(tracker):
            if name in saved_tracker:
                tracker[name]["values"].copy_(saved_tracker[name])
            else:
                del tracker[name]
        for buffer, saved in zip(buffers, saved_buffers, strict=True):
            buffer.copy_(saved)


def routing_padding_mask(model_chunk, labels: torch.Tensor):
    """[b, s] True at right padding (after each row's last labelled position and the token it predicts), for
    an MoE chunk; None for a dense one. megatron-core's router leaves padding out of the balancing loss's token
    statistics with it, so the loss, like HF's, measures the load of real tokens only, and does not depend on how
    far a layout pads (the all-gather dispatcher pads micro-batches to a common length).

    megatron-core 0.16 splits the mask over sequence-parallel ranks only on the first pipeline stage; later
    stages get it split here."""
    if not model_chunk.config.num_moe_experts:
        return None
    positions = torch.arange(labels.shape[1], device=labels.device)
    last_real = ((labels != IGNORE_INDEX) * (positions + 1)).amax(dim=1)  # the last label's index + 1
    mask = positions.unsqueeze(0) > last_real.unsqueeze(1)
    if model_chunk.config.sequence_parallel and not model_chunk.pre_process:
        from megatron.core import tensor_parallel

        mask = tensor_parallel.scatter_to_sequence_parallel_region(mask.t().contiguous()).t().contiguous()
    return mask
