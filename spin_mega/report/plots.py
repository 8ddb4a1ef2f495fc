"""The report's plots: training loss, implicit rewards, held-out metrics and response lengths, as PNGs."""

from __future__ import annotations

import math
from pathlib import Path

from spin_mega.io import atomic_open
from spin_mega.report.load import Iteration, RunData, as_number

LN2 = math.log(2.0)
PLOTS = {
    "loss": "loss.png",
    "rewards": "rewards.png",
    "heldout": "heldout.png",
    "lengths": "lengths.png",
    "health": "health.png",
}
# Held-out metrics as (EVAL key, table/plot label); exact match first because it decides the verdict.
HELDOUT = (
    ("exact_match", "held-out exact match"),
    ("heldout_logp_per_token", "held-out logp/token"),
    ("heldout_reward_accuracy", "held-out reward accuracy"),
)


def new_figure(width: float, height: float, rows: int = 1, cols: int = 1, **kwargs):
    # An explicit Agg canvas instead of pyplot: the loop calls this inside a long-lived process, where
    # pyplot's global figure registry and backend selection would leak state (and need a display).
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False, **kwargs)
    return fig, axes


def save_png(fig, path: Path) -> None:
    with atomic_open(path, "wb") as handle:
        fig.savefig(handle, format="png", dpi=110)


def colors(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10"]
    return [cmap(i % 10) for i in range(n)]


def step_offsets(iterations: list[Iteration]) -> dict[int, int]:
    """Global-step offset of each iteration: the steps of all earlier ones (logged or summarised)."""
    offsets, total = {}, 0
    for it in iterations:
        offsets[it.t] = total
        total += it.steps or 0
    return offsets


def series(it: Iteration, key: str, offset: int) -> tuple[list[float], list[float]]:
    xs, ys = [], []
    for row in it.metrics:
        value = as_number(row.get(key))
        if value is not None:
            xs.append(offset + int(row["step"]))
            ys.append(value)
    return xs, ys


def mark_boundaries(ax, iterations: list[Iteration], offsets: dict[int, int]) -> None:
    for it in iterations[1:]:
        if it.metrics:
            ax.axvline(offsets[it.t] + 0.5, color="0.8", linewidth=0.8, linestyle=":")


def plot_loss(run: RunData, path: Path) -> bool:
    trained = [it for it in run.iterations if it.metrics]
    if not trained:
        return False
    offsets = step_offsets(run.iterations)
    fig, axes = new_figure(8, 4.5)
    ax = axes[0][0]
    for it, color in zip(trained, colors(len(trained))):
        xs, ys = series(it, "loss", offsets[it.t])
        ax.plot(xs, ys, color=color, linewidth=1.2, marker="." if len(xs) < 40 else None, label=f"iteration {it.t}")
    ax.axhline(LN2, color="black", linestyle="--", linewidth=0.9, label="ln 2 (loss at each iteration's first step)")
    mark_boundaries(ax, run.iterations, offsets)
    ax.set_xlabel("global optimizer step (across iterations)")
    ax.set_ylabel("SPIN loss")
    ax.set_title("Training loss per step")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")
    save_png(fig, path)
    return True


def plot_rewards(run: RunData, path: Path) -> bool:
    trained = [it for it in run.iterations if it.metrics]
    if not trained:
        return False
    offsets = step_offsets(run.iterations)
    fig, axes = new_figure(8, 6.5, rows=2, sharex=True)
    margin_ax, acc_ax = axes[0][0], axes[1][0]
    for it, color in zip(trained, colors(len(trained))):
        marker = "." if len(it.metrics) < 40 else None
        margin_ax.plot(*series(it, "reward_margin", offsets[it.t]), color=color, marker=marker, linewidth=1.2, label=f"iteration {it.t}")
        acc_ax.plot(*series(it, "reward_accuracy", offsets[it.t]), color=color, marker=marker, linewidth=1.2, label=f"iteration {it.t}")
    margin_ax.axhline(0.0, color="black", linewidth=0.8)
    margin_ax.set_ylabel("reward margin\n(chosen − rejected)")
    margin_ax.set_title("Implicit rewards per step")
    acc_ax.set_ylabel("reward accuracy")
    acc_ax.set_ylim(-0.03, 1.03)
    acc_ax.set_xlabel("global optimizer step (across iterations)")
    for ax in (margin_ax, acc_ax):
        mark_boundaries(ax, run.iterations, offsets)
        ax.grid(alpha=0.3)
    margin_ax.legend(fontsize="small")
    save_png(fig, path)
    return True


def plot_heldout(run: RunData, path: Path) -> bool:
    finished = [it for it in run.iterations if it.finished]
    if not finished and run.baseline is None and run.sft_control is None:
        return False
    fig, axes = new_figure(13, 4.2, cols=3)
    control = run.sft_control["eval"] if run.sft_control else None
    for ax, (key, label) in zip(axes[0], HELDOUT):
        xs = [it.t for it in finished if as_number(it.eval.get(key)) is not None]
        ys = [float(it.eval[key]) for it in finished if as_number(it.eval.get(key)) is not None]
        drawn = False
        if xs:
            ax.plot(xs, ys, marker="o", color="tab:blue", label=r"SPIN $\theta_{t+1}$")
            drawn = True
        if run.baseline and as_number(run.baseline.get(key)) is not None:
            ax.axhline(run.baseline[key], color="0.4", linestyle="--", label=r"$\theta_0$ (start SFT model)")
            drawn = True
        if control and as_number(control.get(key)) is not None:
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
    save_png(fig, path)
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
    fig, axes = new_figure(max(7.0, 1.6 * len(generated) + 3), 4.5)
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
    save_png(fig, path)
    return True
