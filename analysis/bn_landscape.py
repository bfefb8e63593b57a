"""Does batch norm smooth the loss landscape? Santurkar et al. (2018), Fig. 4, from the ``steps`` table.

``python analysis/bn_landscape.py STUDY_DIR`` reads a study of the ``bn_landscape`` space
(VGG-A with and without BN, four learning rates each) and draws, BN against no BN:

* the loss landscape band: per step, the lowest and highest training loss across the
  learning rates, and at probe steps the range of the loss along the gradient direction
  (step sizes 0.5× to 4× the learning rate, over all learning rates): a narrow band means a
  loss that changes predictably, so larger steps are safe;
* gradient predictiveness (ℓ2 change of the gradient along that walk) and effective
  β-smoothness (that change over the distance walked): smaller means a smoother landscape;
* validation accuracy per epoch and the epoch each run first reaches 50%.

Writes three PNGs and ``bn_landscape.md`` (tables and a one-sentence, data-derived
conclusion) into ``STUDY_DIR/analysis/``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from tune_cifar import cli
from tune_cifar.analysis._study import Study, fmt, load_study, markdown_table, pct, save
from tune_cifar.errors import UsageError

PROBES = ("probe_loss_min", "probe_loss_max", "probe_grad_change", "probe_beta")
COLORS = {"BN": "tab:blue", "no BN": "tab:red"}
THRESHOLD = 0.5  # validation accuracy the assignment asked to reach
CHANCE = 0.15  # best validation accuracy below this (10 classes: 10% is chance) means the run never learned


def variant(batchnorm: Any) -> str:
    return "BN" if batchnorm is True or batchnorm == 1 else "no BN"


def landscape_steps(study: Study) -> pd.DataFrame:
    """The ``steps`` table joined with each trial's variant and configured learning rate (``base_lr``)."""
    if not study.has_table("steps"):
        raise UsageError(f"{study.folder}: no steps table; run a space with probe_every > 0, e.g. --space bn_landscape")
    steps = study.table("steps")
    trials = study.trials[["trial_id", "batchnorm"]].assign(
        variant=study.trials["batchnorm"].map(variant), base_lr=study.trials["lr"]
    )
    joined = steps.merge(trials, on="trial_id", how="inner")
    if joined.empty:
        raise UsageError(f"{study.folder}: the steps table holds no rows of trials in the trials table")
    return joined


def loss_band(steps: pd.DataFrame) -> pd.DataFrame:
    """Per variant and step: min and max training loss across learning rates, and the probe loss range."""
    return (
        steps.groupby(["variant", "step"])
        .agg(
            loss_min=("train_loss", "min"),
            loss_max=("train_loss", "max"),
            runs=("train_loss", "size"),
            probe_min=("probe_loss_min", "min"),
            probe_max=("probe_loss_max", "max"),
        )
        .reset_index()
    )


def probe_band(steps: pd.DataFrame, column: str) -> pd.DataFrame:
    """Per variant and probe step: min, median and max of ``column`` across learning rates."""
    probed = steps.dropna(subset=[column])
    return probed.groupby(["variant", "step"])[column].agg(["min", "median", "max"]).reset_index()


def plot_loss_band(steps: pd.DataFrame) -> Figure:
    band = loss_band(steps)
    fig = Figure(figsize=(12, 4.4), layout="constrained")
    train_ax, probe_ax = fig.subplots(1, 2, sharey=True)
    for name, group in band.groupby("variant"):
        color = COLORS.get(name, "tab:grey")
        runs = int(group["runs"].max())
        for ax, low, high, label in (
            (train_ax, "loss_min", "loss_max", f"{name}: min–max over {runs} learning rates"),
            (probe_ax, "probe_min", "probe_max", f"{name}: loss range along the gradient"),
        ):
            rows = group.dropna(subset=[low, high])
            ax.fill_between(rows["step"], rows[low], rows[high], color=color, alpha=0.35, lw=0, label=label)
    train_ax.set(
        title="Training loss per step, range across learning rates",
        xlabel="training step",
        ylabel="training loss (cross-entropy)",
    )
    probe_ax.set(
        title="Loss landscape (Santurkar et al. Fig. 4a): loss along the gradient,\n"
        "step sizes 0.5–4× lr, range over all learning rates",
        xlabel="training step",
    )
    note = clip_spikes(train_ax, band)
    for ax in (train_ax, probe_ax):
        ax.grid(alpha=0.3)
        ax.legend(title=note or None, title_fontsize="small", loc="upper right")
    return fig


def clip_spikes(ax: Any, band: pd.DataFrame) -> str:
    """Keep a few exploding first steps (a VGG-A without BN under Adam) from flattening every band.

    The y-axis stops a little above the 98th percentile of the band tops; the returned note
    (shown as the legend's title) names the clipped peak, so nothing is hidden.
    """
    tops = band[["loss_max", "probe_max"]].max(axis=1).dropna()
    if tops.empty:
        return ""
    limit = 1.15 * float(np.percentile(tops, 98))
    if tops.max() <= 1.5 * limit:
        return ""
    ax.set_ylim(0.95 * float(band[["loss_min", "probe_min"]].min().min()), limit)
    peak = band.loc[tops.idxmax()]
    return f"y clipped: {peak['variant']} peaks at {tops.max():.3g} (step {peak['step']})"


