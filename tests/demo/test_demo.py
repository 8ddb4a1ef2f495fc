"""`spin-mega demo`, the README's first command after set-up, end to end on CPU.

The test runs `--size smoke`: every step of the full demo (SFT to a validation plateau, the SPIN and
control learning-rate grids chosen on validation, two SPIN iterations through the loop, the paired test
in the report) at toy sizes, so that it fits the CI budget."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import subprocess
import sys

import pytest
import yaml

pytestmark = pytest.mark.slow


def _demo(workdir, timeout):
    return subprocess.run(
        [sys.executable, "-m", "spin_mega", "demo", "--size", "smoke", "--workdir", str(workdir)],
        capture_output=True, text=True, timeout=timeout, env=dict(os.environ, PYTHONWARNINGS="ignore"),
    )


def _mcnemar_p(a: list[int], b: list[int]) -> float:
    # Written out independently of spin_mega.evaluation.significance: exact two-sided binomial test on discordant items.
    only_a = sum(1 for x, y in zip(a, b) if x > y)
    only_b = sum(1 for x, y in zip(a, b) if y > x)
    n = only_a + only_b
    if n == 0:
        return 1.0
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(min(only_a, only_b) + 1)) / 2**n)


def test_demo_runs_two_iterations_and_reports_a_tested_verdict(tmp_path):
    workdir = tmp_path / "demo"
    result = _demo(workdir, 2400)
    assert result.returncode == 0, result.stderr[-4000:]
    summary = json.loads((workdir / "summary.json").read_text())
    assert [it["iteration"] for it in summary["iterations"]] == [0, 1]
    assert summary["sft_control"]["steps"] == sum(it["train"]["steps"] for it in summary["iterations"])
    backend = "vllm" if importlib.util.find_spec("vllm") else "hf"
    first = json.loads((workdir / "iter_0" / "generations.jsonl").read_text().splitlines()[0])
    assert first["meta"]["backend"] == backend

    # theta_0's SFT measured its validation loss (the stopping rule itself is tested in test_demo_build).
    selection = json.loads((workdir / "demo_selection.json").read_text())
    history = selection["theta0"]["history"]
    assert [h["step"] for h in history] == [20, 40][: len(history)] and history
    # Each arm's learning rate is the grid's best on validation, and SPIN kept that rate for every iteration.
    for arm in ("spin", "control"):
        grid = selection[arm]["candidates"]
        assert len(grid) >= 2
        assert selection[arm]["chosen_lr"] == max(grid, key=lambda c: (c["validation_exact_match"], -c["lr"]))["lr"]
    config = yaml.safe_load((workdir / "config.yaml").read_text())
    assert config["iterations"]["lr"] == [selection["spin"]["chosen_lr"]] and config["optim"]["optimizer"] == "adamw"
    assert summary["sft_control"]["lr"] == selection["control"]["chosen_lr"]
    # The grid's candidates trained on the same pairs (generated once), and the kept run continues the chosen one.
    grid_dirs = sorted((workdir / "grid").glob("spin_lr_*"))
    pairs = {(d / "iter_0" / "pairs.jsonl").read_text() for d in grid_dirs}
    assert len(grid_dirs) >= 2 and len(pairs) == 1
    chosen = workdir / "grid" / f"spin_lr_{selection['spin']['chosen_lr']:g}"
    assert (chosen / "iter_0" / "train" / "metrics.jsonl").read_text() == (workdir / "iter_0" / "train" / "metrics.jsonl").read_text()

    report = (workdir / "report" / "report.md").read_text()
    verdict = re.search(r"SPIN (beat|tied with|lost to) the SFT control on held-out exact match", report)
    assert verdict, report[:3000]
    spin = summary["iterations"][-1]["eval"]["exact_match_items"]
    control = summary["sft_control"]["eval"]["exact_match_items"]
    assert len(spin) == len(control) == summary["baseline"]["eval"]["num_samples"]
    p = _mcnemar_p(spin, control)
    expected = "tied with" if p >= 0.05 or sum(spin) == sum(control) else ("beat" if sum(spin) > sum(control) else "lost to")
    assert verdict.group(1) == expected
    assert f"p = {p:.3g}" in report
    for gate in ("loss falls well below ln 2", "reward margin grows", "own samples lose log-prob"):
        assert re.search(gate + r": (held|did NOT hold)", report), gate
    for png in ("loss.png", "rewards.png", "heldout.png", "lengths.png"):
        assert (workdir / "report" / png).stat().st_size > 5000

    # A second run of the same command finds every stage done and rebuilds nothing.
    again = _demo(workdir, 600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "starting" not in again.stderr
    assert "grid:" not in again.stderr
    assert json.loads((workdir / "summary.json").read_text())["iterations"] == summary["iterations"]
