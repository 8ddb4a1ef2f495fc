"""The human-readable report of a work directory: PNG plots and report.md under WORKDIR/report/.

`write_report(workdir)` is called by the loop after every iteration and by `spin-mega report`, so it reads
whatever exists and never requires a finished run: an iteration counts as finished once its evaluation is
known (from summary.json, or from iter_<t>/eval.json written just before the summary entry); everything
else is reported as unfinished with what it has so far.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from spin_mega.errors import SpinMegaError
from spin_mega.io import atomic_open, atomic_write_text, read_jsonl
from spin_mega.report_health import health_sentence, plot_health, read_health

LN2 = math.log(2.0)
REPORT_DIR = "report"
PLOTS = {
    "loss": "loss.png",
    "rewards": "rewards.png",
    "heldout": "heldout.png",
    "lengths": "lengths.png",
    "health": "health.png",
}
_ITER_DIR = re.compile(r"^iter_(\d+)$")
# Held-out metrics as (EVAL key, table/plot label); exact match first because it decides the verdict.
HELDOUT = (
    ("exact_match", "held-out exact match"),
    ("heldout_logp_per_token", "held-out logp/token"),
    ("heldout_reward_accuracy", "held-out reward accuracy"),
)


@dataclass
class Lengths:
    """Per-row response lengths of one generations file, in both units, so one unit can be chosen for
    the whole run (comparing generated tokens with human words would be meaningless)."""

    chosen_words: list[int] = field(default_factory=list)
    rejected_words: list[int] = field(default_factory=list)
    rejected_tokens: list[Optional[int]] = field(default_factory=list)
    chosen_tokens: list[Optional[int]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.rejected_words)


@dataclass
class Iteration:
    t: int
    entry: dict = field(default_factory=dict)  # this iteration's summary.json entry, {} if none yet
    eval: Optional[dict] = None
    metrics: list[dict] = field(default_factory=list)
    lengths: Optional[Lengths] = None  # None when generations.jsonl does not exist
    health: Optional[dict] = None  # train_summary.json's health entry
    stopped: Optional[dict] = None  # the record of a training stopped unhealthy (training/health.py)

    @property
    def finished(self) -> bool:
        return self.eval is not None

    @property
    def steps(self) -> Optional[int]:
        train = self.entry.get("train") or {}
        if isinstance(train.get("steps"), (int, float)):
            return int(train["steps"])
        return int(self.metrics[-1]["step"]) if self.metrics else None

    def final(self, key: str) -> Optional[float]:
        """The summary's final_<key>, else the last logged value, so a running iteration shows progress."""
        train = self.entry.get("train") or {}
        value = train.get(f"final_{key}")
        if value is None and self.metrics:
            value = self.metrics[-1].get(key)
        return _number(value)

    def mean_generated_length(self, unit: str) -> tuple[Optional[float], bool]:
        """Mean generated-response length in the run's length unit, from generations.jsonl so that it
        matches the length plot; (value, True) when only summary.json's figure is available."""
        if self.lengths:
            values = self.lengths.rejected_tokens if unit == "tokens" else self.lengths.rejected_words
            return sum(values) / len(values), False
        gen = self.entry.get("generation") or {}
        return _number(gen.get("mean_response_tokens")), True


@dataclass
class RunData:
    workdir: Path
    iterations: list[Iteration]
    baseline: Optional[dict]  # EVAL of theta_0
    sft_control: Optional[dict]  # {"steps": int, "eval": EVAL}
    demo: Optional[dict] = None  # the demo's model selection (summary.json "demo"), when present


# ---------------------------------------------------------------------------------------------- reading


def _number(value) -> Optional[float]:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def _read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    by_step: dict[int, dict] = {}
    for row in read_jsonl(path):
        step = _number(row.get("step"))
        if step is not None:
            by_step[int(step)] = row  # a resumed run may repeat a step; the later line is the kept one
    return [by_step[s] for s in sorted(by_step)]


def _count(value) -> Optional[int]:
    number = _number(value)
    return int(number) if number is not None else None


def _read_lengths(path: Path) -> Optional[Lengths]:
    if not path.is_file():
        return None
    lengths = Lengths()
    for row in read_jsonl(path):
        chosen, rejected = row.get("chosen"), row.get("rejected")
        if not isinstance(chosen, str) or not isinstance(rejected, str):
            continue
        meta = row.get("meta") if isinstance(row.get("meta"), dict) else {}
        lengths.chosen_words.append(len(chosen.split()))
        lengths.rejected_words.append(len(rejected.split()))
        lengths.rejected_tokens.append(_count(meta.get("num_tokens")))
        lengths.chosen_tokens.append(_count(meta.get("chosen_num_tokens")))
    return lengths


