"""`spin-mega report` on synthetic work directories: no model, no GPU, a few seconds."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from spin_mega.errors import SpinMegaError
from spin_mega.report import write_report
from spin_mega.report.plots import LN2, PLOTS
from tests.support import REPO

BASELINE = {"heldout_logp_per_token": -1.9, "heldout_reward_accuracy": None, "exact_match": 0.30, "num_samples": 50}
EVALS = {
    0: {"heldout_logp_per_token": -1.7, "heldout_reward_accuracy": 0.8125, "exact_match": 0.36, "num_samples": 50},
    1: {"heldout_logp_per_token": -1.6, "heldout_reward_accuracy": 0.875, "exact_match": 0.42, "num_samples": 50},
}
STEPS = 12


def _metrics(t: int, steps: int) -> list[dict]:
    rows = []
    for step in range(1, steps + 1):
        # Step 1 sits exactly at ln 2, as a real run's does; later steps drift down and apart.
        margin = 0.0 if step == 1 else 0.15 * (step - 1) / (t + 1)
        rows.append(
            {
                "step": step,
                "loss": math.log1p(math.exp(-margin)),
                "reward_chosen": margin / 2,
                "reward_rejected": -margin / 2,
                "reward_margin": margin,
                "reward_accuracy": 0.0 if step == 1 else min(1.0, 0.5 + 0.05 * step),
                "lr": 5e-7,
                "grad_norm": 1.0 / step,
                "tokens_per_s": 1000.0,
                "logp_chosen_per_token_change": -0.01 * (step - 1),
                "logp_rejected_per_token_change": -0.03 * (step - 1),
                "collapse": False,
            }
        )
    return rows


def _generations(t: int, n: int = 20) -> list[dict]:
    rows = []
    for i in range(n):
        human = " ".join(["word"] * (10 + i))
        generated = " ".join(["gen"] * (5 + (i % 7) + 3 * t))
        rows.append(
            {
                "prompt_id": f"p{i}",
                "prompt": f"question {i}",
                "chosen": human,
                "rejected": generated,
                "meta": {"num_tokens": 2 * len(generated.split())},
            }
        )
    return rows


def _entry(t: int, with_eval: bool = True) -> dict:
    rows = _metrics(t, STEPS)
    gens = _generations(t)
    entry = {
        "iteration": t,
        "train": {
            "steps": STEPS,
            "final_loss": rows[-1]["loss"],
            "final_reward_accuracy": rows[-1]["reward_accuracy"],
            "final_reward_margin": rows[-1]["reward_margin"],
        },
        "generation": {
            "num_prompts": len(gens),
            "mean_response_tokens": sum(g["meta"]["num_tokens"] for g in gens) / len(gens),
            "mean_chosen_tokens": 20.0,
        },
    }
    if with_eval:
        entry["eval"] = EVALS[t]
    return entry


def make_workdir(root: Path, control_em: float | None = 0.40, control_logp: float = -1.65, finished: int = 2) -> Path:
    """Two iterations' metrics and generations; the first `finished` of them have an evaluation."""
    workdir = root / "work"
    for t in range(2):
        train = workdir / f"iter_{t}" / "train"
        train.mkdir(parents=True)
        (train / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _metrics(t, STEPS)))
        (workdir / f"iter_{t}" / "generations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _generations(t)))
    summary = {
        "iterations": [_entry(t, with_eval=t < finished) for t in range(2)],
        "baseline": {"eval": BASELINE},
        "sft_control": {
            "steps": 24,
            "eval": {"heldout_logp_per_token": control_logp, "heldout_reward_accuracy": None, "exact_match": control_em, "num_samples": 50},
        },
    }
    (workdir / "summary.json").write_text(json.dumps(summary))
    return workdir


def _row(report: str, first_cell: str) -> list[str]:
    for line in report.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[0] == first_cell:
            return cells
    raise AssertionError(f"no table row starting with {first_cell!r} in:\n{report}")


def _assert_pngs(report_dir: Path, names) -> None:
    for name in names:
        path = report_dir / PLOTS[name]
        assert path.stat().st_size > 5000, path
        with Image.open(path) as image:
            assert image.format == "PNG"
            image.verify()
            assert image.size[0] > 300 and image.size[1] > 200


def test_full_run_report(tmp_path):
    workdir = make_workdir(tmp_path)
    report_path = write_report(workdir)
    assert report_path == workdir / "report" / "report.md"
    _assert_pngs(report_path.parent, PLOTS)
    report = report_path.read_text()
    for name in PLOTS.values():
        assert f"]({name})" in report  # relative, so the report directory can be moved or served as is

    first = _row(report, "0")
    final0 = _metrics(0, STEPS)[-1]
    assert first[1:] == [
        "finished",
        str(STEPS),
        f"{final0['loss']:.4f}",
        f"{final0['reward_accuracy']:.4f}",
        "0.3600",
        "-1.7000",
        "0.8125",
        f"{sum(len(g['rejected'].split()) for g in _generations(0)) / 20:.1f}",
    ]
    assert "mean generated length (words)" in report
    second = _row(report, "1")
    assert second[5:8] == ["0.4200", "-1.6000", "0.8750"]
    assert _row(report, "θ0 (start)")[5:8] == ["0.3000", "-1.9000", "–"]
    assert _row(report, "SFT control")[2] == "24"
    assert _row(report, "SFT control")[5] == "0.4000"
    # No per-item results in this run: the numbers are reported, but no verdict word is claimed.
    assert (
        "SPIN scored higher than the SFT control: held-out exact match 0.4200 after iteration 1 versus 0.4000 for "
        "the SFT control. Per-item results are missing, so no paired test was possible" in report
    )
    assert "SPIN beat the" not in report and "tied with the" not in report
    assert "Unfinished" not in report
    assert "iteration 0: 0.693147" in report


def test_spin_scored_lower_without_items_claims_no_verdict(tmp_path):
    report = write_report(make_workdir(tmp_path, control_em=0.50)).read_text()
    assert "SPIN scored lower than the SFT control" in report
    assert "held-out exact match 0.4200 after iteration 1 versus 0.5000 for the SFT control." in report


def _with_items(workdir: Path, spin: list[int], control: list[int], baseline: list[int]) -> Path:
    summary = json.loads((workdir / "summary.json").read_text())
    summary["iterations"][-1]["eval"] = dict(summary["iterations"][-1]["eval"], exact_match_items=spin, exact_match=sum(spin) / len(spin))
    summary["sft_control"]["eval"] = dict(summary["sft_control"]["eval"], exact_match_items=control)
    summary["baseline"]["eval"] = dict(summary["baseline"]["eval"], exact_match_items=baseline)
    (workdir / "summary.json").write_text(json.dumps(summary))
    return workdir


@pytest.mark.parametrize(
    "spin_only, control_only, word, p_value",
    [
        # 20 discordant items split 15/5: two-sided exact binomial p = 2 * P(X <= 5 | n=20, 1/2) = 0.041389.
        (15, 5, "beat", 0.0413895),
        (5, 15, "lost to", 0.0413895),
        # 14/6: p = 2 * P(X <= 6 | 20) = 0.115318, not significant, so a 4-point lead is still a tie.
        (14, 6, "tied with", 0.115318),
    ],
)
def test_verdict_follows_mcnemars_test(tmp_path, spin_only, control_only, word, p_value):
    both = [1] * 300
    neither = [0] * 180
    spin = both + [1] * spin_only + [0] * control_only + neither
    control = both + [0] * spin_only + [1] * control_only + neither
    workdir = _with_items(make_workdir(tmp_path), spin, control, baseline=[0] * len(spin))
    report = write_report(workdir).read_text()
    n = len(spin)
    a, b = sum(spin) / n, sum(control) / n
    se = lambda p: math.sqrt(p * (1 - p) / n)
    assert (
        f"SPIN {word} the SFT control on held-out exact match: {a:.3f} ± {se(a):.3f} after iteration 1 versus "
        f"{b:.3f} ± {se(b):.3f} for the SFT control (± one standard error, n = {n}; McNemar's exact test on the "
        f"{spin_only + control_only} items where they differ, SPIN right on {spin_only} and the control on "
        f"{control_only}: p = {p_value:.3g}" in report
    ), report[:1500]
    # The comparison section lists every arm with its SE, and SPIN against theta_0 too.
    assert f"| SFT control | {b:.3f} ± {se(b):.3f} | {n} |" in report
    assert f"| θ0 (start) | 0.000 ± 0.000 | {n} |" in report
    assert "SPIN (iteration 1) beat θ0" in report


def test_signature_gates(tmp_path):
    workdir = make_workdir(tmp_path)
    report = write_report(workdir).read_text()
    # The synthetic metrics' margin grows to 0.15 * 11 / (t + 1): the loss ends at log(1 + e^-1.65) = 0.175
    # (iteration 0) and 0.366 (iteration 1), both well below ln 2, and the rejected reward is negative.
    assert "- iteration 0: loss falls well below ln 2: held" in report
    assert "reward margin grows: held" in report and "own samples lose log-prob: held" in report
    # A flat run (loss at ln 2, no margin, own samples unchanged) fails all three.
    flat = [dict(r, loss=LN2, reward_margin=0.0, reward_chosen=0.0, reward_rejected=0.0) for r in _metrics(0, STEPS)]
    (workdir / "iter_0" / "train" / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in flat))
    report = write_report(workdir).read_text()
    line = next(l for l in report.splitlines() if l.startswith("- iteration 0:"))
    assert line.count("did NOT hold") == 3, line


