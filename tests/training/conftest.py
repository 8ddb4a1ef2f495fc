"""A tiny start model (random Megatron checkpoint), tokenizer, pair data and config, built once per session."""

from __future__ import annotations

import pytest

from tests.support import make_tiny_run


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> dict:
    return make_tiny_run(tmp_path_factory.mktemp("tiny_run"))