def _read_json(path: Path, what: str):
    try:
        return json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SpinMegaError(f"cannot read {what} {path} ({exc})") from None


def _eval_or_none(value) -> Optional[dict]:
    return value if isinstance(value, dict) and value else None


def load_run(workdir: str | Path) -> RunData:
    workdir = Path(workdir)
    if not workdir.exists():
        raise SpinMegaError(f"work directory {workdir} does not exist")
    if not workdir.is_dir():
        raise SpinMegaError(f"work directory {workdir} is not a directory")
    summary = {}
    summary_path = workdir / "summary.json"
    if summary_path.is_file():
        summary = _read_json(summary_path, "the run summary")
        if not isinstance(summary, dict):
            raise SpinMegaError(f"{summary_path} is not a JSON object")

    entries: dict[int, dict] = {}
    for entry in summary.get("iterations") or []:
        if isinstance(entry, dict) and _number(entry.get("iteration")) is not None:
            entries[int(entry["iteration"])] = entry
    on_disk = {int(m.group(1)) for p in workdir.iterdir() if p.is_dir() and (m := _ITER_DIR.match(p.name))}

    iterations = []
    for t in sorted(set(entries) | on_disk):
        it = Iteration(t=t, entry=entries.get(t, {}))
        it.eval = _eval_or_none(it.entry.get("eval"))
        eval_path = workdir / f"iter_{t}" / "eval.json"
        if it.eval is None and eval_path.is_file():
            with contextlib.suppress(SpinMegaError):
                it.eval = _eval_or_none(_read_json(eval_path, "the evaluation"))
        it.metrics = _read_metrics(workdir / f"iter_{t}" / "train" / "metrics.jsonl")
        it.lengths = _read_lengths(workdir / f"iter_{t}" / "generations.jsonl")
        it.health, it.stopped = read_health(workdir / f"iter_{t}" / "train", it.entry)
        iterations.append(it)

    if not summary_path.is_file() and not any(it.metrics for it in iterations):
        raise SpinMegaError(f"{workdir} has no summary.json and no training metrics, so there is nothing to report")
    baseline = _eval_or_none((summary.get("baseline") or {}).get("eval"))
    if baseline is None and (workdir / "baseline_eval.json").is_file():
        # The loop evaluates theta_0 before any summary entry exists; show it while iteration 0 runs.
        with contextlib.suppress(SpinMegaError):
            baseline = _eval_or_none(_read_json(workdir / "baseline_eval.json", "the baseline evaluation"))
    control = summary.get("sft_control")
    control = control if isinstance(control, dict) and _eval_or_none(control.get("eval")) else None
    demo = summary.get("demo") if isinstance(summary.get("demo"), dict) else None
    return RunData(workdir, iterations, baseline, control, demo)


# ---------------------------------------------------------------------------------------------- plots


def _new_figure(width: float, height: float, rows: int = 1, cols: int = 1, **kwargs):
    # An explicit Agg canvas instead of pyplot: the loop calls this inside a long-lived process, where
    # pyplot's global figure registry and backend selection would leak state (and need a display).
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False, **kwargs)
    return fig, axes


def _save_png(fig, path: Path) -> None:
    with atomic_open(path, "wb") as handle:
        fig.savefig(handle, format="png", dpi=110)


