"""The prepared GPU benchmark run (benchmarks/gpu/run.sh) end to end in its CPU smoke mode, so that the
script a GPU session runs first cannot rot: every step runs, results land as JSON and Markdown, and a
step that crashes, hangs or takes the whole run down keeps what the steps before it wrote."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def _env(tmp: Path) -> dict:
    # The steps are separate processes: keep their datasets cache out of the user's.
    return {**os.environ, "PYTHON": sys.executable, "HF_DATASETS_CACHE": str(tmp / "hf_cache")}


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """One smoke run through run.sh, with a crash injected after the kernel step and a hang after the
    fused-linear step: the real steps around them must still run and be recorded."""
    out = tmp_path_factory.mktemp("gpu_run")
    proc = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu" / "run.sh"), "--smoke", "--out", str(out),
         "--inject-failure", "logprob_kernels", "crash", "--inject-failure", "fused_linear", "hang"],
        capture_output=True, text=True, timeout=900, env=_env(out), cwd=REPO,
    )
    report = json.loads((out / "gpu_run_smoke.json").read_text())
    return proc, report, (out / "gpu_run_smoke.md").read_text()


@pytest.mark.slow
def test_smoke_run_records_every_step_in_order(smoke_run):
    proc, report, _ = smoke_run
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]  # failed steps make the run fail
    steps = {s["name"]: s for s in report["steps"]}
    assert [s["name"] for s in report["steps"]] == [
        "environment", "logprob_kernels", "injected_crash", "fused_linear", "injected_hang", "train_step", "packing"
    ]
    for name in ("environment", "logprob_kernels", "fused_linear", "train_step", "packing"):
        assert steps[name]["status"] == "ok", steps[name]["output_tail"]
    assert steps["injected_crash"]["status"] == "killed by signal 6"
    assert steps["injected_hang"]["status"] == "timed out after 5 s"
    assert report["smoke"] is True


@pytest.mark.slow
def test_smoke_run_environment_names_device_versions_and_peaks(smoke_run):
    _, report, markdown = smoke_run
    env = report["environment"]
    assert env["device"]["kind"] == "cpu"
    assert env["versions"]["torch"] and env["versions"]["megatron-core"] == "0.16.1"
    assert env["versions"]["imports"]["megatron.core"] == "ok"
    assert env["versions"]["imports"]["spin_mega.training.trainer"] == "ok"
    assert env["peaks"]["hbm_bytes_per_s"] is None  # a CPU run quotes no roofline
    assert "SMOKE, CPU: not GPU performance" in markdown and "rooflines:" in markdown


@pytest.mark.slow
def test_smoke_run_kernel_and_fused_linear_figures(smoke_run):
    _, report, markdown = smoke_run
    steps = {s["name"]: s for s in report["steps"]}
    kernels = steps["logprob_kernels"]["result"]["results"]
    assert {(m["vocab"], m["impl"]) for m in kernels} >= {
        (v, impl) for v in (512, 1024) for impl in ("torch_eager", "spin_mega", "spin_mega_inplace_bwd", "torch_compile")
    }
    for m in kernels:
        assert m["error"] is None, m
        assert m["fwd_ms"] > 0 and m["fwd_bwd_ms"] > 0
        # Every implementation computes the same log-probs (bf16 logits, float32 results).
        assert m["impl"] == "torch_eager" or m["max_abs_diff_vs_eager"] < 0.05, m
    fused = steps["fused_linear"]["result"]["results"]
    assert {m["impl"] for m in fused} >= {"fused_spin_mega", "matmul+spin_mega_inplace"}
    assert all(m["error"] is None and m["fwd_bwd_ms"] > 0 and m["hidden"] == 64 for m in fused)
    assert "## Per-token log-probs" in markdown and "| 64 | 1024 | spin_mega |" in markdown
    assert "## Fused linear + log-probs" in markdown and "| 64 | 512 | 64 | fused_spin_mega |" in markdown


@pytest.mark.slow
def test_smoke_run_training_step_both_opponent_modes(smoke_run):
    _, report, markdown = smoke_run
    train = {s["name"]: s for s in report["steps"]}["train_step"]["result"]
    assert set(train["results"]) == {"precompute", "fused"}
    assert train["seq_len"] == 128
    for mode, r in train["results"].items():
        assert r["tokens_per_s"] > 0 and r["step_time_s"] > 0, mode
        assert r["padding_fraction"] == 0.0  # every sequence truncated to exactly seq_len
    assert "| precompute |" in markdown and "| fused |" in markdown
    # The failed steps' output is kept in the report, under their own heading.
    assert "### injected_crash: killed by signal 6" in markdown


@pytest.mark.slow
def test_smoke_run_packed_against_padded_steps(smoke_run):
    """The packing step trains the same pairs packed and padded: the packed rows carry almost no padding
    (the UltraChat-like lengths pad the bucketed rows by ~20%), and the ratio of real tokens/s is reported."""
    _, report, markdown = smoke_run
    packing = {s["name"]: s for s in report["steps"]}["packing"]["result"]
    results = packing["results"]
    assert results["packed"]["padding_fraction"] < 0.05 < results["padded"]["padding_fraction"]
    assert packing["packed_over_padded_real_tokens_per_s"] > 0
    assert "## Packed against padded steps" in markdown and "| packed |" in markdown


def test_a_run_killed_midway_keeps_the_steps_before(tmp_path):
    """The whole run dies (a device tool's limit, a lost machine) after the first step: the files on disk
    still hold that step's results, in both formats."""
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu" / "run.py"), "--smoke", "--out", str(tmp_path),
         "--only", "fused_linear", "--inject-failure", "environment", "kill-run"],
        capture_output=True, text=True, timeout=300, env=_env(tmp_path), cwd=REPO,
    )
    assert proc.returncode == -9, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads((tmp_path / "gpu_run_smoke.json").read_text())
    assert [s["name"] for s in report["steps"]] == ["environment"]
    assert report["environment"]["versions"]["megatron-core"] == "0.16.1"
    assert "| environment | ok |" in (tmp_path / "gpu_run_smoke.md").read_text()
    assert not (tmp_path / "gpu_run_smoke_steps" / "fused_linear.json").exists()
