"""`spin-mega demo`, the README's first command after set-up, end to end on CPU."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def test_demo_runs_two_iterations_and_reports_a_verdict(tmp_path):
    workdir = tmp_path / "demo"
    result = subprocess.run(
        [sys.executable, "-m", "spin_mega", "demo", "--workdir", str(workdir)],
        capture_output=True, text=True, timeout=2400, env=dict(os.environ, PYTHONWARNINGS="ignore"),
    )
    assert result.returncode == 0, result.stderr[-4000:]
    summary = json.loads((workdir / "summary.json").read_text())
    assert [it["iteration"] for it in summary["iterations"]] == [0, 1]
    assert summary["sft_control"]["steps"] == sum(it["train"]["steps"] for it in summary["iterations"])
    backend = "vllm" if __import__("importlib").util.find_spec("vllm") else "hf"
    first = json.loads((workdir / "iter_0" / "generations.jsonl").read_text().splitlines()[0])
    assert first["meta"]["backend"] == backend
    report = (workdir / "report" / "report.md").read_text()
    verdict = re.search(r"SPIN (beat|did not beat) the SFT control on the held-out task metric in this run", report)
    assert verdict, report[:2000]
    spin = summary["iterations"][-1]["eval"]["exact_match"]
    control = summary["sft_control"]["eval"]["exact_match"]
    assert (verdict.group(1) == "beat") == (spin > control)
    for png in ("loss.png", "rewards.png", "heldout.png", "lengths.png"):
        assert (workdir / "report" / png).stat().st_size > 5000

    # A second run of the same command finds every stage done and rebuilds nothing.
    again = subprocess.run(
        [sys.executable, "-m", "spin_mega", "demo", "--workdir", str(workdir)],
        capture_output=True, text=True, timeout=600, env=dict(os.environ, PYTHONWARNINGS="ignore"),
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert "starting" not in again.stderr.replace("SFT control", "")
    assert json.loads((workdir / "summary.json").read_text())["iterations"] == summary["iterations"]