def test_verdict_falls_back_to_logp_without_exact_match(tmp_path):
    report = write_report(make_workdir(tmp_path, control_em=None, control_logp=-1.5)).read_text()
    assert "SPIN scored lower than the SFT control" in report
    assert "held-out log-likelihood per token -1.6000 after iteration 1 versus -1.5000" in report
    assert "log-likelihood is used" in report


def test_unfinished_run_still_reports(tmp_path):
    workdir = make_workdir(tmp_path, finished=1)
    # A trainer still appending: iteration 1 has fewer steps and a torn last line.
    metrics = workdir / "iter_1" / "train" / "metrics.jsonl"
    metrics.write_text("".join(json.dumps(r) + "\n" for r in _metrics(1, 5)) + '{"step": 6, "lo')
    summary = json.loads((workdir / "summary.json").read_text())
    del summary["iterations"][1]["train"]
    (workdir / "summary.json").write_text(json.dumps(summary))

    report = write_report(workdir).read_text()
    _assert_pngs(workdir / "report", PLOTS)
    second = _row(report, "1")
    assert second[1:3] == ["unfinished", "5"]
    assert second[3] == f"{_metrics(1, 5)[-1]['loss']:.4f}"
    assert second[5:8] == ["–", "–", "–"]
    assert "iteration 1 (20 generations, training metrics up to step 5, no evaluation yet)" in report
    # The verdict uses the last finished iteration (0: 0.36 < 0.40).
    assert "SPIN scored lower than the SFT control" in report
    assert "0.3600 after iteration 0 versus 0.4000" in report


