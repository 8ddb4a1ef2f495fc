"""The suite's own guard: vLLM tests skip only where vLLM is absent and this is not CI. A vLLM that is
installed but does not import, or any missing vLLM in CI, fails the test instead of hiding it as a skip."""

from __future__ import annotations

import importlib.util
import sys

import pytest

from tests import support


def _vllm_unimportable(monkeypatch, *, installed: bool) -> None:
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: (object() if installed else None) if name == "vllm" else real_find_spec(name, *a))
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` now raises ImportError


def _outcome() -> str:
    # A skip raised inside a test would turn that test into a skip too: caught here, so it can fail one.
    try:
        support.require_vllm()
    except pytest.skip.Exception:
        return "skipped"
    except ImportError:
        return "failed"
    return "imported"


@pytest.mark.parametrize("installed", [False, True], ids=["absent", "broken"])
def test_ci_fails_a_vllm_test_instead_of_skipping_it(monkeypatch, installed):
    monkeypatch.setenv("CI", "true")
    _vllm_unimportable(monkeypatch, installed=installed)
    assert _outcome() == "failed"


def test_outside_ci_a_broken_vllm_fails_and_an_absent_one_skips(monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    _vllm_unimportable(monkeypatch, installed=True)
    assert _outcome() == "failed"
    _vllm_unimportable(monkeypatch, installed=False)
    assert _outcome() == "skipped"