def _colors(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return [cmap(i % 10) for i in range(n)]


def _step_offsets(iterations: list[Iteration]) -> dict[int, int]:
    """Global-step offset of each iteration: the steps of all earlier ones (logged or summarised)."""
    offsets, total = {}, 0
    for it in iterations:
        offsets[it.t] = total
        total += it.steps or 0
    return offsets


def _series(it: Iteration, key: str, offset: int) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for row in it.metrics:
        value = _number(row.get(key))
        if value is not None:
            xs.append(offset + int(row["step"]))
            ys.append(value)
    return xs, ys


def _mark_boundaries(ax, iterations: list[Iteration], offsets: dict[int, int]) -> None:
    for it in iterations[1:]:
        if it.metrics:
            ax.axvline(offsets[it.t] + 0.5, color="0.8", linewidth=0.8, linestyle=":")


def plot_loss(run: RunData, path: Path) -> bool:
    trained = [it for it in run.iterations if it.metrics]
    if not trained:
        return False
    offsets = _step_offsets(run.iterations)
    fig, axes = _new_figure(8, 4.5)
    ax = axes[0][0]
    for it, color in zip(trained, _colors(len(trained))):
        xs, ys = _series(it, "loss", offsets[it.t])
        ax.plot(xs, ys, color=color, linewidth=1.2, marker="." if len(xs) < 40 else None, label=f"iteration {it.t}")
    ax.axhline(LN2, color="black", linestyle="--", linewidth=0.9, label="ln 2 (loss at each iteration's first step)")
    _mark_boundaries(ax, run.iterations, offsets)
    ax.set_xlabel("global optimizer step (across iterations)")
    ax.set_ylabel("SPIN loss")
    ax.set_title("Training loss per step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    _save_png(fig, path)
    return True


def plot_rewards(run: RunData, path: Path) -> bool:
    trained = [it for it in run.iterations if it.metrics]
    if not trained:
        return False
    offsets = _step_offsets(run.iterations)
    fig, axes = _new_figure(8, 6.5, rows=2, sharex=True)
    margin_ax, acc_ax = axes[0][0], axes[1][0]
    for it, color in zip(trained, _colors(len(trained))):
        marker = "." if len(it.metrics) < 40 else None
        margin_ax.plot(*_series(it, "reward_margin", offsets[it.t]), color=color, marker=marker, linewidth=1.2, label=f"iteration {it.t}")
        acc_ax.plot(*_series(it, "reward_accuracy", offsets[it.t]), color=color, marker=marker, linewidth=1.2, label=f"iteration {it.t}")
    margin_ax.axhline(0.0, color="black", linewidth=0.8)
    margin_ax.set_ylabel("reward margin\n(chosen − rejected)")
    margin_ax.set_title("Implicit rewards per step")
    acc_ax.set_ylabel("reward accuracy")
    acc_ax.set_ylim(-0.03, 1.03)
    acc_ax.set_xlabel("global optimizer step (across iterations)")
    for ax in (margin_ax, acc_ax):
        _mark_boundaries(ax, run.iterations, offsets)
        ax.grid(alpha=0.3)
    margin_ax.legend(fontsize="small")
    _save_png(fig, path)
    return True


def plot_heldout(run: RunData, path: Path) -> bool:
    finished = [it for it in run.iterations if it.finished]
    if not finished and run.baseline is None and run.sft_control is None:
        return False
    fig, axes = _new_figure(13, 4.2, cols=3)
    control = run.sft_control["eval"] if run.sft_control else None
    for ax, (key, label) in zip(axes[0], HELDOUT):
        xs = [it.t for it in finished if _number(it.eval.get(key)) is not None]
        ys = [float(it.eval[key]) for it in finished if _number(it.eval.get(key)) is not None]
        drawn = False
        if xs:
            ax.plot(xs, ys, marker="o", color="tab:blue", label=r"SPIN $\theta_{t+1}$")
            drawn = True
        if run.baseline and _number(run.baseline.get(key)) is not None:
            ax.axhline(run.baseline[key], color="0.4", linestyle="--", label=r"$\theta_0$ (start SFT model)")
            drawn = True
        if control and _number(control.get(key)) is not None:
            steps = run.sft_control.get("steps")
            ax.axhline(control[key], color="tab:orange", linestyle="-.", label=f"SFT control ({steps} steps)" if steps else "SFT control")
            drawn = True
        if not drawn:
            ax.text(0.5, 0.5, "not measured in this run", ha="center", va="center", transform=ax.transAxes, color="0.5")
        else:
            ax.legend(fontsize="small")
        ax.set_title(label)
        ax.set_xlabel("iteration t")
        ax.grid(alpha=0.3)
        if run.iterations:
            # Every iteration gets a tick, evaluated or not, so a missing point reads as "not yet" and a
            # single point does not get a fractional axis.
            ticks = [it.t for it in run.iterations]
            ax.set_xticks(ticks)
            ax.set_xlim(min(ticks) - 0.5, max(ticks) + 0.5)
    fig.suptitle(r"Held-out evaluation of $\theta_{t+1}$ (the model trained in iteration t)")
    _save_png(fig, path)
    return True


def length_unit(run: RunData) -> str:
    """Tokens only when every row carries both token counts; otherwise whitespace words for both sides."""
    rows = [it.lengths for it in run.iterations if it.lengths]
    if rows and all(n is not None for ls in rows for n in ls.rejected_tokens + ls.chosen_tokens):
        return "tokens"
    return "words"


def plot_lengths(run: RunData, path: Path) -> bool:
    generated = [it for it in run.iterations if it.lengths]
    if not generated:
        return False
    unit = length_unit(run)
    fig, axes = _new_figure(max(7.0, 1.6 * len(generated) + 3), 4.5)
    ax = axes[0][0]
    data, positions, colors = [], [], []
    for i, it in enumerate(generated):
        ls = it.lengths
        human = ls.chosen_tokens if unit == "tokens" else ls.chosen_words
        model = ls.rejected_tokens if unit == "tokens" else ls.rejected_words
        data += [human, model]
        positions += [3 * i + 0.6, 3 * i + 1.4]
        colors += ["tab:green", "tab:red"]
    boxes = ax.boxplot(
        data,
        positions=positions,
        widths=0.7,
        patch_artist=True,
        showmeans=True,
        medianprops={"color": "black"},
        meanprops={"marker": "^", "markerfacecolor": "white", "markeredgecolor": "black"},
    )
    for patch, color in zip(boxes["boxes"], colors):
        patch.set_facecolor(color)
        patch.set_alpha(0.45)
    ax.set_xticks([3 * i + 1 for i in range(len(generated))], [f"iteration {it.t}\n(n={len(it.lengths)})" for it in generated])
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    ax.legend(
        handles=[
            Patch(facecolor="tab:green", alpha=0.45, label="human (chosen)"),
            Patch(facecolor="tab:red", alpha=0.45, label=r"generated by $\theta_t$ (rejected)"),
            Line2D([], [], color="black", label="median"),
            Line2D([], [], linestyle="", marker="^", markerfacecolor="white", markeredgecolor="black", label="mean"),
        ],
        fontsize="small",
        # Outside the axes: any corner inside can hide a box, depending on the lengths.
        loc="upper left",
        bbox_to_anchor=(1.01, 1.0),
    )
    ax.set_ylabel(f"response length ({unit})")
    ax.set_title("Response lengths: human vs generated")
    ax.grid(axis="y", alpha=0.3)
    _save_png(fig, path)
    return True


# ---------------------------------------------------------------------------------------------- markdown


def _fmt(value, digits: int = 4) -> str:
    number = _number(value)
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
        steps_cell = str(int(steps)) if _number(steps) is not None else "–"
        lines.append("| " + " | ".join(["SFT control", "reference", steps_cell, "–", "–", *eval_cells(run.sft_control["eval"]), "–"]) + " |")
    return lines


def _items(ev: Optional[dict]) -> Optional[list[int]]:
    items = (ev or {}).get("exact_match_items")
    if isinstance(items, list) and items and all(i in (0, 1) for i in items):
        return [int(i) for i in items]
    return None


def paired_comparison(ours: Optional[dict], theirs: Optional[dict]):
    """McNemar's test of two evaluations' per-item exact match, or None when either lacks them."""
    from spin_mega.significance import mcnemar

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
        from spin_mega.significance import ALPHA

        return (
            f"SPIN {test.word} the SFT control on held-out exact match: {test.a:.3f} ± {test.a_se:.3f} after "
            f"iteration {last.t} versus {test.b:.3f} ± {test.b_se:.3f} for the SFT control (± one standard error, "
            f"n = {test.n}; McNemar's exact test on the {test.a_only + test.b_only} items where they differ, "
            f"SPIN right on {test.a_only} and the control on {test.b_only}: p = {test.p_value:.3g}, "
            f"{'significant' if test.p_value < ALPHA else 'not significant'} at {ALPHA})."
        )
    for key, name in (("exact_match", "held-out exact match"), ("heldout_logp_per_token", "held-out log-likelihood per token")):
        ours, theirs = _number(last.eval.get(key)), _number(control.get(key))
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
    rows = [r for r in it.metrics if all(_number(r.get(k)) is not None for k in ("loss", "reward_margin", "reward_rejected"))]
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
    from spin_mega.significance import mean_and_se

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
        return load_config(run.workdir / "config.yaml") if (run.workdir / "config.yaml").is_file() else None
    return None


def _first_step_note(run: RunData) -> Optional[str]:
    # At step 1 the policy equals the opponent, so the loss has a closed form: a cheap sanity check.
    firsts = [(it.t, it.metrics[0]) for it in run.iterations if it.metrics and int(it.metrics[0]["step"]) == 1]
    if not firsts:
        return None
    cfg = _run_config(run)
    if cfg is None:
        values = ", ".join(f"iteration {t}: {_fmt(_number(row.get('loss')), 6)}" for t, row in firsts)
        return f"First-step loss (ln 2 = {LN2:.6f} expected with the logistic loss): {values}."
    import dataclasses

    from spin_mega.config import per_iteration
    from spin_mega.training.loss import first_step_loss

    def expected(t: int, row: dict) -> float:
        loss = dataclasses.replace(cfg.loss, beta=per_iteration(cfg.iterations.beta, t))
        return first_step_loss(loss, _number(row.get("sft_nll")) or 0.0)

    values = ", ".join(f"iteration {t}: {_fmt(_number(row.get('loss')), 6)} (expected {expected(t, row):.6f})" for t, row in firsts)
    return f"First-step loss against its closed form for this loss (policy = opponent): {values}."


def _loss_note(run: RunData) -> Optional[str]:
    cfg = _run_config(run)
    if cfg is None:
        return None
    from spin_mega.training.loss import describe

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