def test_length_plot_uses_tokens_when_both_sides_have_counts(tmp_path):
    workdir = make_workdir(tmp_path)
    for t in range(2):
        rows = _generations(t)
        for row in rows:
            row["meta"]["chosen_num_tokens"] = 2 * len(row["chosen"].split())
        (workdir / f"iter_{t}" / "generations.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = write_report(workdir).read_text()
    assert "mean generated length (tokens)" in report
    mean_tokens = sum(r["meta"]["num_tokens"] for r in _generations(1)) / 20
    assert _row(report, "1")[-1] == f"{mean_tokens:.1f}"
    _assert_pngs(workdir / "report", ["lengths"])


def test_missing_generations_fall_back_to_summary(tmp_path):
    workdir = make_workdir(tmp_path)
    (workdir / "iter_0" / "generations.jsonl").unlink()
    report = write_report(workdir).read_text()
    assert _row(report, "0")[-1] == f"{_entry(0)['generation']['mean_response_tokens']:.1f} (summary.json)"
    _assert_pngs(workdir / "report", ["lengths"])


def test_metrics_only_without_summary(tmp_path):
    workdir = make_workdir(tmp_path)
    write_report(workdir)
    (workdir / "summary.json").unlink()
    report = write_report(workdir).read_text()
    _assert_pngs(workdir / "report", ["loss", "rewards", "lengths"])
    # Nothing evaluated now: the held-out plot of the earlier report must not linger beside this one.
    assert not (workdir / "report" / PLOTS["heldout"]).exists()
    assert "Not drawn: no evaluation yet." in report
    assert "no SFT control" in report

    # The loop writes theta_0's evaluation before any summary exists.
    (workdir / "baseline_eval.json").write_text(json.dumps(BASELINE))
    report = write_report(workdir).read_text()
    assert _row(report, "θ0 (start)")[5:7] == ["0.3000", "-1.9000"]
    _assert_pngs(workdir / "report", ["heldout"])


def test_empty_workdir_is_a_user_error(tmp_path):
    with pytest.raises(SpinMegaError, match="nothing to report"):
        write_report(tmp_path)
    assert not (tmp_path / "report").exists()


def test_cli_missing_workdir_one_line():
    proc = subprocess.run(
        [sys.executable, "-m", "spin_mega", "report", "/nonexistent/spin-workdir"],
        capture_output=True,
        text=True,
        cwd=REPO,
        timeout=120,
    )
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "does not exist" in lines[0]
    assert "Traceback" not in proc.stderr


def test_cli_writes_report(tmp_path):
    workdir = make_workdir(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-m", "spin_mega", "report", str(workdir)], capture_output=True, text=True, cwd=REPO, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    assert (workdir / "report" / "report.md").is_file()


def test_collapse_and_unhealthy_stop_are_shown_in_verdict_table_and_plot(tmp_path):
    workdir = make_workdir(tmp_path, finished=1)
    # Iteration 0 collapsed from step 9 on (its train_summary.json says so); iteration 1 stopped on a NaN loss.
    rows = _metrics(0, STEPS)
    for row in rows[8:]:
        row.update(logp_chosen_per_token_change=-1.5, collapse=True)
    train0 = workdir / "iter_0" / "train"
    (train0 / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    health = {"status": "collapsed", "collapse_bound": 1.0, "collapse": {"step": 9, "logp_chosen_per_token_change": -1.5}}
    (train0 / "train_summary.json").write_text(json.dumps({"steps": STEPS, "health": health}))
    (workdir / "iter_1" / "train" / "unhealthy.json").write_text(
        json.dumps({"step": 3, "cause": "the loss is not finite (NaN or inf)", "last_good": "x", "advice": "y"})
    )
    report_path = write_report(workdir)
    report = report_path.read_text()
    verdict_section = report.split("## Summary")[0]
    assert "iteration 0 collapsed at step 9" in verdict_section and "fell 1.5 nats below θ0's" in verdict_section
    assert "iteration 1 stopped before the update of step 3 because the loss is not finite" in verdict_section
    assert _row(report, "1")[1] == "stopped unhealthy"
    _assert_pngs(report_path.parent, ["health"])
    assert f"]({PLOTS['health']})" in report


def test_healthy_run_says_so(tmp_path):
    report = write_report(make_workdir(tmp_path)).read_text()
    assert "Training health: no non-finite value and no collapse in any iteration." in report.split("## Summary")[0]


@pytest.mark.parametrize("last_improved, phrase", [(False, "stopped after 300 steps once 2 measurements"), (True, "NOT at a plateau")])
def test_demo_selection_section(tmp_path, last_improved, phrase):
    workdir = make_workdir(tmp_path)
    summary = json.loads((workdir / "summary.json").read_text())
    summary["demo"] = {
        "theta0": {"steps": 300, "kept_step": 100, "eval_every": 100, "patience": 2, "validation_nll": 0.5, "train_nll": 0.6,
                   "history": [{"step": 100, "improved": True}, {"step": 200, "improved": False}, {"step": 300, "improved": last_improved}]},
        "spin": {"candidates": [{"lr": 3e-5, "validation_exact_match": 0.5}, {"lr": 1e-4, "validation_exact_match": 0.6}], "chosen_lr": 1e-4},
        "control": {"candidates": [{"lr": 3e-5, "validation_exact_match": 0.55}], "chosen_lr": 3e-5},
        "theta0_validation_exact_match": 0.52,
    }
    (workdir / "summary.json").write_text(json.dumps(summary))
    report = write_report(workdir).read_text()
    assert phrase in report
    assert "- SPIN learning rate 0.0001, chosen by validation exact match from: 3e-05 → 0.500, 0.0001 → 0.600." in report
    assert "- SFT control learning rate 3e-05, chosen by validation exact match from: 3e-05 → 0.550." in report


@pytest.fixture
def drawn(monkeypatch):
    """The figures the report saves, by file name: what matplotlib was handed, checked against the run's
    numbers (a PNG's size says nothing about whether the right data was drawn)."""
    from spin_mega.report import plots

    figures = {}
    save = plots.save_png

    def keep(fig, path):
        figures[Path(path).name] = fig
        save(fig, path)

    monkeypatch.setattr(plots, "save_png", keep)
    return figures


def _line(ax, label):
    (line,) = [line for line in ax.get_lines() if line.get_label() == label]
    return [float(x) for x in line.get_xdata()], [float(y) for y in line.get_ydata()]


def test_plots_draw_the_runs_numbers(tmp_path, drawn):
    workdir = make_workdir(tmp_path)
    write_report(workdir)
    metrics = {t: _metrics(t, STEPS) for t in (0, 1)}

    # Loss and rewards: each iteration's logged values at its global steps (iteration 1 after iteration 0's).
    (loss_ax,) = drawn[PLOTS["loss"]].axes
    margin_ax, accuracy_ax = drawn[PLOTS["rewards"]].axes
    for t in (0, 1):
        steps = [t * STEPS + r["step"] for r in metrics[t]]
        assert _line(loss_ax, f"iteration {t}") == (steps, [r["loss"] for r in metrics[t]])
        assert _line(margin_ax, f"iteration {t}") == (steps, [r["reward_margin"] for r in metrics[t]])
        assert _line(accuracy_ax, f"iteration {t}") == (steps, [r["reward_accuracy"] for r in metrics[t]])
    assert _line(loss_ax, "ln 2 (loss at each iteration's first step)")[1] == [LN2, LN2]

    # Held-out: SPIN's theta_(t+1) per iteration, theta_0 and the control as levels, one panel per metric.
    for ax, (key, title) in zip(drawn[PLOTS["heldout"]].axes, [("exact_match", "exact match"), ("heldout_logp_per_token", "logp/token")]):
        assert title in ax.get_title()
        assert _line(ax, r"SPIN $\theta_{t+1}$") == ([0.0, 1.0], [EVALS[0][key], EVALS[1][key]])
        assert _line(ax, r"$\theta_0$ (start SFT model)")[1] == [BASELINE[key]] * 2
    control = {"exact_match": 0.40, "heldout_logp_per_token": -1.65}
    assert _line(drawn[PLOTS["heldout"]].axes[0], "SFT control (24 steps)")[1] == [control["exact_match"]] * 2

    # Lengths: per iteration a human and a generated box whose median is the median of those responses.
    (lengths_ax,) = drawn[PLOTS["lengths"]].axes
    # A box's median line spans its full width (0.7); whiskers are vertical and caps half as wide.
    medians = [
        float(line.get_ydata()[0]) for line in lengths_ax.get_lines()
        if len(set(line.get_ydata())) == 1 and abs(float(line.get_xdata()[-1] - line.get_xdata()[0]) - 0.7) < 1e-9
    ]
    expected = []
    for t in (0, 1):
        rows = _generations(t)
        for side in ("chosen", "rejected"):
            words = sorted(len(r[side].split()) for r in rows)
            expected.append((words[9] + words[10]) / 2)
    assert medians == expected


def test_report_names_the_loss_and_checks_each_first_step_against_its_closed_form(tmp_path):
    import yaml

    workdir = make_workdir(tmp_path)
    config = yaml.safe_load((REPO / "configs" / "tiny-cpu.yaml").read_text())
    config["loss"].update(loss_type="ipo", sft_weight=0.5)
    config["iterations"]["beta"] = [0.1, 0.5]
    (workdir / "config.yaml").write_text(yaml.safe_dump(config))
    for t, nll in ((0, 4.0), (1, 3.0)):
        path = workdir / f"iter_{t}" / "train" / "metrics.jsonl"
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        rows[0]["sft_nll"] = nll
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = write_report(workdir).read_text()
    assert "Loss: IPO (squared margin of per-token means) + 0.5 × the policy's NLL per token of the human responses" in report
    assert "β per iteration 0.1, 0.5" in report
    # 1/(4 beta^2) + 0.5 * NLL: 25 + 2 with beta 0.1, then 1 + 1.5 with beta 0.5 (the per-iteration beta).
    assert "iteration 0: 0.693147 (expected 27.000000), iteration 1: 0.693147 (expected 2.500000)" in report
