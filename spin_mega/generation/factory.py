"""The generation backend a run asks for, by name: the one module that knows every backend (they import
base.py, never this)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

from spin_mega.config import GenerationConfig
from spin_mega.errors import SpinMegaError
from spin_mega.generation.base import GenerationBackend

BACKENDS = ("vllm", "hf")


def make_backend(
    name: str, model_dir: str | Path, config: GenerationConfig, tokenizer_dir: Optional[str | Path] = None,
    max_prompt_tokens: Optional[int] = None,
) -> GenerationBackend:
    """The backend called `name` ("vllm" or "hf"), loaded with `model_dir`. `max_prompt_tokens` bounds the
    prompts it will get (vLLM then sizes its context, and so its KV cache, to prompt + new tokens)."""
    if name == "vllm":
        from spin_mega.generation.vllm_backend import VLLMBackend

        return VLLMBackend(model_dir, config, tokenizer_dir, max_prompt_tokens=max_prompt_tokens)
    if name == "hf":
        from spin_mega.generation.hf_backend import HFBackend

        return HFBackend(model_dir, config, tokenizer_dir)
    raise SpinMegaError(f"unknown generation backend {name!r} (choose one of: {', '.join(BACKENDS)})")
