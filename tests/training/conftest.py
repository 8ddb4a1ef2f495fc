"""A tiny start model (random Megatron checkpoint), tokenizer, pair data and config, built once per session."""

from __future__ import annotations

import pytest
import yaml

from tests.support import REPO, build_tokenizer, write_pairs, write_random_start


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("tiny_run")
    tokenizer = build_tokenizer(root / "tokenizer")
    pairs = write_pairs(root / "pairs.jsonl", 64)
    start = root / "start_mcore"
    write_random_start(start, tokenizer, seed=7)
    config = yaml.safe_load((REPO / "configs" / "tiny-cpu.yaml").read_text())
    config["start_model"] = str(start)
    config["data"].update(train_path=str(pairs), max_prompt_length=64, max_length=128)
    config["train"].update(micro_batch_size=2, global_batch_size=8, epochs=1, seed=11)
    config["optim"].update(lr=1.0e-3, warmup_ratio=0.0)
    config_path = root / "tiny.yaml"
    config_path.write_text(yaml.safe_dump(config))
    return {"root": root, "config": config_path, "tokenizer": tokenizer, "pairs": pairs, "start": start}
