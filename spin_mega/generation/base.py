"""The interface every generation backend implements, and what the backends share.

A backend receives prompts already rendered and tokenized (by the runner, with `render_prompt`), so both
backends see the same token ids as training; it returns the generated token ids, and the runner decodes
them. Keeping tokenization and decoding out of the backends is what makes their outputs comparable.
"""

from __future__ import annotations

import hashlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Optional, Sequence

from spin_mega.config import GenerationConfig
from spin_mega.errors import SpinMegaError



@dataclass(frozen=True)
class GenerationRequest:
    index: int  # position in the full prompt list, before sharding: the output order
    prompt_id: str
    token_ids: tuple[int, ...]
    seed: int  # per-prompt sampling seed (see prompt_seed)


@dataclass(frozen=True)
class GenerationOutput:
    request: GenerationRequest
    token_ids: tuple[int, ...]  # as the engine returned them; may run past EOS (padding) or include it


def prompt_seed(seed: int, prompt_id: str) -> int:
    """A sampling seed per prompt, derived from the run's seed and the prompt id, so that a prompt's random
    draws do not depend on which other prompts share its batch or shard. The sample itself is reproduced
    exactly across resumption and sharding only where the logits are too: on CPU, and on GPUs with vLLM's
    batch-invariant mode (VLLM_BATCH_INVARIANT=1). Otherwise GPU kernels reduce in an order that depends
    on the batch, and a shard's samples may differ from an unsharded run's (equally distributed, not equal)."""
    digest = hashlib.sha256(f"{seed}:{prompt_id}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def cut_at_eos(token_ids: Sequence[int], eos_ids: Iterable[int]) -> tuple[list[int], int, str]:
    """The response tokens before the first EOS, the number of tokens the model generated (EOS
    included), and the finish reason: "stop" at an EOS, "length" when the token budget ran out."""
    eos = set(eos_ids)
    for position, token in enumerate(token_ids):
        if token in eos:
            return list(token_ids[:position]), position + 1, "stop"
    return list(token_ids), len(token_ids), "length"


def eos_token_ids(model_dir: str | Path, tokenizer) -> list[int]:
    """EOS ids from generation_config.json (an int or a list) and the tokenizer; generation stops at
    any of them, as vLLM does."""
    ids: list[int] = []
    try:
        from transformers import GenerationConfig as HFGenerationConfig

        value = HFGenerationConfig.from_pretrained(str(model_dir)).eos_token_id
    except (OSError, ValueError):
        value = None
    if isinstance(value, int):
        ids.append(value)
    elif isinstance(value, (list, tuple)):
        ids.extend(int(v) for v in value)
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids:
        ids.append(tokenizer.eos_token_id)
    if not ids:
        raise SpinMegaError(f"{model_dir} defines no EOS token (generation_config.json or the tokenizer)")
    return ids


def check_model_dir(model_dir: str | Path) -> Path:
    path = Path(model_dir)
    if not path.exists():
        raise SpinMegaError(f"model directory {path} does not exist")
    if not (path / "config.json").is_file():
        raise SpinMegaError(f"{path} is not a Hugging Face model directory (it has no config.json)")
    return path


class GenerationBackend(ABC):
    """One loaded model that samples responses. Construct once and reuse for many `generate` calls
    (a vLLM engine takes tens of seconds to start); `close` frees it."""

    name: str = ""

    def __init__(self, model_dir: str | Path, config: GenerationConfig, tokenizer_dir: Optional[str | Path] = None):
        self.model_dir = check_model_dir(model_dir)
        self.tokenizer_dir = Path(tokenizer_dir) if tokenizer_dir is not None else self.model_dir
        self.config = config

    @abstractmethod
    def generate(self, requests: Sequence[GenerationRequest]) -> Iterator[GenerationOutput]:
        """Yields one output per request as soon as it is finished, in any order. Closing the iterator
        early abandons the requests still in flight."""

    def close(self) -> None:
        pass

    def __enter__(self) -> "GenerationBackend":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
