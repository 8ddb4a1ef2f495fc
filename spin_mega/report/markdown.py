"""The human-readable report of a work directory: report.md (verdict, tables, notes) beside the plots, under
WORKDIR/report/.

`write_report(workdir)` is called by the loop after every iteration and by `spin-mega report`; it reads
whatever exists (report/load.py), so it never requires a finished run.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Optional

from spin_mega.errors import SpinMegaError
from spin_mega.io import atomic_write_text
from spin_mega.report.health import health_sentence, plot_health
from spin_mega.report.load import Iteration, RunData, as_number, load_run
from spin_mega.report.plots import HELDOUT, LN2, PLOTS, length_unit, plot_heldout, plot_lengths, plot_loss, plot_rewards
from spin_mega.rundir import CONFIG, REPORT_DIR


def _fmt(value, digits: int = 4) -> str:
    number = as_number(value)
    if number is None:
        return "–"
    return f"{number:.{digits}f}"


def _table(run: RunData) -> list[str]:
    unit = length_unit(run)
    header = [
        "iteration",
        "status",
        "steps",
        "final loss",
        "final reward accuracy",
        *(label for _, label in HELDOUT),
        f"mean generated length ({unit})",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]

    def eval_cells(ev: Optional[dict]) -> list[str]:
        return [_fmt((ev or {}).get(key)) for key, _ in HELDOUT]

    if run.baseline:
        lines.append("| " + " | ".join(["θ0 (start)", "reference", "–", "–", "–", *eval_cells(run.baseline), "–"]) + " |")
    for it in run.iterations:
        length, from_summary = it.mean_generated_length(unit)
        length_cell = "–" if length is None else f"{length:.1f}" + (" (summary.json)" if from_summary else "")
        steps = it.steps
        status = "finished" if it.finished else "stopped unhealthy" if it.stopped else "unfinished"
        lines.append(
            "| "
            + " | ".join(
                [
                    str(it.t),
                    status,
                    "–" if steps is None else str(steps),
                    _fmt(it.final("loss")),
                    _fmt(it.final("reward_accuracy")),
                    *eval_cells(it.eval),
                    length_cell,
                ]
            )
            + " |"
        )
    if run.sft_control:
        steps = run.sft_control.get("steps")
        steps_cell = str(int(steps)) if as_number(steps) is not None else "–"
        lines.append("| " + " | ".join(["SFT control", "reference", steps_cell, "–", "–", *eval_cells(run.sft_control["eval"]), "–"]) + " |")
    return lines


def _items(ev: Optional[dict]) -> Optional[list[int]]:
    items = (ev or {}).get("exact_match_items")
    if isinstance(items, list) and items and all(i in (0, 1) for i in items):
        return [int(i) for i in items]
    return None


def paired_comparison(ours: Optional[dict], theirs: Optional[dict]):
    """McNemar's test of two evaluations' per-item exact match, or None when either lacks them."""
    from spin_mega.evaluation.significance import mcnemar

    a, b = _items(ours), _items(theirs)
    if a is None or b is None or len(a) != len(b):
        return None
    return mcnemar(a, b)


def verdict(run: RunData) -> str:
    """One plain sentence: did the last finished SPIN iteration beat, tie with or lose to the SFT control on
    the task metric? "beat" and "lost to" are said only when a paired test on per-item exact match finds
    the difference significant; without per-item results no verdict word is used at all."""
    finished = [it for it in run.iterations if it.finished]
    if run.sft_control is None:
        return "This run has no SFT control, so whether SPIN beat it cannot be said."
    if not finished:
        return "No SPIN iteration has finished its evaluation yet, so it cannot be compared with the SFT control."
    last = finished[-1]
    control = run.sft_control["eval"]
    test = paired_comparison(last.eval, control)
    if test is not None:
        from spin_mega.evaluation.significance import ALPHA

        return (
            f"SPIN {test.word} the SFT control on held-out exact match: {test.a:.3f} ± {test.a_se:.3f} after "
            f"iteration {last.t} versus {test.b:.3f} ± {test.b_se:.3f} for the SFT control (± one standard error, "
            f"n = {test.n}; McNemar's exact test on the {test.a_only + test.b_only} items where they differ, "
            f"SPIN right on {test.a_only} and the control on {test.b_only}: p = {test.p_value:.3g}, "
            f"{'significant' if test.p_value < ALPHA else 'not significant'} at {ALPHA})."
        )
    for key, name in (("exact_match", "held-out exact match"), ("heldout_logp_per_token", "held-out log-likelihood per token")):
        ours, theirs = as_number(last.eval.get(key)), as_number(control.get(key))
        if ours is not None and theirs is not None:
            break
    else:
        return (
            f"SPIN iteration {last.t} and the SFT control share neither an exact-match nor a held-out "
            "log-likelihood measurement, so they cannot be compared."
        )
    fallback = "" if key == "exact_match" else " (exact match was not measured for both, so the log-likelihood is used)"
    order = "higher than" if ours > theirs else ("lower than" if ours < theirs else "the same as")
    return (
        f"SPIN scored {order} the SFT control: {name} {ours:.4f} after iteration {last.t} versus {theirs:.4f} "
        f"for the SFT control{fallback}. Per-item results are missing, so no paired test was possible and "
        "this run cannot say whether SPIN beat, tied or lost."
    )


# A SPIN iteration that learns shows three things in its own training log: the loss leaves ln 2 (the
# policy separates human from own responses), the reward margin grows, and the model's own samples lose
# log-prob relative to the opponent (negative rejected reward). Each is judged on the last tenth of the
# iteration's steps against its first tenth.
LOSS_DROP = 0.1  # "well below ln 2": at least this far below it


def signatures(it: Iteration) -> Optional[dict]:
    """The three SPIN signatures of one iteration's metrics, each with the numbers it was judged on."""
    rows = [r for r in it.metrics if all(as_number(r.get(k)) is not None for k in ("loss", "reward_margin", "reward_rejected"))]
    if len(rows) < 2:
        return None
    k = max(1, len(rows) // 10)

    def mean(part, key):
        return sum(float(r[key]) for r in part) / len(part)

    head, tail = rows[:k], rows[-k:]
    loss, margin0, margin1, rejected = mean(tail, "loss"), mean(head, "reward_margin"), mean(tail, "reward_margin"), mean(tail, "reward_rejected")
    return {
        "loss": (loss <= LN2 - LOSS_DROP, f"loss {loss:.3f} over the last {k} steps (ln 2 − {LOSS_DROP} = {LN2 - LOSS_DROP:.3f})"),
        "margin": (margin1 > margin0 and margin1 > 0, f"reward margin {margin0:.3f} → {margin1:.3f}"),
        "own_samples": (rejected < 0, f"rejected reward {rejected:.3f} (β·log-prob change of its own samples)"),
    }


def _signature_lines(run: RunData) -> list[str]:
    labels = {
        "loss": "loss falls well below ln 2",
        "margin": "reward margin grows",
        "own_samples": "own samples lose log-prob",
    }
    lines = []
    for it in run.iterations:
        sig = signatures(it)
        if sig is None:
            continue
        cells = [f"{labels[name]}: {'held' if ok else 'did NOT hold'} ({detail})" for name, (ok, detail) in sig.items()]
        lines.append(f"- iteration {it.t}: " + "; ".join(cells) + ".")
    return lines


def _comparison_lines(run: RunData) -> list[str]:
    """Each arm's exact match ± one standard error, and the paired tests behind the verdict."""
    from spin_mega.evaluation.significance import mean_and_se

    arms = [("θ0 (start)", run.baseline)]
    arms += [(f"SPIN iteration {it.t}", it.eval) for it in run.iterations if it.finished]
    if run.sft_control:
        arms.append(("SFT control", run.sft_control["eval"]))
    rows = []
    for name, ev in arms:
        items = _items(ev)
        if items is not None:
            p, se = mean_and_se(items)
            rows.append(f"| {name} | {p:.3f} ± {se:.3f} | {len(items)} |")
    if not rows:
        return []
    lines = ["| arm | exact match ± SE | items |", "|---|---|---|", *rows, ""]
    finished = [it for it in run.iterations if it.finished]
    if finished:
        last = finished[-1]
        for other, ev in (("the SFT control", run.sft_control["eval"] if run.sft_control else None), ("θ0", run.baseline)):
            test = paired_comparison(last.eval, ev)
            if test is not None:
                lines.append(
                    f"- SPIN (iteration {last.t}) {test.word} {other}: {test.a:.3f} vs {test.b:.3f}, "
                    f"{test.a_only} items only SPIN got right, {test.b_only} only {other}; McNemar p = {test.p_value:.3g}."
                )
    return lines


def _demo_lines(demo: dict) -> list[str]:
    lines = []
    sft = demo.get("theta0") or {}
    if sft:
        history = sft.get("history") or []
        plateau = bool(history) and not history[-1].get("improved", True)
        stop = (f"stopped after {sft.get('steps')} steps once {sft.get('patience')} measurements in a row failed to "
                "improve it by more than two paired standard errors and 1% (each such measurement cut the learning rate 0.3×)"
                if plateau else
                f"reached its cap of {sft.get('steps')} steps while still improving: NOT at a plateau")
        lines.append(
            f"- θ0: SFT from a random init, validation loss measured every {sft.get('eval_every')} steps; {stop}; "
            f"kept step {sft.get('kept_step')} (validation NLL/token {_fmt(sft.get('validation_nll'))}, "
            f"training {_fmt(sft.get('train_nll'))})."
        )
    for arm, label in (("spin", "SPIN"), ("control", "SFT control")):
        grid = demo.get(arm) or {}
        if grid.get("candidates"):
            cells = ", ".join(f"{c['lr']:g} → {c['validation_exact_match']:.3f}" for c in grid["candidates"])
            lines.append(f"- {label} learning rate {grid['chosen_lr']:g}, chosen by validation exact match from: {cells}"
                         + (f" ({grid['note']})" if grid.get("note") else "") + ".")
    if demo.get("theta0_validation_exact_match") is not None:
        lines.append(f"- θ0's validation exact match: {demo['theta0_validation_exact_match']:.3f}.")
    if demo.get("optimizer"):
        lines.append(f"- Both arms: {demo['optimizer']}.")
    return lines


def _unfinished_note(run: RunData) -> Optional[str]:
    parts = []
    for it in run.iterations:
        if it.finished:
            continue
        has = []
        if it.lengths is not None:
            has.append(f"{len(it.lengths)} generations")
        if it.metrics:
            has.append(f"training metrics up to step {int(it.metrics[-1]['step'])}")
        parts.append(f"iteration {it.t} ({', '.join(has) + ', ' if has else ''}no evaluation yet)")
    if not parts:
        return None
    return "Unfinished: " + "; ".join(parts) + ". Their numbers above are the latest logged, not final."


def _run_config(run: RunData):
    """The loop's resolved config (WORKDIR/config.yaml), or None where there is none to read."""
    from spin_mega.config import load_config

    with contextlib.suppress(SpinMegaError):
        return load_config(run.workdir / CONFIG) if (run.workdir / CONFIG).is_file() else None
    return None


def _first_step_note(run: RunData) -> Optional[str]:
    # At step 1 the policy equals the opponent, so the loss has a closed form: a cheap sanity check.
    firsts = [(it.t, it.metrics[0]) for it in run.iterations if it.metrics and int(it.metrics[0]["step"]) == 1]
    if not firsts:
        return None
    cfg = _run_config(run)
    if cfg is None:
        values = ", ".join(f"iteration {t}: {_fmt(as_number(row.get('loss')), 6)}" for t, row in firsts)
        return f"First-step loss (ln 2 = {LN2:.6f} expected with the logistic loss): {values}."
    import dataclasses

    from spin_mega.config import iteration_beta
    from spin_mega.training.loss import first_step_loss

    def expected(t: int, row: dict) -> float:
        loss = dataclasses.replace(cfg.loss, beta=iteration_beta(cfg, t))
        return first_step_loss(loss, as_number(row.get("sft_nll")) or 0.0)

    values = ", ".join(f"iteration {t}: {_fmt(as_number(row.get('loss')), 6)} (expected {expected(t, row):.6f})" for t, row in firsts)
    return f"First-step loss against its closed form for this loss (policy = opponent): {values}."


def _loss_note(run: RunData) -> Optional[str]:
    cfg = _run_config(run)
    if cfg is None:
        return None
    from spin_mega.config import iteration_beta
    from spin_mega.training.loss import describe

    if cfg.iterations.beta is None:
        return f"Loss: {describe(cfg.loss)}; β {cfg.loss.beta:g} in every iteration."
    return f"Loss: {describe(cfg.loss)}; β per iteration {', '.join(f'{b:g}' for b in cfg.iterations.beta)} (the last repeats)."


def render_markdown(run: RunData, plots: dict[str, bool]) -> str:
    lines = [f"# SPIN report: `{run.workdir.resolve().name}`", "", "## Verdict", "", verdict(run), ""]
    health = health_sentence(run)
    lines += [health, ""] if health else []
    lines += ["## Summary", ""]
    if not run.iterations:
        lines += ["No SPIN iteration has started yet.", ""]
    lines += _table(run)
    lines += [
        "",
        "Held-out columns of iteration t evaluate θ(t+1), the model that iteration trained; "
        "final loss and reward accuracy are the last optimizer step's.",
    ]
    unit = length_unit(run)
    lines += [
        "",
        f"Lengths (the table's generated length and the length plot) are in {unit} for both human and "
        "generated responses"
        + (
            ", counted by whitespace because generations.jsonl does not carry token counts (meta.num_tokens "
            "and meta.chosen_num_tokens) for both."
            if unit == "words"
            else ", from generations.jsonl's meta.num_tokens and meta.chosen_num_tokens."
        ),
    ]
    for note in (_unfinished_note(run), _loss_note(run), _first_step_note(run)):
        if note:
            lines += ["", note]
    comparison = _comparison_lines(run)
    if comparison:
        lines += ["", "## Paired comparison on the held-out items", "", *comparison]
    gates = _signature_lines(run)
    if gates:
        lines += ["", "## SPIN signatures (see the loss and reward plots)", "", *gates]
    if run.demo:
        lines += ["", "## How the demo chose its models (validation split only)", "", *_demo_lines(run.demo)]
    lines += ["", "## Plots", ""]
    titles = {
        "loss": "Training loss per step",
        "rewards": "Reward margin and reward accuracy per step",
        "heldout": "Held-out metrics per iteration",
        "lengths": "Response lengths, human vs generated",
        "health": "Training health: log-prob per token relative to θt",
    }
    missing = {
        "loss": "no training metrics yet",
        "rewards": "no training metrics yet",
        "heldout": "no evaluation yet",
        "lengths": "no generations yet",
        "health": "no training metrics with log-prob changes yet",
    }
    for name, title in titles.items():
        lines += [f"### {title}", ""]
        lines.append(f"![{title}]({PLOTS[name]})" if plots[name] else f"Not drawn: {missing[name]}.")
        lines.append("")
    return "\n".join(lines)


def write_report(workdir: str | Path) -> Path:
    """Writes WORKDIR/report/{report.md, *.png} from whatever the work directory holds; returns report.md.

    Every file is written under a temporary name and renamed, and report.md goes last, so a reader never
    sees a half-written file or a report pointing at a plot that is not there yet."""
    run = load_run(workdir)
    out = Path(workdir) / REPORT_DIR
    out.mkdir(parents=True, exist_ok=True)
    drawers = {"loss": plot_loss, "rewards": plot_rewards, "heldout": plot_heldout, "lengths": plot_lengths, "health": plot_health}
    plots = {name: draw(run, out / PLOTS[name]) for name, draw in drawers.items()}
    report = out / "report.md"
    atomic_write_text(report, render_markdown(run, plots))
    for name, drawn in plots.items():
        if not drawn:
            # A plot left by an earlier report would sit beside this one and contradict it.
            with contextlib.suppress(FileNotFoundError):
                (out / PLOTS[name]).unlink()
    return report
