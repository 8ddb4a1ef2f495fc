"""Tiny random HF models (built by transformers from configs, no downloads) with the shared test tokenizer,
and helpers to compare safetensors directories."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open

from tests.support import build_tokenizer

# Megatron pads the vocabulary to 1152 at TP=1 and to 1280 at TP=2: a checkpoint padded for one TP is
# loaded into a model padded for the other, and the padding rows are dropped on export.
VOCAB = 1100

# head_dim 64 (vLLM's CPU attention refuses smaller heads); 4 layers so PP=2 puts 2 on each stage; GQA
# with 2 key/value groups so TP=2 splits the groups.
_COMMON = dict(
    vocab_size=VOCAB,
    hidden_size=256,
    intermediate_size=512,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    max_position_embeddings=512,
    rms_norm_eps=1e-5,
    # the ids of tests.support's tokenizer
    bos_token_id=2,
    eos_token_id=3,
    pad_token_id=1,
)

ARCH_CONFIGS = {
    "llama": dict(
        _COMMON,
        model_type="llama",
        tie_word_embeddings=False,
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        },
    ),
    "mistral": dict(
        _COMMON, model_type="mistral", tie_word_embeddings=False, rope_theta=1000000.0, sliding_window=None
    ),
    "qwen2": dict(
        _COMMON, model_type="qwen2", tie_word_embeddings=True, rope_theta=1000000.0, use_sliding_window=False
    ),
    # head_dim decoupled from hidden / heads (4 x 64 = 256 query rows on a hidden size of 128), as in every
    # Qwen3 (0.6B: 16 x 128 on 1024); tied embeddings as Qwen3 up to 4B; per-head query/key norms.
    "qwen3": dict(
        _COMMON, model_type="qwen3", hidden_size=128, tie_word_embeddings=True, rope_theta=1000000.0,
        use_sliding_window=False,
    ),
}

# Mixture-of-experts models: 2 layers of 4 experts, 2 routed per token, hidden 64, each expert 48 wide (distinct
# from the dense intermediate size, so a mixed-up width shows). Qwen3-MoE keeps the full softmax's top-2
# probabilities (norm_topk_prob=False: megatron's pre-softmax routing); Mixtral renormalises them.
_MOE_COMMON = dict(
    _COMMON, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
    num_experts_per_tok=2, router_aux_loss_coef=0.02, tie_word_embeddings=False, rope_theta=1000000.0,
)
MOE_CONFIGS = {
    "qwen3_moe": dict(
        _MOE_COMMON, model_type="qwen3_moe", intermediate_size=96, moe_intermediate_size=48, num_experts=4,
        norm_topk_prob=False, use_sliding_window=False,
    ),
    "mixtral": dict(_MOE_COMMON, model_type="mixtral", intermediate_size=48, num_local_experts=4, sliding_window=None),
}
ALL_CONFIGS = {**ARCH_CONFIGS, **MOE_CONFIGS}
# HF initialises routers like every linear layer (std 0.02): on a tiny model its logits would nearly tie, and a
# float-noise tie flips a token's experts. Scaled up, routing is decisive (and uneven, so balancing matters).
ROUTER_SCALE = 40.0


def hf_config(arch: str):
    from transformers import AutoConfig

    cfg = dict(ALL_CONFIGS[arch])
    return AutoConfig.for_model(cfg.pop("model_type"), **cfg)


def build_hf_model(arch: str, seed: int = 0, dtype: torch.dtype = torch.float32):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(hf_config(arch), dtype=dtype)
    with torch.no_grad():
        # Random norms and biases (init leaves them at 1 and 0) so a swapped or mis-sliced one shows.
        for name, param in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith(".bias"):
                param.add_(torch.randn_like(param) * 0.1)
            if name.endswith("mlp.gate.weight") or name.endswith("block_sparse_moe.gate.weight"):
                param.mul_(ROUTER_SCALE)
    return model.eval()


def save_hf_model(arch: str, path: Path, dtype: torch.dtype = torch.float32, max_shard_size="300KB"):
    """Saves a tiny model, sharded (the index path of the reader is exercised), with its tokenizer."""
    model = build_hf_model(arch, dtype=dtype)
    model.save_pretrained(path, max_shard_size=max_shard_size)
    build_tokenizer(Path(path))
    return model


def read_safetensors_dir(path: Path) -> dict[str, torch.Tensor]:
    path = Path(path)
    index = path / "model.safetensors.index.json"
    files = (
        sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.is_file() else ["model.safetensors"]
    )
    tensors = {}
    for name in files:
        with safe_open(str(path / name), framework="pt") as handle:
            for key in handle.keys():
                tensors[key] = handle.get_tensor(key)
    return tensors


def token_batch(seed: int = 0, batch: int = 2, length: int = 96) -> torch.Tensor:
    """Longer than the llama config's original_max_position_embeddings (64), so the llama3 rope scaling
    matters for the logits."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, length), generator=generator)


def assert_same_tensors(expected_dir: Path, actual_dir: Path) -> None:
    """Same names, dtypes, shapes and bits."""
    expected, actual = read_safetensors_dir(expected_dir), read_safetensors_dir(actual_dir)
    assert sorted(actual) == sorted(expected)
    for name, tensor in expected.items():
        assert actual[name].dtype == tensor.dtype, name
        assert actual[name].shape == tensor.shape, name
        assert torch.equal(actual[name], tensor), name
