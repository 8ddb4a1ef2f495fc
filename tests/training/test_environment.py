"""`spin-mega env`: what a training run on this (CPU-only) machine would use. The trainer logs the same
choices (tests/training/test_trainer.py checks that its log line equals this module's summary)."""

from __future__ import annotations

import importlib.metadata

from spin_mega.config import load_config
from spin_mega.training import environment
from tests.support import REPO, spin_mega


def _choices(text: str) -> dict[str, str]:
    section = text.split("a training run with this configuration would use:\n", 1)[1]
    return {line.split(":", 1)[0].strip(): line.split(":", 1)[1].split("  (")[0].strip() for line in section.splitlines()}


def test_env_command_reports_the_cpu_paths():
    result = spin_mega("env", str(REPO / "configs" / "tiny-cpu.yaml"), "--set", "parallel.tensor_parallel=2")
    assert result.returncode == 0, result.stderr[-2000:]
    out = result.stdout
    assert "none: no CUDA device visible" in out
    assert f"megatron-core: {importlib.metadata.version('megatron-core')}" in out
    assert f"torch: {__import__('torch').__version__}" in out
    assert "transformer-engine: not installed" in out
    choices = _choices(out)
    assert choices["precision"] == "fp32"
    assert choices["attention"] == "sdpa"
    assert choices["norm"].startswith("torch RMSNorm")
    assert choices["log-probs"] == "fused_linear"
    assert choices["kernel backend"].startswith("torch")
    assert choices["sequence parallel"] == "on"
    assert choices["distributed optimizer"] == "on"
    assert choices["process groups"] == "gloo"
    assert choices["packing"] == "sdpa_per_segment"  # data.packing's default; its attention per sequence on CPU
    assert "rows of at most 1024 tokens" in out  # 2 x micro_batch_size 4 x max_length 128


def test_report_follows_the_config_and_the_kernel_mode():
    """In this process the kernels were defined under TRITON_INTERPRET=1 (tests/conftest.py): the report says
    so. bf16 and TP=1 (sequence parallelism needs TP > 1) and the plain optimizer are read from the config."""
    cfg = load_config(None, ["train.precision=bf16", "parallel.distributed_optimizer=false", "train.logprobs=triton"])
    choices = _choices(environment.report(cfg))
    assert choices["precision"] == "bf16"
    assert choices["kernel backend"].startswith("triton interpreter")
    assert choices["log-probs"] == "triton"
    assert choices["sequence parallel"] == "off"
    assert choices["distributed optimizer"] == "off"
    assert _choices(environment.report(load_config(None, ["data.packing=false"])))["packing"] == "off"


def test_env_refuses_a_missing_config(tmp_path):
    result = spin_mega("env", str(tmp_path / "missing.yaml"))
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [f"spin-mega env: error: config file {tmp_path / 'missing.yaml'} does not exist"]


def test_report_names_the_mixture_of_experts_paths(tmp_path):
    """A Qwen3-MoE start model (its config.json is all that is read): without CUDA, gloo's all-gather dispatcher
    and one GEMM per local expert; a dense model lists no expert choices."""
    import json

    (tmp_path / "config.json").write_text(json.dumps({
        "model_type": "qwen3_moe", "vocab_size": 400, "hidden_size": 64, "intermediate_size": 128,
        "moe_intermediate_size": 48, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 32, "num_experts": 4, "num_experts_per_tok": 2, "hidden_act": "silu",
    }))
    choices = _choices(environment.report(load_config(None, [f"start_model={tmp_path}", "parallel.expert_parallel=2"])))
    assert choices["experts"] == "4 per layer, top-2, EP 2 x expert TP 1"
    assert choices["token dispatcher"] == "allgather"
    assert choices["expert GEMMs"] == "one per local expert (SequentialMLP)"
    assert "experts" not in _choices(environment.report(load_config(None)))
