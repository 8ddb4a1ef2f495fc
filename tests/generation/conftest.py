"""Fixtures for the generation tests: SFT rows from the shipped demo data (the tiny model is tests/conftest.py's)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from spin_mega.demo.build import load_demo_rows


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

