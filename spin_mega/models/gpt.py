"""Megatron GPTModel for the Llama / Mistral / Qwen2 / Qwen3 family (RMSNorm, SwiGLU, RoPE, GQA; Qwen3's
per-head query/key RMSNorm)."""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from megatron.core import parallel_state
from megatron.core.models.gpt import GPTModel
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.transformer.spec_utils import ModuleSpec
from megatron.core.transformer.transformer_block import TransformerBlockSubmodules, get_num_layers_to_build
from megatron.core.transformer.transformer_config import TransformerConfig

from spin_mega.config import ModelConfig
from spin_mega.models import moe
from spin_mega.models.attention import SDPAttention
from spin_mega.models.norm import RMSNorm
from spin_mega.parallel.layout import check_expert_parallel, check_tensor_parallel, resolve_layout

# Megatron pads the vocabulary so each TP shard is a multiple of this (efficient GEMM tiles).
VOCAB_DIVISIBLE_BY = 128


def padded_vocab_size(vocab_size: int, tensor_parallel: int, divisible_by: int = VOCAB_DIVISIBLE_BY) -> int:
    multiple = divisible_by * tensor_parallel
    return int(math.ceil(vocab_size / multiple) * multiple)


def have_transformer_engine() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import transformer_engine  # noqa: F401
    except ImportError:
        return False
    return True


def layer_spec(config: TransformerConfig) -> ModuleSpec:
    """Transformer Engine layers when importable (GPU); otherwise Megatron's local layers with SDPA
    attention, never the unfused attention that materialises the score matrix, and an RMSNorm that
    supports sequence parallelism (models/norm.py), also for Qwen3's query/key norms. MoE layers for a
    config with experts (models/moe.py)."""
    if have_transformer_engine():
        from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_with_transformer_engine_spec

        if config.num_moe_experts:
            return moe.te_layer_spec(config)
        return get_gpt_layer_with_transformer_engine_spec(qk_layernorm=config.qk_layernorm)
    if config.num_moe_experts:
        spec = moe.local_layer_spec(config)
    else:
        spec = get_gpt_layer_local_spec(normalization="RMSNorm", qk_layernorm=config.qk_layernorm)
    attention = spec.submodules.self_attention.submodules
    attention.core_attention = SDPAttention
    if config.qk_layernorm:
        # Megatron's torch norm refuses sequence parallelism even here, where it normalises whole heads.
        attention.q_layernorm = RMSNorm
        attention.k_layernorm = RMSNorm
    spec.submodules.input_layernorm = RMSNorm
    spec.submodules.pre_mlp_layernorm = RMSNorm
    return spec


RECOMPUTE_MODES = ("none", "selective", "full")


def block_spec(config: TransformerConfig, vp_stage: Optional[int] = None):
    """The layer spec, or without Transformer Engine this stage's block spec, whose final norm is ours too
    (Megatron's default final norm for a bare layer spec is the torch norm that refuses sequence parallelism)."""
    layer = layer_spec(config)
    if have_transformer_engine():
        return layer
    return TransformerBlockSubmodules(layer_specs=[layer] * get_num_layers_to_build(config, vp_stage=vp_stage), layer_norm=RMSNorm)