def plot_smoothness(steps: pd.DataFrame) -> Figure:
    fig = Figure(figsize=(12, 4.4), layout="constrained")
    axes = fig.subplots(1, 2)
    panels = (
        ("probe_grad_change", "Gradient predictiveness (Fig. 4b)", r"max $\|\nabla L(x - s\,g) - \nabla L(x)\|_2$"),
        (
            "probe_beta",
            "Effective β-smoothness (Fig. 4c)",
            r"max $\|\nabla L(x - s\,g) - \nabla L(x)\|_2 \,/\, \|s\,g\|_2$",
        ),
    )
    for ax, (column, title, ylabel) in zip(axes, panels, strict=True):
        for name, group in probe_band(steps, column).groupby("variant"):
            color = COLORS.get(name, "tab:grey")
            ax.fill_between(group["step"], group["min"], group["max"], color=color, alpha=0.25, lw=0)
            ax.plot(
                group["step"],
                group["median"],
                color=color,
                lw=1.2,
                label=f"{name}: median over learning rates (band: min–max)",
            )
        ax.set(
            title=f"{title}\nalong the gradient, step sizes 0.5–4× lr (lower is smoother)",
            xlabel="training step",
            ylabel=f"{ylabel} (log)",
        )
        ax.set_yscale("log")
        ax.grid(alpha=0.3, which="both")
        ax.legend()
    return fig


def first_reach(study: Study, threshold: float = THRESHOLD) -> pd.DataFrame:
    """Per run: its variant and lr, the first epoch with validation accuracy ≥ ``threshold`` (None: never)."""
    epochs = study.table("epochs")
    runs = landscape_steps(study)[["trial_id", "variant", "base_lr"]].drop_duplicates()
    rows = []
    for run in runs.itertuples():
        curve = epochs[epochs["trial_id"] == run.trial_id].sort_values("epoch")
        reached = curve[curve["val_acc"] >= threshold]
        rows.append(
            {
                "trial_id": run.trial_id,
                "variant": run.variant,
                "lr": run.base_lr,
                "epochs": len(curve),
                "best_val_acc": curve["val_acc"].max(),
                "first_epoch": int(reached["epoch"].iloc[0]) if not reached.empty else None,
            }
        )
    table = pd.DataFrame(rows).astype({"first_epoch": "Int64"})  # nullable: "not reached" stays <NA>, not NaN
    return table.sort_values(["variant", "lr"], ignore_index=True)


def plot_val_acc(study: Study, threshold: float = THRESHOLD) -> Figure:
    epochs = study.table("epochs")
    reach = first_reach(study, threshold)
    fig = Figure(figsize=(8, 4.8), layout="constrained")
    ax = fig.subplots()
    styles = dict(zip(sorted(reach["lr"].unique()), ("-", "--", "-.", ":", (0, (5, 1)), (0, (1, 3))), strict=False))
    for run in reach.itertuples():
        curve = epochs[epochs["trial_id"] == run.trial_id].sort_values("epoch")
        color = COLORS.get(run.variant, "tab:grey")
        ax.plot(
            curve["epoch"],
            100 * curve["val_acc"],
            color=color,
            ls=styles.get(run.lr, "-"),
            marker=".",
            label=f"{run.variant}, lr {fmt(run.lr)}",
        )
        if pd.notna(run.first_epoch):
            hit = curve[curve["epoch"] == run.first_epoch].iloc[0]
            ax.scatter(hit["epoch"], 100 * hit["val_acc"], color=color, marker="*", s=120, zorder=3)
    ax.axhline(
        100 * threshold, color="black", lw=0.8, ls=":", label=f"{100 * threshold:.0f}% (★ first epoch reaching it)"
    )
    ax.set(
        title="Validation accuracy per epoch, VGG-A with and without batch norm",
        xlabel="epoch",
        ylabel="validation accuracy (%)",
    )
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1))
    return fig


def matched(steps: pd.DataFrame) -> pd.DataFrame:
    """Rows whose (step, learning rate) every variant has: compare like with like.

    A finished grid has them all; in a study still running (or one with a failed run) the
    variants would otherwise be compared over different learning rates and phases of training.
    """
    variants = steps["variant"].nunique()
    counts = steps.groupby(["step", "base_lr"])["variant"].transform("nunique")
    return steps[counts == variants]


