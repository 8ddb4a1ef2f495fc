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
        "environment", "preflight", "logprob_kernels", "injected_crash", "fused_linear", "injected_hang", "train_step",
        "packing",
    ]
    for name in ("environment", "preflight", "logprob_kernels", "fused_linear", "train_step", "packing"):
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
def test_smoke_run_preflight_reports_every_check_on_cpu(smoke_run):
    """`spin-mega env --check` as CI runs it: one line per check in order, every GPU check not run here, the
    one with a CPU path (the converter's checkpoint in the local layers against transformers) run."""
    from spin_mega.commands import preflight

    _, report, markdown = smoke_run
    step = {s["name"]: s for s in report["steps"]}["preflight"]
    lines = [line.strip() for line in step["output_tail"].split("preflight (one line per check):", 1)[1].strip().splitlines()]
    assert [line.split(":", 1)[0] for line in lines] == list(preflight.CHECK_NAMES)
    checks = {c["name"]: c for c in step["result"]["checks"]}
    assert [c["name"] for c in step["result"]["checks"]] == list(preflight.CHECK_NAMES) and step["result"]["failed"] == 0
    for check in preflight.CHECKS:
        if check.gpus:
            assert f"{check.name}: not run here: no CUDA device visible" in lines
            assert (checks[check.name]["status"], checks[check.name]["detail"]) == ("not run here", "no CUDA device visible")
    assert checks["converted forward"]["status"] == "ok" and checks["converted forward"]["detail"].startswith("local layers on cpu")
    assert "## Preflight" in markdown and "| converted forward | ok | local layers on cpu" in markdown


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
        # The first call (cold compiles) is recorded apart from the timed median, per timed function.
        assert set(m["first_call_ms"]) == {"fwd", "bwd", "fwd_bwd"} and min(m["first_call_ms"].values()) > 0
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
        # Step 1 (cold) is reported apart from the timed step 2.
        assert (r["warmup_steps"], r["steps_timed"], len(r["warmup_step_time_s"])) == (1, 1, 1), r
        assert r["startup_s_to_first_step"] > 0
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


def test_training_figures_split_warm_up_and_fill_the_peak_memory_column():
    """benchmarks/train_step.py's summary of a mode's metrics rows: warm-up steps apart from the timed median,
    and the peak GPU memory column from torch's figure, which telemetry samples with CUDA whether or not NVML
    works (the column was empty while NVML failed to open the device)."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        from train_step import summarize
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    rows = [
        {"step": i + 1, "step_time_s": t, "tokens_per_s": 100.0 / t, "padding_fraction": 0.0, "mfu": 0.1 / t, "torch_max_allocated_gib": gib}
        for i, (t, gib) in enumerate([(9.0, 30.0), (1.5, 41.0), (1.0, 41.5), (1.2, 41.5), (1.1, 41.5)])
    ]
    figures = summarize(rows, warmup=2)
    assert figures["warmup_step_time_s"] == [9.0, 1.5] and figures["steps_timed"] == 3
    assert figures["step_time_s"] == 1.1 and figures["tokens_per_s"] == pytest.approx(100.0 / 1.1)
    assert figures["peak_gpu_allocated_gib"] == 41.5
    # Only warm-up steps so far (a time limit hit early): no timed figure is made up from them.
    early = summarize(rows[:2], warmup=2)
    assert early["step_time_s"] is None and early["warmup_step_time_s"] == [9.0, 1.5] and early["peak_gpu_allocated_gib"] == 41.0
    report = {"smoke": False, "date": "today", "environment": None, "steps": [
        {"name": "train_step", "status": "ok", "seconds": 1, "timeout_s": 2, "output_tail": "",
         "result": {"shape": "1b", "seq_len": 2048, "global_batch_pairs": 8, "micro_batch_pairs": 2, "results": {"fused": figures}}}]}
    sys.path.insert(0, str(REPO / "benchmarks" / "gpu"))
    try:
        from run import markdown
    finally:
        sys.path.remove(str(REPO / "benchmarks" / "gpu"))
    row = next(line for line in markdown(report).splitlines() if line.startswith("| fused |"))
    assert [c.strip() for c in row.strip("|").split("|")][1:] == ["1.100", "3", "91", "9.1%", "41.5", "–", "9.00, 1.50", "–"]
