"""Views of the search itself: learning curves, ASHA's stopping decisions, parallel coordinates.

These answer "what did the search do?" rather than "what is best?": whether ASHA stopped the
right trials, whether the top trials were still improving, and where in the space the good
trials sit. ``best_config.py`` puts them in its report and the notebook shows them inline.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from matplotlib import colormaps
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

from tune_cifar.analysis._study import CATEGORICAL, Study, fmt, log_spans_decades, native
from tune_cifar.outcome import Outcome

# The finished trials' statuses: (colour, marker, the outcome's words)
STATUS_STYLE = {
    Outcome.COMPLETED.status: ("tab:green", "o", Outcome.COMPLETED.console),
    Outcome.STOPPED.status: ("tab:orange", "X", Outcome.STOPPED.console),
}


def plot_learning_curves(study: Study, top: int = 5) -> Figure:
    """Validation accuracy and loss per epoch of the ``top`` best trials: were they still improving?

    A diverged trial (a validation loss in the thousands) would flatten every other curve, so
    the loss axis stops above the others and the trials it clips are named in its title.
    ASHA-stopped trials end in a cross: their curves are shorter by design, not by failure.
    """
    finished = study.require_finished().head(top)
    epochs = study.table("epochs")
    fig = Figure(figsize=(11, 4.4), layout="constrained")
    acc_ax, loss_ax = fig.subplots(1, 2)
    losses: dict[str, np.ndarray] = {}
    for rank, row in enumerate(finished.itertuples(), start=1):
        curve = epochs[epochs["trial_id"] == row.trial_id].sort_values("epoch")
        stopped = row.status == Outcome.STOPPED.status
        label = f"#{rank} {row.trial_id} ({100 * row.best_val_acc:.1f}%{', stopped by ASHA' if stopped else ''})"
        (line,) = acc_ax.plot(curve["epoch"], 100 * curve["val_acc"], marker=".", label=label)
        color = line.get_color()
        loss_ax.plot(curve["epoch"], curve["val_loss"], marker=".", color=color)
        loss_ax.plot(curve["epoch"], curve["train_loss"], ls="--", lw=1, color=color)
        if stopped and not curve.empty:
            last = curve.iloc[-1]
            acc_ax.scatter(last["epoch"], 100 * last["val_acc"], color=color, marker="X", s=60, zorder=3)
        losses[f"#{rank} {row.trial_id}"] = curve[["val_loss", "train_loss"]].to_numpy(dtype=float).ravel()
    acc_ax.set(
        title=f"Validation accuracy of the top {len(finished)} trials (X: stopped by ASHA)",
        xlabel="epoch",
        ylabel="validation accuracy (%)",
    )
    title = "Loss (solid: validation cross-entropy, dashed: training objective)"
    top_limit, clipped = robust_upper_limit(losses)
    kept = [values for name, values in losses.items() if name not in clipped]
    if top_limit is not None:
        loss_ax.set_ylim(0, top_limit)
        title += "\nclipped, diverged: " + ", ".join(
            f"{name} (up to {np.nanmax(np.where(np.isfinite(losses[name]), losses[name], np.nan)):.3g})"
            if np.isfinite(losses[name]).any()
            else f"{name} (not finite)"
            for name in clipped
        )
    elif kept and log_spans_decades(np.concatenate(kept)):
        loss_ax.set_yscale("log")
    loss_ax.set(title=title, xlabel="epoch", ylabel="loss")
    loss_ax.title.set_fontsize("small")
    acc_ax.legend(fontsize="small")
    loss_ax.plot([], [], color="black", label="validation (cross-entropy)")
    loss_ax.plot([], [], color="black", ls="--", lw=1, label="training objective")
    loss_ax.legend(fontsize="small", title="colours as on the left", title_fontsize="small")
    for ax in (acc_ax, loss_ax):
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    return fig


def robust_upper_limit(curves: dict[str, np.ndarray], factor: float = 10.0) -> tuple[float | None, list[str]]:
    """An upper y-limit no diverged curve can flatten the others with, and the curves it clips.

    A curve is diverged when it is not finite somewhere or peaks above ``factor`` times the
    typical level (the median of the curves' medians). None when nothing needs clipping.
    """
    finite = {name: values[np.isfinite(values)] for name, values in curves.items()}
    medians = [np.median(values) for values in finite.values() if values.size]
    if not medians:
        return None, []
    typical = float(np.median(medians))
    clipped = [
        name
        for name, values in curves.items()
        if not np.isfinite(values).all() or (finite[name].size and finite[name].max() > factor * typical)
    ]
    kept = [finite[name].max() for name in curves if name not in clipped and finite[name].size]
    if not clipped or not kept:
        return None, []
    return 1.1 * float(max(kept)), clipped


def plot_asha(study: Study) -> Figure:
    """Every trial's validation curve ending where it stopped, and how many trials stopped at each epoch."""
    epochs = study.table("epochs")
    trials = study.trials[study.trials["status"].isin(STATUS_STYLE)]
    fig = Figure(figsize=(11, 4.2), layout="constrained")
    curves_ax, count_ax = fig.subplots(1, 2, width_ratios=(2, 1))
    for rung in study.rungs:
        curves_ax.axvline(rung, color="grey", ls=":", lw=1)
    for row in trials.itertuples():
        curve = epochs[epochs["trial_id"] == row.trial_id].sort_values("epoch")
        color, marker, _ = STATUS_STYLE[row.status]
        curves_ax.plot(curve["epoch"], 100 * curve["val_acc"], color=color, alpha=0.35, lw=1)
        if not curve.empty:
            last = curve.iloc[-1]
            curves_ax.scatter(last["epoch"], 100 * last["val_acc"], color=color, marker=marker, s=40, zorder=3)
    for status, (color, marker, label) in STATUS_STYLE.items():
        curves_ax.scatter([], [], color=color, marker=marker, label=f"{label} ({(trials['status'] == status).sum()})")
    curves_ax.plot([], [], color="grey", ls=":", label="rung (an epoch where ASHA stops trials)")
    curves_ax.set(
        title="ASHA's stopping decisions: val accuracy until each trial stopped",
        xlabel="epoch",
        ylabel="validation accuracy (%)",
    )
    curves_ax.legend(fontsize="small", loc="lower right")
    counts = trials.groupby(["epochs_run", "status"]).size().unstack(fill_value=0)
    bottom = np.zeros(len(counts))
    for status, (color, _, label) in STATUS_STYLE.items():
        if status in counts:
            count_ax.bar(counts.index, counts[status], bottom=bottom, color=color, label=label)
            bottom += counts[status].to_numpy()
    count_ax.set(title="Epochs each trial ran", xlabel="epochs run", ylabel="trials")
    count_ax.legend(fontsize="small")
    for ax in (curves_ax, count_ax):
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    count_ax.yaxis.get_major_locator().set_params(integer=True)
    return fig


def _axis_positions(values: pd.Series, key: str) -> tuple[np.ndarray, list[tuple[float, str]]]:
    """Map one hyperparameter to [0, 1] (log scale when it spans decades); null (inactive) goes below, at -0.15."""
    present = values.dropna()
    positions = np.full(len(values), -0.15)
    ticks: list[tuple[float, str]] = [(-0.15, "n/a")] if values.isna().any() else []
    if key in CATEGORICAL or present.map(type).eq(str).all():
        levels = sorted(present.astype(str).unique())
        spots = {level: (i / (len(levels) - 1) if len(levels) > 1 else 0.5) for i, level in enumerate(levels)}
        positions[values.notna().to_numpy()] = [spots[str(v)] for v in present]
        return positions, ticks + [(spot, level) for level, spot in spots.items()]
    numbers = present.astype(float)
    low, high = numbers.min(), numbers.max()
    log = low > 0 and high / low >= 10
    scale = np.log10 if log else (lambda x: x)
    span = (scale(high) - scale(low)) or 1.0
    positions[values.notna().to_numpy()] = (scale(numbers.to_numpy()) - scale(low)) / span
    counts = numbers.value_counts()
    if len(counts) <= 6 and counts.min() >= 2:  # a grid (every value tried more than once): label the values
        return positions, ticks + [((scale(v) - scale(low)) / span, fmt(native(v))) for v in sorted(counts.index)]
    for spot in (0.0, 0.5, 1.0):
        value = 10 ** (math.log10(low) + spot * span) if log else low + spot * span
        ticks.append((spot, fmt(float(value))))
    return positions, ticks


def plot_parallel_coordinates(study: Study, params: list[str] | None = None, max_params: int = 8) -> Figure:
    """One line per finished trial across its hyperparameters, coloured by accuracy at one budget.

    The colour is the validation accuracy after the first budget (ASHA's first rung), which
    every finished trial reached, so all lines are compared at equal epochs; trials ASHA
    stopped later are dashed.
    """
    epochs = study.budgets()[0]
    at = study.at_budget(epochs).iloc[::-1]  # best drawn last, on top
    params = (params or study.varying())[:max_params]
    acc = at["val_acc"].to_numpy()
    norm = Normalize(100 * acc.min(), 100 * acc.max())
    cmap = colormaps["viridis"]
    columns = [_axis_positions(at[key], key) for key in params]
    span = (acc.max() - acc.min()) or 1.0
    columns.append(((acc - acc.min()) / span, [(0.0, f"{100 * acc.min():.1f}%"), (1.0, f"{100 * acc.max():.1f}%")]))
    names = [*params, f"val acc @{epochs}"]
    fig = Figure(figsize=(max(7.0, 1.3 * len(names) + 2), 4.8), layout="constrained")
    ax = fig.subplots()
    ys = np.column_stack([positions for positions, _ in columns])
    for y, value, stopped in zip(ys, acc, at["stopped"], strict=True):
        ax.plot(range(len(names)), y, color=cmap(norm(100 * value)), alpha=0.8, lw=1.5, ls="--" if stopped else "-")
    for x, (_, ticks) in enumerate(columns):
        ax.axvline(x, color="black", lw=0.8)
        for y, label in ticks:
            ax.text(x + 0.04, y, label, fontsize="x-small", va="center")
    ax.set_xticks(range(len(names)), names, rotation=20, ha="right")
    ax.set_yticks([])
    ax.set_ylim(-0.22, 1.07)
    ax.set_xlim(-0.2, len(names) - 0.6)
    ax.set_title(
        f"The search in parallel coordinates: {len(at)} finished trials at {epochs} epochs "
        f"(dashed: stopped by ASHA later; n/a = inactive)",
        fontsize="medium",
    )
    fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=ax, label=f"validation accuracy after {epochs} epochs (%)")
    return fig
