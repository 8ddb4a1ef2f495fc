"""Translation between a Hugging Face config.json (Llama, Mistral, Qwen2, Qwen3, Qwen3-MoE, Mixtral) and
spin-mega's ModelConfig."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from spin_mega.config import ModelConfig
from spin_mega.errors import ConfigError

SUPPORTED_MODEL_TYPES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "qwen3_moe": "Qwen3MoeForCausalLM",
    "mixtral": "MixtralForCausalLM",
}


def read_hf_config(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise ConfigError(f"no HF config.json at {path}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path} is not valid JSON: {exc}") from None


def _rope(hf: dict) -> tuple[float, dict | None]:
    # transformers 5 folds rope_theta and rope_scaling into `rope_parameters`; older files have both keys.
    params = hf.get("rope_parameters") or {}
    theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    scaling = hf.get("rope_scaling") or (params if params.get("rope_type", "default") != "default" else None)
    if scaling:
        rope_type = scaling.get("rope_type", scaling.get("type"))
        if rope_type != "llama3":
            raise ConfigError(f"rope scaling type {rope_type!r} is not supported (only 'llama3')")
        scaling = {
            "rope_type": "llama3",
            "factor": float(scaling["factor"]),
            "low_freq_factor": float(scaling.get("low_freq_factor", 1.0)),
            "high_freq_factor": float(scaling.get("high_freq_factor", 4.0)),
            "original_max_position_embeddings": int(scaling.get("original_max_position_embeddings", 8192)),
        }
    return theta, scaling or None


def _moe_fields(hf: dict, model_type: str) -> dict:
    """The mixture-of-experts fields of ModelConfig (empty for a dense family); one sentence on a layout the
    Megatron model cannot take."""
    if model_type == "qwen3_moe":
        if int(hf.get("decoder_sparse_step", 1)) != 1 or hf.get("mlp_only_layers"):
            raise ConfigError(
                "qwen3_moe with dense layers among the MoE ones (decoder_sparse_step != 1 or mlp_only_layers) is "
                "not supported: every layer must be a mixture of experts"
            )
        experts = hf.get("num_experts", hf.get("num_local_experts"))
        fields = dict(
            moe_ffn_hidden_size=int(hf["moe_intermediate_size"]),
            moe_norm_topk_prob=bool(hf.get("norm_topk_prob", True)),
        )
    elif model_type == "mixtral":
        if float(hf.get("router_jitter_noise") or 0.0):
            raise ConfigError("router_jitter_noise is not supported (Megatron's router jitter scales the router input only)")
        experts = hf.get("num_local_experts")
        fields = dict(moe_ffn_hidden_size=int(hf["intermediate_size"]), moe_norm_topk_prob=True)
    else:
        return {}
    if experts is None or "num_experts_per_tok" not in hf:
        raise ConfigError(f"a {model_type} config.json must give the number of experts and num_experts_per_tok")
    topk = int(hf["num_experts_per_tok"])
    if topk == 1 and fields["moe_norm_topk_prob"]:
        # Renormalised top-1 weights are all 1; megatron-core's router needs the pre-top-k softmax at top-1.
        raise ConfigError("top-1 routing with renormalised weights (norm_topk_prob) is not supported")
    return dict(
        fields,
        num_experts=int(experts),
        moe_router_topk=topk,
        moe_aux_loss_coeff=float(hf.get("router_aux_loss_coef", 0.0)),
    )


def model_config_from_hf(hf: dict[str, Any]) -> ModelConfig:
    model_type = hf.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(
            f"model_type {model_type!r} is not supported; spin-mega handles {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    window = hf.get("sliding_window") if hf.get("use_sliding_window", model_type in ("mistral", "mixtral")) else None
    heads = int(hf["num_attention_heads"])
    hidden = int(hf["hidden_size"])
    head_dim = int(hf.get("head_dim") or hidden // heads)
    theta, scaling = _rope(hf)
    act = hf.get("hidden_act", "silu")
    if act != "silu":
        raise ConfigError(f"hidden_act {act!r} is not supported (SwiGLU with silu only)")
    return ModelConfig(
        hf_config=None,
        architecture=model_type,
        vocab_size=int(hf["vocab_size"]),
        hidden_size=hidden,
        ffn_hidden_size=int(hf["intermediate_size"]),
        num_layers=int(hf["num_hidden_layers"]),
        num_attention_heads=heads,
        num_query_groups=int(hf.get("num_key_value_heads") or heads),
        head_dim=head_dim,
        max_position_embeddings=int(hf.get("max_position_embeddings", 4096)),
        rope_theta=theta,
        rope_scaling=scaling,
        rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        qkv_bias=bool(hf.get("attention_bias", model_type == "qwen2")),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        init_std=float(hf.get("initializer_range", 0.02)),
        sliding_window=int(window) if window else None,
        **_moe_fields(hf, model_type),
    )


def hf_config_from_model_config(cfg: ModelConfig, torch_dtype: str = "float32", extra: dict | None = None) -> dict:
    hf: dict[str, Any] = {
        "architectures": [SUPPORTED_MODEL_TYPES[cfg.architecture]],
        "model_type": cfg.architecture,
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden_size,
        "intermediate_size": cfg.ffn_hidden_size,
        "num_hidden_layers": cfg.num_layers,
        "num_attention_heads": cfg.num_attention_heads,
        "num_key_value_heads": cfg.num_query_groups,
        "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.max_position_embeddings,
        "rope_theta": cfg.rope_theta,
        "rms_norm_eps": cfg.rms_norm_eps,
        "hidden_act": "silu",
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "initializer_range": cfg.init_std,
        "torch_dtype": torch_dtype,
        "use_cache": True,
    }
    if cfg.rope_scaling:
        hf["rope_scaling"] = dict(cfg.rope_scaling)
    if cfg.architecture == "llama":
        hf["attention_bias"] = cfg.qkv_bias
        hf["mlp_bias"] = False
    if cfg.architecture == "mistral":
        hf["sliding_window"] = cfg.sliding_window
    if cfg.architecture == "qwen2":
        if not cfg.qkv_bias:
            raise ConfigError("qwen2 models always carry a QKV bias; model.qkv_bias must be true")
        hf["use_sliding_window"] = False
    if cfg.qk_layernorm:
        hf["attention_bias"] = cfg.qkv_bias
        hf["use_sliding_window"] = False
    if cfg.architecture == "qwen3_moe":
        hf.update(
            moe_intermediate_size=cfg.moe_ffn_hidden_size,
            num_experts=cfg.num_experts,
            num_experts_per_tok=cfg.moe_router_topk,
            norm_topk_prob=cfg.moe_norm_topk_prob,
            router_aux_loss_coef=cfg.moe_aux_loss_coeff,
            decoder_sparse_step=1,
            mlp_only_layers=[],
        )
    if cfg.architecture == "mixtral":
        if not cfg.moe_norm_topk_prob:
            raise ConfigError("mixtral always renormalises its top-k routing weights; model.moe_norm_topk_prob must be true")
        hf.update(
            intermediate_size=cfg.moe_ffn_hidden_size,
            num_local_experts=cfg.num_experts,
            num_experts_per_tok=cfg.moe_router_topk,
            router_aux_loss_coef=cfg.moe_aux_loss_coeff,
            router_jitter_noise=0.0,
            sliding_window=cfg.sliding_window,
        )
    hf.update(extra or {})
    return hf


def resolve_model_config(cfg: ModelConfig, start_model: str | None = None) -> ModelConfig:
    """The model shape a run uses: `model.hf_config` if set, else the start model's config.json if it is an
    HF directory, else the shape written in the config."""
    source = cfg.hf_config
    if source is None and start_model and (Path(start_model) / "config.json").is_file():
        source = start_model
    if source is None:
        return cfg
    return model_config_from_hf(read_hf_config(source))
