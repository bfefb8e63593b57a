"""Gradient and weight-update flow through the layers, and which trials' gradients went bad.

``python analysis/gradient_flow.py STUDY_DIR [--trial ID]`` redraws the first source
report's two figures from the ``layers`` table for the best (or the named) trial:

* per-layer mean gradient magnitude, one line per epoch: a layer far below the others is
  barely learning (vanishing), a line that climbs epoch after epoch is heading for trouble;
* per-layer update ratio ‖W_e − W_{e−1}‖ / ‖W_e‖, one line per epoch: how much of each
  layer one epoch rewrites, the usual check that the learning rate suits every layer.

It also writes a study-wide health table: the trials whose gradients vanished or exploded
(``trials.grad_health``, from the per-layer ``layers.health`` flags) with their
configurations, and per configuration factor how often that happened. Everything goes to
``STUDY_DIR/analysis/`` (two PNGs and ``gradient_flow.md``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd
from matplotlib import colormaps
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

from tune_cifar import cli
from tune_cifar.analysis._study import (
    Study,
    describe,
    factors,
    fmt,
    load_study,
    markdown_table,
    pct,
    save,
)
from tune_cifar.errors import UsageError
from tune_cifar.report import EXPLODING_GRAD_L2, VANISHING_GRAD_L2

BAD = ("vanishing", "exploding")


def weight_layers(layers: pd.DataFrame) -> list[str]:
    """The conv and linear weight tensors in forward order: the layers the first report plotted.

    Read from the ``layers`` table alone: ``layer_index`` is the forward order and ``kind``
    tells kernels and matrices (``weight``) from biases and BN parameters.
    """
    weights = layers[layers["kind"] == "weight"]
    return list(weights.sort_values("layer_index")["layer"].drop_duplicates())


def flow_matrix(study: Study, trial_id: str, column: str) -> pd.DataFrame:
    """``column`` of the ``layers`` table as a layer × epoch matrix, layers in forward order."""
    study.trial(trial_id)
    rows = study.table("layers")
    rows = rows[rows["trial_id"] == trial_id]
    if rows.empty:
        raise UsageError(f"{study.folder}: trial {trial_id!r} has no rows in the layers table")
    matrix = rows.pivot(index="layer", columns="epoch", values=column)
    return matrix.loc[weight_layers(rows)]


def short_name(layer: str) -> str:
    """``features.conv1.weight`` → ``conv1``: the module name is what a reader recognises."""
    parts = layer.split(".")
    return parts[-2] if len(parts) >= 2 and parts[-1] == "weight" else layer


def plot_flow(study: Study, trial_id: str, column: str, ylabel: str, title: str) -> Figure:
    """Layers on x, one line per epoch (colour = epoch), log y."""
    matrix = flow_matrix(study, trial_id, column)
    epochs = list(matrix.columns)
    norm = Normalize(min(epochs), max(max(epochs), min(epochs) + 1))
    cmap = colormaps["viridis"]
    fig = Figure(figsize=(max(6.5, 0.55 * len(matrix) + 3), 4.5), layout="constrained")
    ax = fig.subplots()
    x = range(len(matrix))
    for epoch in epochs:
        ax.plot(x, matrix[epoch].to_numpy(), marker="o", ms=3, color=cmap(norm(epoch)), label=f"epoch {epoch}")
    ax.set_xticks(list(x), [short_name(name) for name in matrix.index], rotation=45 if len(matrix) > 8 else 0)
    ax.set_yscale("log")
    row = study.trial(trial_id)
    ax.set(
        title=f"{title}\ntrial {trial_id} ({pct(row['best_val_acc'])} best val acc, {len(epochs)} epochs)",
        xlabel="layer (weights of conv and linear layers, input → output)",
        ylabel=ylabel,
    )
    ax.grid(alpha=0.3, which="both")
    if len(epochs) <= 10:
        ax.legend(fontsize="small", ncols=2 if len(epochs) > 5 else 1)
    else:
        bar = fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=ax, label="epoch")
        bar.ax.yaxis.get_major_locator().set_params(integer=True)
    return fig


def plot_gradient_flow(study: Study, trial_id: str) -> Figure:
    return plot_flow(
        study,
        trial_id,
        "grad_mean_abs",
        "mean |gradient| per element (epoch average, log)",
        "Gradient flow: mean gradient magnitude per layer",
    )


def plot_update_ratio(study: Study, trial_id: str) -> Figure:
    return plot_flow(
        study,
        trial_id,
        "update_ratio",
        r"$\|W_e - W_{e-1}\| \,/\, \|W_e\|$ (log)",
        "Weight-update flow: relative change of each layer's weights per epoch",
    )


def health_table(study: Study) -> pd.DataFrame:
    """Trials whose gradients vanished or exploded, worst first, with where and when it happened."""
    trials = study.trials[study.trials["grad_health"].isin(BAD)]
    layers = study.table("layers")
    keys = study.varying(study.trials)
    rows = []
    for _, trial in trials.iterrows():
        flagged = layers[(layers["trial_id"] == trial["trial_id"]) & layers["health"].isin(BAD)]
        rows.append(
            {
                "trial_id": trial["trial_id"],
                "grad_health": trial["grad_health"],
                "status": trial["status"],
                "best_val_acc": trial["best_val_acc"],
                "vanishing layer-epochs": int((flagged["health"] == "vanishing").sum()),
                "exploding layer-epochs": int((flagged["health"] == "exploding").sum()),
                "first epoch": int(flagged["epoch"].min()) if not flagged.empty else None,
                "layers": ", ".join(weight_layers(flagged)[:4] or sorted(flagged["layer"].unique())[:4]),
                "config": describe(trial, keys),
            }
        )
    columns = [
        "trial_id",
        "grad_health",
        "status",
        "best_val_acc",
        "vanishing layer-epochs",
        "exploding layer-epochs",
        "first epoch",
        "layers",
        "config",
    ]
    return pd.DataFrame(rows, columns=columns).sort_values(["grad_health", "trial_id"], ascending=[False, True])


def health_by_factor(study: Study) -> pd.DataFrame:
    """Per level of every configuration factor: trials, and how many vanished or exploded."""
    trials = study.trials[study.trials["grad_health"].notna()]
    rows = []
    for factor in factors(trials):
        for level, group in trials[trials[factor].notna()].groupby(trials[factor].map(fmt)):
            rows.append(
                {
                    "factor": factor,
                    "level": level,
                    "trials": len(group),
                    "vanishing": int((group["grad_health"] == "vanishing").sum()),
                    "exploding": int((group["grad_health"] == "exploding").sum()),
                }
            )
    return pd.DataFrame(rows, columns=["factor", "level", "trials", "vanishing", "exploding"])


def health_sentence(study: Study, bad: pd.DataFrame) -> str:
    """What the ``health`` flags say, in the words of the rule that set them (one rule, one text)."""
    vanishing = int((bad["grad_health"] == "vanishing").sum())
    exploding = int((bad["grad_health"] == "exploding").sum())
    return (
        f"{vanishing} of {len(study.trials)} trials had vanishing gradients in a weight tensor (a conv kernel or "
        f"linear matrix whose epoch-averaged gradient L2 norm fell below {VANISHING_GRAD_L2:g}) and {exploding} had "
        f"exploding gradients in some tensor (above {EXPLODING_GRAD_L2:g}, or not finite). Biases and BN "
        "parameters are not judged for vanishing: a conv bias followed by batch norm has a zero gradient by "
        "construction (BN subtracts the mean it adds)."
    )


def write_report(study: Study, trial_id: str) -> Path:
    out = study.out_dir()
    save(plot_gradient_flow(study, trial_id), out / f"gradient_flow_{trial_id}.png")
    save(plot_update_ratio(study, trial_id), out / f"update_ratio_{trial_id}.png")
    bad = health_table(study)
    parts = [
        f"# Gradient and weight-update flow: trial `{trial_id}`",
        "",
        f"![gradient flow](gradient_flow_{trial_id}.png)",
        "",
        f"![update ratio](update_ratio_{trial_id}.png)",
        "",
        "## Gradient health across the study",
        "",
        health_sentence(study, bad),
        "",
    ]
    if not bad.empty:
        shown = bad.assign(best_val_acc=bad["best_val_acc"].map(pct), **{"first epoch": bad["first epoch"].map(fmt)})
        parts += [markdown_table(shown), "", "### By configuration", "", markdown_table(health_by_factor(study)), ""]
    path = out / "gradient_flow.md"
    path.write_text("\n".join(parts))
    return path


def parse_args(argv: Sequence[str] | None) -> Any:
    parser = cli.ArgumentParser(prog="python analysis/gradient_flow.py", description=__doc__.splitlines()[0])
    parser.add_argument("study_dir", help="the study folder (holds trials/ and layers/)")
    parser.add_argument("--trial", help="trial id to plot (default: the best finished trial)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    study = load_study(args.study_dir)
    trial_id = args.trial if args.trial is not None else study.best_trial_id()
    study.trial(trial_id)
    path = write_report(study, trial_id)
    bad = health_table(study)
    print(f"trial {trial_id}: figures in {path.parent}")
    print(
        health_sentence(study, bad)
        + "".join(f"\n  {r.trial_id}: {r.grad_health} in {r.layers}" for r in bad.itertuples())
    )
    print(f"report: {path}")
    return 0


if __name__ == "__main__":
    cli.run(main)
