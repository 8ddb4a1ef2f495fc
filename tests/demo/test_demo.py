"""`spin-mega demo`, the README's first command after set-up, end to end on CPU.

The slow tests run `--size smoke`: every step of the full demo (SFT to a validation plateau, the SPIN and
control learning-rate grids chosen on validation, two SPIN iterations through the loop, the paired test
in the report) at toy sizes, so that it fits the CI budget. At those sizes every model scores 0 exact
match, so the verdict would be "tied" whatever the code did: the second test therefore writes per-item
results with a clear winner into the evaluation files and checks that the resumed demo's summary and
report follow them. Everything the report says is recomputed here from the files on disk, independently
of spin_mega.report and spin_mega.evaluation.significance."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

LN2 = math.log(2.0)


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


def _read(path: Path):
    return json.loads(path.read_text())


def _metrics(workdir: Path, t: int) -> list[dict]:
    return [json.loads(l) for l in (workdir / f"iter_{t}" / "train" / "metrics.jsonl").read_text().splitlines() if l.strip()]


def _arm(items: list[int]) -> tuple[float, float]:
    p = sum(items) / len(items)
    return p, math.sqrt(p * (1 - p) / len(items))


def _expected_verdict(report: str, spin_items: list[int], control_items: list[int], t: int) -> None:
    """The verdict sentence, every number of it recomputed from the per-item results."""
    a, a_se = _arm(spin_items)
    b, b_se = _arm(control_items)
    only_spin = sum(1 for x, y in zip(spin_items, control_items) if x > y)
    only_control = sum(1 for x, y in zip(spin_items, control_items) if y > x)
    p = _mcnemar_p(spin_items, control_items)
    word = "tied with" if p >= 0.05 or only_spin == only_control else ("beat" if only_spin > only_control else "lost to")
    sentence = (
        f"SPIN {word} the SFT control on held-out exact match: {a:.3f} ± {a_se:.3f} after iteration {t} versus "
        f"{b:.3f} ± {b_se:.3f} for the SFT control (± one standard error, n = {len(spin_items)}; McNemar's exact test "
        f"on the {only_spin + only_control} items where they differ, SPIN right on {only_spin} and the control on "
        f"{only_control}: p = {p:.3g}, {'significant' if p < 0.05 else 'not significant'} at 0.05)."
    )
    assert sentence in report, (sentence, report[:2500])


def _expected_arms(report: str, arms: dict[str, list[int]]) -> None:
    for name, items in arms.items():
        p, se = _arm(items)
        assert f"| {name} | {p:.3f} ± {se:.3f} | {len(items)} |" in report, (name, report[:2500])


def _expected_signatures(report: str, workdir: Path, t: int) -> None:
    """The three SPIN signature gates of iteration t, judged here from its metrics.jsonl."""
    rows = _metrics(workdir, t)
    k = max(1, len(rows) // 10)
    head, tail = rows[:k], rows[-k:]
    mean = lambda part, key: sum(r[key] for r in part) / len(part)
    loss_held = mean(tail, "loss") <= LN2 - 0.1
    margin_held = mean(tail, "reward_margin") > mean(head, "reward_margin") and mean(tail, "reward_margin") > 0
    own_held = mean(tail, "reward_rejected") < 0
    line = next(l for l in report.splitlines() if l.startswith(f"- iteration {t}: "))
    for gate, held in (("loss falls well below ln 2", loss_held), ("reward margin grows", margin_held),
                       ("own samples lose log-prob", own_held)):
        assert f"{gate}: {'held' if held else 'did NOT hold'}" in line, (gate, line)


def _weights(model_dir: Path) -> dict:
    from safetensors.torch import load_file

    # Every shard: the exporter names a single shard model-00001-of-00001.safetensors, with an index.
    tensors = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        tensors.update(load_file(str(path)))
    assert tensors, f"no safetensors in {model_dir}"
    return tensors


@pytest.fixture(scope="module")
def demo_workdir(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("demo") / "demo"
    result = _demo(workdir, 2400)
    assert result.returncode == 0, result.stderr[-4000:]
    return workdir


@pytest.mark.slow
def test_demo_runs_two_iterations_and_reports_a_tested_verdict(demo_workdir):
    workdir = demo_workdir
    summary = _read(workdir / "summary.json")
    selection = _read(workdir / "demo_selection.json")
    assert [it["iteration"] for it in summary["iterations"]] == [0, 1]
    backend = "vllm" if importlib.util.find_spec("vllm") else "hf"
    first = json.loads((workdir / "iter_0" / "generations.jsonl").read_text().splitlines()[0])
    assert first["meta"]["backend"] == backend

    # theta_0's SFT measured its validation loss (the stopping rule itself is tested in test_demo_build).
    history = selection["theta0"]["history"]
    assert [h["step"] for h in history] == [20, 40][: len(history)] and history

    # The control trained, per its own build record, exactly as many steps as SPIN's two trainings logged.
    spin_steps = len(_metrics(workdir, 0)) + len(_metrics(workdir, 1))
    control_dir = workdir / "grid" / f"control_lr_{selection['control']['chosen_lr']:g}"
    assert _read(control_dir / "spin_mega_build.json")["steps"] == spin_steps == summary["sft_control"]["steps"]
    for candidate in sorted((workdir / "grid").glob("control_lr_*/spin_mega_build.json")):
        assert _read(candidate)["steps"] == spin_steps

    # Each arm's learning rate is its grid's best on validation (ties: the smaller rate), and SPIN kept it.
    for arm in ("spin", "control"):
        grid = selection[arm]["candidates"]
        assert len(grid) >= 2
        assert selection[arm]["chosen_lr"] == max(grid, key=lambda c: (c["validation_exact_match"], -c["lr"]))["lr"]
    for c in selection["spin"]["candidates"]:
        assert _read(workdir / "grid" / f"spin_lr_{c['lr']:g}" / "validation.json")["validation_exact_match"] == c["validation_exact_match"]
    config = yaml.safe_load((workdir / "config.yaml").read_text())
    assert config["optim"]["lr"] == selection["spin"]["chosen_lr"] and config["optim"]["optimizer"] == "adamw"
    assert summary["sft_control"]["lr"] == selection["control"]["chosen_lr"]
    # The control evaluated on the test split is the chosen candidate's model.
    assert Path(_read(workdir / "sft_control_eval.json")["model"]) == control_dir

    # The SPIN candidates trained on the same pairs against the same opponent log-probs (computed once), at
    # their own learning rates (their weights differ); none of them was scored on the test split, and the
    # kept run continues the chosen one.
    grid_dirs = sorted((workdir / "grid").glob("spin_lr_*"))
    assert len(grid_dirs) >= 2
    assert len({(d / "iter_0" / "pairs.jsonl").read_text() for d in grid_dirs}) == 1
    assert len({(d / "iter_0" / "train" / "opponent_logps.json").read_text() for d in grid_dirs}) == 1
    precomputed = ["precomputing opponent log-probs" in (d / "iter_0" / "logs" / "train.log").read_text() for d in grid_dirs]
    assert sum(precomputed) == 1
    exports = [_weights(d / "iter_0" / "hf") for d in grid_dirs]
    assert any(not exports[0][k].equal(exports[1][k]) for k in exports[0])
    for d in grid_dirs:
        assert not list(d.rglob("eval.json")) and not (d / "baseline_eval.json").exists() and not (d / "report").exists()
    chosen = workdir / "grid" / f"spin_lr_{selection['spin']['chosen_lr']:g}"
    assert (chosen / "iter_0" / "train" / "metrics.jsonl").read_text() == (workdir / "iter_0" / "train" / "metrics.jsonl").read_text()

    # The summary carries the evaluation files' per-item results, and the report's numbers are theirs.
    evals = {"θ0 (start)": _read(workdir / "baseline_eval.json"), "SPIN iteration 0": _read(workdir / "iter_0" / "eval.json"),
             "SPIN iteration 1": _read(workdir / "iter_1" / "eval.json"), "SFT control": _read(workdir / "sft_control_eval.json")}
    assert summary["baseline"]["eval"] == evals["θ0 (start)"]
    assert [it["eval"] for it in summary["iterations"]] == [evals["SPIN iteration 0"], evals["SPIN iteration 1"]]
    assert summary["sft_control"]["eval"] == evals["SFT control"]
    items = {name: ev["exact_match_items"] for name, ev in evals.items()}
    assert {len(v) for v in items.values()} == {24}
    report = (workdir / "report" / "report.md").read_text()
    _expected_verdict(report, items["SPIN iteration 1"], items["SFT control"], 1)
    _expected_arms(report, items)
    for t in (0, 1):
        _expected_signatures(report, workdir, t)
    for png in ("loss.png", "rewards.png", "heldout.png", "lengths.png"):
        assert (workdir / "report" / png).stat().st_size > 5000


@pytest.mark.slow
def test_resumed_demo_rebuilds_nothing_and_reports_what_the_evaluation_files_say(demo_workdir):
    workdir = demo_workdir
    before = _read(workdir / "summary.json")
    # At smoke size every arm scores 0, which any verdict code would call a tie. Give the evaluation files
    # a clear result instead: SPIN (iteration 1) right on 9 items the control gets wrong (p = 2 / 2^9).
    spin = [1] * 9 + [1] * 3 + [0] * 12
    control = [0] * 9 + [1] * 3 + [0] * 12
    theta0 = [0] * 9 + [1] * 4 + [0] * 11
    for path, items in ((workdir / "iter_1" / "eval.json", spin), (workdir / "sft_control_eval.json", control),
                        (workdir / "baseline_eval.json", theta0)):
        ev = _read(path)
        assert len(ev["exact_match_items"]) == len(items)
        path.write_text(json.dumps(dict(ev, exact_match_items=items, exact_match=sum(items) / len(items))))

    again = _demo(workdir, 600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "starting" not in again.stderr
    assert "grid:" not in again.stderr
    summary = _read(workdir / "summary.json")
    strip = lambda it: {k: v for k, v in it.items() if k != "eval"}
    assert [strip(it) for it in summary["iterations"]] == [strip(it) for it in before["iterations"]]
    assert summary["iterations"][1]["eval"]["exact_match_items"] == spin
    assert summary["sft_control"]["eval"]["exact_match_items"] == control

    report = (workdir / "report" / "report.md").read_text()
    _expected_verdict(report, spin, control, 1)
    assert "SPIN beat the SFT control" in report
    _expected_arms(report, {"θ0 (start)": theta0, "SPIN iteration 1": spin, "SFT control": control})
    # SPIN against theta_0: 9 items only SPIN got right, 1 only theta_0 (p = 20 / 2^10).
    assert f"- SPIN (iteration 1) beat θ0: 0.500 vs 0.167, 9 items only SPIN got right, 1 only θ0; McNemar p = {_mcnemar_p(spin, theta0):.3g}." in report


def test_each_grid_keeps_its_best_validation_score_and_the_smaller_rate_on_a_tie():
    from spin_mega.demo.run_demo import _best

    grid = [{"lr": 3e-5, "validation_exact_match": 0.50}, {"lr": 1e-4, "validation_exact_match": 0.62},
            {"lr": 3e-4, "validation_exact_match": 0.62}]
    assert _best(grid)["lr"] == 1e-4
    assert _best(grid[:1] + [dict(grid[2], validation_exact_match=0.49)])["lr"] == 3e-5
    assert _best(list(reversed(grid)))["lr"] == 1e-4