def transformer_config(
    model: ModelConfig,
    tensor_parallel: int = 1,
    pipeline_parallel: int = 1,
    dtype: torch.dtype = torch.float32,
    sequence_parallel: bool = False,
    recompute: str = "none",
    virtual_pipeline: int = 1,
    first_stage_layers: Optional[int] = None,
    last_stage_layers: Optional[int] = None,
    expert_parallel: int = 1,
    expert_tensor_parallel: int = 1,
) -> TransformerConfig:
    """Raises ConfigError (one sentence) for a layout the model cannot be split into."""
    check_tensor_parallel(model.num_attention_heads, model.num_query_groups, tensor_parallel)
    check_expert_parallel(
        model.num_experts, model.moe_router_topk, expert_parallel, expert_tensor_parallel, model.moe_ffn_hidden_size
    )
    layout = resolve_layout(model.num_layers, pipeline_parallel, virtual_pipeline, first_stage_layers, last_stage_layers)
    if recompute not in RECOMPUTE_MODES:
        raise ValueError(f"recompute must be one of {RECOMPUTE_MODES}, not {recompute!r}")
    on_gpu = torch.cuda.is_available()
    kwargs = dict(
        num_layers=model.num_layers,
        hidden_size=model.hidden_size,
        ffn_hidden_size=model.ffn_hidden_size,
        num_attention_heads=model.num_attention_heads,
        num_query_groups=model.num_query_groups,
        kv_channels=model.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=model.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=model.qkv_bias,
        qk_layernorm=model.qk_layernorm,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        apply_rope_fusion=False,
        masked_softmax_fusion=False,
        gradient_accumulation_fusion=False,
        persist_layer_norm=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        init_method_std=model.init_std,
        tensor_model_parallel_size=tensor_parallel,
        **layout.megatron_kwargs(),
        sequence_parallel=sequence_parallel and tensor_parallel > 1,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
        use_cpu_initialization=not on_gpu,
        attention_softmax_in_fp32=True,
        cross_entropy_loss_fusion=False,
        **moe.transformer_kwargs(model, expert_parallel, expert_tensor_parallel, dtype, have_transformer_engine()),
    )
    if recompute == "full":
        # Every layer keeps only its input and is re-run in the backward pass.
        kwargs.update(recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    elif recompute == "selective":
        # megatron-core's default selective set: the core attention (here SDPA or flash-attn) only.
        kwargs.update(recompute_granularity="selective", recompute_modules=["core_attn"])
    return TransformerConfig(**kwargs)


class SpinGPTModel(GPTModel):
    """GPTModel whose last stage returns final-normed hidden states [s, b, h] instead of logits.

    SPIN needs only the labels' log-probs; returning hidden states lets the log-prob head fuse the output
    projection with the log-softmax (no full logits in memory) or run the vocab-parallel kernel on the
    output layer's sharded logits, whichever the config selects.
    """

    def _postprocess(self, hidden_states, *args, **kwargs):
        return hidden_states

    def output_weight(self) -> torch.Tensor:
        if self.share_embeddings_and_output_weights:
            return self.shared_embedding_or_output_weight()
        return self.output_layer.weight

    def vocab_parallel_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """[s, b, h] -> [s, b, V_padded / TP] through the output layer (handles sequence parallelism)."""
        weight = self.shared_embedding_or_output_weight() if self.share_embeddings_and_output_weights else None
        logits, _ = self.output_layer(hidden_states, weight=weight, runtime_gather_output=False)
        return logits


def build_model(
    model: ModelConfig,
    config: TransformerConfig,
    vocab_size: Optional[int] = None,
    pre_process: Optional[bool] = None,
    post_process: Optional[bool] = None,
    vp_stage: Optional[int] = None,
) -> SpinGPTModel:
    """The model chunk of this pipeline stage (all of it without PP); `vp_stage` picks the chunk of an
    interleaved stage (models/chunks.py builds them all)."""
    if pre_process is None:
        pre_process = parallel_state.is_pipeline_first_stage(ignore_virtual=False, vp_stage=vp_stage)
    if post_process is None:
        post_process = parallel_state.is_pipeline_last_stage(ignore_virtual=False, vp_stage=vp_stage)
    padded = vocab_size or padded_vocab_size(model.vocab_size, config.tensor_model_parallel_size)
    gpt = SpinGPTModel(
        config=config,
        transformer_layer_spec=block_spec(config, vp_stage),
        vocab_size=padded,
        max_sequence_length=model.max_position_embeddings,
        pre_process=pre_process,
        post_process=post_process,
        parallel_output=True,
        share_embeddings_and_output_weights=model.tie_word_embeddings,
        position_embedding_type="rope",
        rotary_base=int(model.rope_theta),
        rope_scaling=False,
        vp_stage=vp_stage,
    )
    if model.rope_theta != int(model.rope_theta) or model.rope_scaling:
        _set_rotary_frequencies(gpt, model)
    if torch.cuda.is_available():
        gpt.cuda(torch.cuda.current_device())
    return gpt


def _set_rotary_frequencies(gpt: SpinGPTModel, model: ModelConfig) -> None:
    """Megatron's constructor takes an integer base and hard-codes Llama-3.1's scaling constants; recompute
    the inverse frequencies for a fractional theta or other Llama-3 scaling constants (e.g. Llama-3.2)."""
    rope = gpt.rotary_pos_emb
    dim = rope.inv_freq.numel() * 2
    inv_freq = 1.0 / (
        model.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=rope.inv_freq.device) / dim)
    )
    if model.rope_scaling:
        s = model.rope_scaling
        inv_freq = rope._apply_scaling(
            inv_freq,
            factor=s["factor"],
            low_freq_factor=s["low_freq_factor"],
            high_freq_factor=s["high_freq_factor"],
            original_max_position_embeddings=s["original_max_position_embeddings"],
        )
    rope.inv_freq = inv_freq
