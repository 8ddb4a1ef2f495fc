"""Helpers shared by the generation tests."""

from __future__ import annotations

import json
from pathlib import Path

from spin_mega.config import GenerationConfig


def gen_config(**overrides) -> GenerationConfig:
    # A random model rarely emits EOS, so every response runs to max_new_tokens: keep it short.
    base = dict(backend="hf", temperature=1.0, top_p=1.0, max_new_tokens=8, batch_size=4, seed=7)
    base.update(overrides)
    return GenerationConfig(**base)


def read_rows(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
