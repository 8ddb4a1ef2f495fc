"""Sampling SPIN's rejected responses from the current model (vLLM or transformers), resumable and
shardable. `generate` and `merge_shards` are the entry points; `spin-mega generate` wraps them."""

from spin_mega.generation.base import GenerationBackend, GenerationOutput, GenerationRequest
from spin_mega.generation.factory import BACKENDS, make_backend
from spin_mega.generation.runner import (
    GenerationSummary,
    generate,
    load_sft_rows,
    merge_shards,
    prepare_prompts,
    shard_from_env,
    shard_path,
)

__all__ = [
    "BACKENDS",
    "GenerationBackend",
    "GenerationOutput",
    "GenerationRequest",
    "GenerationSummary",
    "generate",
    "load_sft_rows",
    "make_backend",
    "merge_shards",
    "prepare_prompts",
    "shard_from_env",
    "shard_path",
]
