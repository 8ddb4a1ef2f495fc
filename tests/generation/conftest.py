"""Fixtures for the generation tests: the demo's tokenizer and a random tiny Llama built locally with
spin_mega.demo.build (nothing downloaded), and SFT rows from the shipped demo data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from spin_mega.demo.build import build_tiny_model, build_tokenizer, load_demo_rows


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tiny_model")
    build_tokenizer(root / "tokenizer")
    return build_tiny_model(root / "model", root / "tokenizer", seed=0)


@pytest.fixture(scope="session")
def sft_rows() -> list[dict]:
    return load_demo_rows("heldout")


@pytest.fixture()
def sft_file(tmp_path, sft_rows):
    def write(n: int, name: str = "sft.jsonl") -> Path:
        path = tmp_path / name
        path.write_text("".join(json.dumps(row) + "\n" for row in sft_rows[:n]))
        return path

    return write