def summary(steps: pd.DataFrame, reach: pd.DataFrame) -> pd.DataFrame:
    """Per variant, over matched steps of runs that learn: median band widths, gradient change and β; 50% epochs.

    A run stuck at chance accuracy (a VGG-A without BN whose first Adam steps blew it up) sits on
    a flat plateau: its loss band and β are tiny because nothing moves, which says nothing about
    the smoothness BN is credited with. Such runs are left out, unless a variant has no other.
    """
    learning = steps[steps["trial_id"].isin(reach.loc[reach["best_val_acc"] >= CHANCE, "trial_id"])]
    compared = matched(learning if learning["variant"].nunique() == steps["variant"].nunique() else steps)
    band = loss_band(compared)
    rows = []
    for name, group in compared.groupby("variant"):
        widths = band[band["variant"] == name].eval("probe_max - probe_min").dropna()
        train_widths = band[band["variant"] == name].eval("loss_max - loss_min")
        runs = reach[reach["variant"] == name]
        reached = runs["first_epoch"].dropna()
        rows.append(
            {
                "variant": name,
                "runs": len(runs),
                "runs at chance": int((runs["best_val_acc"] < CHANCE).sum()),
                "runs compared": group["trial_id"].nunique(),
                "probe steps": int(group["probe_beta"].notna().sum()),
                "median train-loss band": train_widths.median(),
                "median probe-loss band": widths.median(),
                "median grad change": group["probe_grad_change"].median(),
                "median β": group["probe_beta"].median(),
                "runs reaching 50%": f"{len(reached)} of {len(runs)}",
                "earliest 50% epoch": int(reached.min()) if len(reached) else None,
            }
        )
    return pd.DataFrame(rows)


def conclusion(table: pd.DataFrame) -> str:
    """One sentence comparing BN with no BN, with the numbers that support it."""
    rows = {row["variant"]: row for _, row in table.iterrows()}
    if not {"BN", "no BN"} <= set(rows):
        return f"Only {', '.join(rows) or 'no'} runs are present, so BN cannot be compared with no BN."
    bn, plain = rows["BN"], rows["no BN"]

    def compare(column: str, smaller: str, larger: str) -> str:
        a, b = bn[column], plain[column]
        if not (np.isfinite(a) and np.isfinite(b)) or min(a, b) <= 0:
            return f"{column} not comparable"
        word, ratio = (smaller, b / a) if a <= b else (larger, a / b)
        return f"{word} by {ratio:.1f}× ({column} {a:.3g} vs {b:.3g})"

    def reach(row: pd.Series, runs: str) -> str:
        epoch = row["earliest 50% epoch"]
        if pd.isna(epoch):
            return f"none of {runs} reaches 50% validation accuracy"
        return f"{runs} first reach 50% validation accuracy at epoch {epoch}"

    stuck = ""
    if bn["runs at chance"] or plain["runs at chance"]:
        stuck = (
            f" (compared over {bn['runs compared']} BN and {plain['runs compared']} no-BN runs at matching learning"
            f" rates; {plain['runs at chance']} of {plain['runs']} runs without BN and {bn['runs at chance']} of"
            f" {bn['runs']} with BN stayed at chance accuracy, where a flat plateau makes band and β trivially small)"
        )
    return (
        f"Against VGG-A without batch norm, the BN loss-landscape band is "
        f"{compare('median probe-loss band', 'narrower', 'wider')} and its effective β-smoothness "
        f"{compare('median β', 'smaller', 'larger')}{stuck}; {reach(bn, 'the BN runs')}, "
        f"{reach(plain, 'the runs without BN')}."
    )


def write_report(study: Study) -> tuple[Path, str]:
    steps = landscape_steps(study)
    out = study.out_dir()
    reach = first_reach(study)
    save(plot_loss_band(steps), out / "bn_landscape_loss.png")
    save(plot_smoothness(steps), out / "bn_landscape_smoothness.png")
    save(plot_val_acc(study), out / "bn_landscape_val_acc.png")
    table = summary(steps, reach)
    sentence = conclusion(table)
    shown_reach = reach.assign(
        lr=reach["lr"].map(fmt),
        best_val_acc=reach["best_val_acc"].map(pct),
        first_epoch=reach["first_epoch"].map(lambda e: "not reached" if pd.isna(e) else str(e)),
    )
    shown_reach = shown_reach.rename(columns={"first_epoch": f"first epoch ≥ {100 * THRESHOLD:.0f}%"})
    parts = [
        "# BatchNorm and the loss landscape (VGG-A)",
        "",
        f"**{sentence}**",
        "",
        "Medians over the probe steps and learning rates both variants have, runs stuck at chance accuracy left out:",
        "",
        markdown_table(table.map(fmt)),
        "",
        "![loss landscape](bn_landscape_loss.png)",
        "",
        "![smoothness](bn_landscape_smoothness.png)",
        "",
        "## Validation accuracy",
        "",
        "![validation accuracy](bn_landscape_val_acc.png)",
        "",
        markdown_table(shown_reach),
        "",
    ]
    path = out / "bn_landscape.md"
    path.write_text("\n".join(parts))
    return path, sentence


def parse_args(argv: Sequence[str] | None) -> Any:
    parser = cli.ArgumentParser(prog="python analysis/bn_landscape.py", description=__doc__.splitlines()[0])
    parser.add_argument("study_dir", help="a study of the bn_landscape space (holds trials/, epochs/, steps/)")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    study = load_study(args.study_dir)
    path, sentence = write_report(study)
    print(sentence)
    print(f"report: {path}")
    return 0


if __name__ == "__main__":
    cli.run(main)
