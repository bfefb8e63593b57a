"""The study's answer: which configuration is best, which choices mattered, what it costs.

``python analysis/best_config.py STUDY_DIR [--retrain] [--epochs N] [--top K]`` reads only the
study's Parquet tables and writes ``STUDY_DIR/analysis/report.md`` with PNG plots beside it:
the leaderboard, one table per factor (as the second source report tabulated optimizers,
schedulers, losses and activations), hyperparameter importance (Optuna's PED-ANOVA), the
Pareto front of validation accuracy against MACs, and the search views of ``search_views``.

``--retrain`` trains the best configuration again on train + validation for its full epochs
(``python -m tune_cifar.train --train-on-val``), evaluates the test set once, and keeps the
result in ``STUDY_DIR/retrain/`` (Parquet tables, weights, ``result.json``) next to the
source report's 91.53% test accuracy: the study tunes on validation, so only this number is
comparable with a paper's test accuracy.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
import pandas as pd
from matplotlib.figure import Figure
from optuna.distributions import IntDistribution

from tune_cifar import cli
from tune_cifar import config as cfg
from tune_cifar.analysis import search_views
from tune_cifar.analysis._study import (
    CATEGORICAL,
    REFERENCE_TEST_ACC,
    Study,
    describe,
    factors,
    fmt,
    load_study,
    markdown_table,
    native,
    pct,
    save,
)
from tune_cifar.errors import UsageError
from tune_cifar.outcome import Outcome
from tune_cifar.study_folder import StudyFolder
from tune_cifar.tables import read_table

REPO = Path(__file__).resolve().parents[1]
MIN_TRIALS_FOR_IMPORTANCE = 20  # fewer trials at one budget give a ranking that is mostly noise
CIFAR10_TRAIN_IMAGES = 50_000  # train + validation: what a final retrain on the full data trains on


# -- tables ------------------------------------------------------------------------------------
def leaderboard(study: Study, top: int = 10) -> pd.DataFrame:
    """The ``top`` finished trials by best validation accuracy, with what sets each apart."""
    finished = study.require_finished()
    keys = study.varying()
    board = finished.head(top).copy()
    board.insert(0, "rank", range(1, len(board) + 1))
    board["config"] = [describe(row, keys) for _, row in board.iterrows()]
    return board[["rank", "trial_id", "best_val_acc", "best_epoch", "epochs_run", "status", "macs", "params", "config"]]


def factor_table(study: Study, factor: str) -> pd.DataFrame:
    """Per budget and level of ``factor``: trials, mean ± std and best validation accuracy.

    A trial counts at every budget it reached, with its accuracy after exactly that many
    epochs, so no number mixes trials of different budgets (ASHA's first rung holds every
    finished trial, the next only the survivors). Trials where the factor is inactive (null:
    ``activation`` of a VGG-A) are left out, not pooled into a fake level. Trials that diverged
    (training loss NaN or infinite) have no accuracy to average: ``diverged`` counts them per level,
    and a level whose every trial diverged gets a row with no accuracy.
    """
    lost = study.trials[(study.trials["status"] == Outcome.DIVERGED.status) & study.trials[factor].notna()]
    lost_per_level = lost[factor].map(native).value_counts().to_dict()
    rows = []
    for epochs in study.budgets():
        at = study.at_budget(epochs)
        active = at[at[factor].notna()]
        groups = dict(list(active.groupby(active[factor].map(native), sort=False)))
        for level in [*groups, *(level for level in lost_per_level if level not in groups)]:
            group = groups.get(level, active.iloc[:0])
            best = group.iloc[0] if len(group) else None  # at_budget sorts best first
            rows.append(
                {
                    "epochs": epochs,
                    factor: level,
                    "trials": len(group),
                    "diverged": lost_per_level.get(level, 0),
                    "mean_val_acc": group["val_acc"].mean(),
                    "std_val_acc": group["val_acc"].std(ddof=1),  # NaN for a single trial
                    "best_val_acc": None if best is None else best["val_acc"],
                    "best_trial": None if best is None else best["trial_id"],
                }
            )
    columns = ["epochs", factor, "trials", "diverged", "mean_val_acc", "std_val_acc", "best_val_acc", "best_trial"]
    table = pd.DataFrame(rows, columns=columns)
    return table.sort_values(["epochs", "mean_val_acc"], ascending=[True, False], ignore_index=True)


def trials_cell(trials: int, diverged: int) -> str:
    """``3``, or ``2 (1 of 3 diverged, left out)``: what a mean rests on and what it leaves out."""
    return f"{trials} ({diverged} of {trials + diverged} diverged, left out)" if diverged else str(trials)


def shown_leaderboard(board: pd.DataFrame) -> pd.DataFrame:
    """The leaderboard with readable cells (percentages, thousands separators)."""
    cells = {key: board[key].map(fmt) for key in ("best_epoch", "epochs_run", "macs", "params")}
    return board.assign(**cells, best_val_acc=board["best_val_acc"].map(pct))


def shown_factor_table(table: pd.DataFrame, factor: str) -> pd.DataFrame:
    spread = [
        pct(mean) if pd.isna(std) else f"{pct(mean)} ± {100 * std:.2f}"
        for mean, std in zip(table["mean_val_acc"], table["std_val_acc"], strict=True)
    ]
    return pd.DataFrame(
        {
            "epochs": table["epochs"],
            factor: table[factor].map(fmt),
            "trials": [trials_cell(n, lost) for n, lost in zip(table["trials"], table["diverged"], strict=True)],
            "val acc mean ± std": spread,
            "best": table["best_val_acc"].map(pct),
            "best trial": table["best_trial"],
        }
    )


# -- importance --------------------------------------------------------------------------------
def distribution(key: str, values: pd.Series) -> optuna.distributions.BaseDistribution:
    """An Optuna distribution spanning the (two or more) values a column took."""
    present = [native(v) for v in values.dropna()]
    if key in CATEGORICAL:
        return optuna.distributions.CategoricalDistribution(sorted(set(present), key=str))
    low, high = min(present), max(present)
    log = low > 0 and high / low >= 10  # spans a decade or more: sampled (and judged) on a log scale
    if cfg.field_type(key) == "int" and all(float(v).is_integer() for v in present):
        return IntDistribution(int(low), int(high), log=log)
    return optuna.distributions.FloatDistribution(float(low), float(high), log=log)


def search_distributions(study: Study) -> dict[str, optuna.distributions.BaseDistribution] | None:
    """The distributions Optuna sampled from, as the study's ``optuna.db`` recorded them.

    So an importance computed here equals ``optuna.importance`` on that study. Keys held by
    ``--set`` were never sampled and are not there; the seed of a repeated grid is a repeat, not
    a hyperparameter, and is left out. None for a folder without a database (single runs).
    """
    folder = StudyFolder(study.folder)
    if not folder.optuna_db.is_file():
        return None
    stored = optuna.load_study(study_name=study.plan.name if study.plan else None, storage=folder.optuna_url)
    found: dict[str, optuna.distributions.BaseDistribution] = {}
    for trial in stored.get_trials(deepcopy=False):
        for key, sampled in trial.distributions.items():
            found.setdefault(key, sampled)
    found.pop("seed", None)
    return found


def optuna_study(at: pd.DataFrame, distributions: dict[str, optuna.distributions.BaseDistribution]) -> optuna.Study:
    """Trials at one budget as an in-memory Optuna study (value = validation accuracy after it).

    An inactive parameter (null) is simply absent from that trial's params, which is how a
    define-by-run search records it and how PED-ANOVA's conditional regimes expect it.
    """
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    frozen = []
    for _, row in at.iterrows():
        params = {key: native(row[key]) for key in distributions if not pd.isna(row[key])}
        # an int column with nulls reads back as float; IntDistribution wants ints
        params = {key: int(v) if isinstance(distributions[key], IntDistribution) else v for key, v in params.items()}
        frozen.append(
            optuna.trial.create_trial(
                value=float(row["val_acc"]),
                params=params,
                distributions={key: distributions[key] for key in params},
                user_attrs={"trial_id": row["trial_id"]},
            )
        )
    result = optuna.create_study(direction="maximize")
    result.add_trials(frozen)
    return result


@dataclass(frozen=True)
class Importance:
    """A ranking of hyperparameters and the sentence that says what it rests on (or why there is none)."""

    scores: pd.Series | None
    statement: str
    basis: str = ""  # the short form for a figure title: budget and trial count


def importance_quantile(trials: int) -> float:
    """PED-ANOVA's top quantile: its default 10%, grown so that the top holds at least three trials
    (at most half of them: the top must stay a strict subset)."""
    return min(0.5, max(0.1, 3 / trials))


def importance(study: Study, min_trials: int = MIN_TRIALS_FOR_IMPORTANCE) -> Importance:
    """PED-ANOVA importance for reaching the top trials, at one equal budget.

    The budget is the longest at which at least ``min_trials`` finished trials arrived (ASHA's
    first rung in a short study); the value of each trial is its validation accuracy after
    that many epochs. PED-ANOVA (Watanabe et al. 2023) needs no scikit-learn and handles
    conditional parameters by regime. With fewer trials a ranking is noise, and is not drawn.
    """
    at_budgets = [(epochs, study.at_budget(epochs)) for epochs in study.budgets()]
    usable = [(epochs, at) for epochs, at in at_budgets if len(at) >= min_trials]
    if not usable:
        most = max((len(at) for _, at in at_budgets), default=0)
        return Importance(
            None,
            f"Not computed: at most {most} finished trials share a budget, and a ranking from fewer than "
            f"{min_trials} is noise.",
        )
    epochs, at = usable[-1]
    distributions = search_distributions(study) or {key: distribution(key, at[key]) for key in study.varying(at)}
    params = [key for key in distributions if key in study.varying(at)]  # held keys (--set) do not vary
    if not params:
        return Importance(None, "Not computed: every hyperparameter took a single value.")
    quantile = importance_quantile(len(at))
    evaluator = optuna.importance.PedAnovaImportanceEvaluator(target_quantile=quantile)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scores = optuna.importance.get_param_importances(
            optuna_study(at, {key: distributions[key] for key in params}), evaluator=evaluator, params=params
        )
    statement = (
        f"PED-ANOVA (`optuna.importance.PedAnovaImportanceEvaluator(target_quantile={quantile:.3g})`) on the "
        f"validation accuracy after {epochs} epochs of the {len(at)} finished trials that ran at least that long; "
        "it measures how much each parameter's distribution among the top trials differs from all trials."
    )
    basis = f"after {epochs} epochs, {len(at)} trials, target quantile {quantile:.3g}"
    return Importance(pd.Series(scores, name="importance").sort_values(ascending=False), statement, basis)


# -- Pareto front ------------------------------------------------------------------------------
def pareto_front(study: Study) -> tuple[int, pd.DataFrame]:
    """The full budget, and the trials that ran it which no other beats on both accuracy and MACs.

    Accuracy is the validation accuracy after the longest budget any finished trial ran, so the
    front compares trials at equal epochs; ASHA-stopped trials are not on it.
    """
    epochs = study.budgets()[-1] if study.budgets() else 0
    at = study.at_budget(epochs).dropna(subset=["macs"])
    ordered = at.sort_values(["macs", "val_acc"], ascending=[True, False])
    front, best = [], -math.inf
    for index, row in ordered.iterrows():
        if row["val_acc"] > best:
            front.append(index)
            best = row["val_acc"]
    return epochs, ordered.loc[front]


def plot_pareto(study: Study) -> Figure:
    epochs, front = pareto_front(study)
    at = study.at_budget(epochs).dropna(subset=["macs"])
    stopped = study.finished[(study.finished["epochs_run"] < epochs)].dropna(subset=["macs"])
    fig = Figure(figsize=(7.5, 4.8), layout="constrained")
    ax = fig.subplots()
    if not stopped.empty:
        last = study.table("epochs").set_index(["trial_id", "epoch"])["val_acc"]
        values = [last.get((row.trial_id, int(row.epochs_run))) for row in stopped.itertuples()]
        ax.scatter(
            stopped["macs"],
            100 * pd.Series(values, dtype=float),
            color="tab:orange",
            marker="X",
            alpha=0.5,
            label=f"stopped by ASHA before {epochs} epochs (at its last epoch; not comparable)",
        )
    ax.scatter(at["macs"], 100 * at["val_acc"], color="tab:grey", alpha=0.7, label=f"trial that ran {epochs} epochs")
    ax.step(front["macs"], 100 * front["val_acc"], where="post", color="tab:red", lw=1.5)
    ax.scatter(front["macs"], 100 * front["val_acc"], color="tab:red", zorder=3, label="Pareto front")
    for row in front.itertuples():
        ax.annotate(
            str(row.trial_id),
            (row.macs, 100 * row.val_acc),
            textcoords="offset points",
            xytext=(4, -10),
            fontsize="x-small",
        )
    ax.set_xscale("log")
    ax.set(
        title=f"Validation accuracy after {epochs} epochs against compute (up and left is better)",
        xlabel="multiply-accumulates per 32×32 image (MACs, log scale)",
        ylabel=f"validation accuracy after {epochs} epochs (%)",
    )
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize="small")
    return fig


def plot_importance(result: Importance) -> Figure:
    scores = result.scores
    fig = Figure(figsize=(6.5, 0.35 * len(scores) + 1.6), layout="constrained")
    ax = fig.subplots()
    ax.barh(scores.index[::-1], scores.to_numpy()[::-1], color="tab:blue")
    ax.set(
        title="Hyperparameter importance for reaching the top trials\n" + result.basis,
        xlabel="importance (PED-ANOVA, normalised to sum to 1)",
        ylabel="hyperparameter",
    )
    ax.title.set_fontsize("small")
    ax.grid(alpha=0.3, axis="x")
    return fig


# -- retrain -----------------------------------------------------------------------------------
def retrain(study: Study, epochs: int | None = None, **overrides: Any) -> dict[str, Any]:
    """Train the best trial's configuration on train + validation, test once, record it in ``retrain/``.

    Runs ``tune_cifar.train --from-study`` (which picks the same best trial and the study's data
    settings); ``overrides`` (data, subset, val_size, data_dir) replace those settings.
    """
    trial = study.trial(study.best_trial_id())
    config = cfg.from_row(trial)
    out = StudyFolder(study.folder).retrain
    if out.exists() and any(out.iterdir()):
        raise UsageError(f"{out} already holds a retrain; move it away to retrain again")
    command = [sys.executable, "-m", "tune_cifar.train", "--from-study", str(study.folder), "--train-on-val"]
    command += ["--out", str(out)] + (["--epochs", str(epochs)] if epochs else [])
    for flag, value in overrides.items():
        if value is not None:
            command += [f"--{flag.replace('_', '-')}", str(value)]
    print("retraining:", " ".join(command), flush=True)
    started = time.perf_counter()
    code = subprocess.run(command, cwd=REPO).returncode
    if code != 0:
        raise UsageError(f"retrain failed: tune_cifar.train exited {code} (its output is above)")
    row = read_table(out, "trials").iloc[0]
    trained = config.replace(epochs=int(row["epochs"]))
    result = {
        "study": study.name,
        "source_trial": str(trial["trial_id"]),
        "source_best_val_acc": float(trial["best_val_acc"]),
        "config": {key: native(v) for key, v in cfg.to_row(trained).items() if v is not None},
        "epochs": int(row["epochs_run"]),
        "data": str(row["data"]),
        "train_images": int(row["train_images"]),
        "test_acc": float(row["test_acc"]),
        "test_loss": float(row["test_loss"]),
        "reference_test_acc": REFERENCE_TEST_ACC,
        "difference_to_reference": float(row["test_acc"]) - REFERENCE_TEST_ACC,
        "weights": str(out / "model.pt"),
        "command": command,
        "wall_s": time.perf_counter() - started,
    }
    (out / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def retrain_result(study: Study) -> dict[str, Any] | None:
    path = StudyFolder(study.folder).retrain / "result.json"
    return json.loads(path.read_text()) if path.is_file() else None


# -- report ------------------------------------------------------------------------------------
def summary_lines(study: Study) -> list[str]:
    trials = study.trials
    finished = study.require_finished()
    statuses = ", ".join(f"{n} {status}" for status, n in trials["status"].value_counts().items())
    max_epochs = trials["epochs"].max()
    used = int(trials["epochs_run"].fillna(0).sum())
    budget = int(len(trials) * max_epochs) if not pd.isna(max_epochs) else 0
    lines = [
        f"- study `{study.name}` in `{study.folder}`: {len(trials)} trials ({statuses})",
        f"- data: {', '.join(sorted(trials['data'].dropna().astype(str).unique())) or '–'}; "
        f"training images per trial: {', '.join(fmt(v) for v in sorted(trials['train_images'].dropna().unique()))}",
        f"- epochs trained: {used:,} of {budget:,} without early stopping ({used / budget:.0%})" if budget else "",
        f"- best trial `{finished.iloc[0]['trial_id']}`: {pct(finished.iloc[0]['best_val_acc'])} validation accuracy "
        f"(epoch {fmt(finished.iloc[0]['best_epoch'])} of the {fmt(finished.iloc[0]['epochs_run'])} it ran)",
        f"- trial wall time: {duration(trials['wall_s'].sum())} in all (summed over trials)",
    ]
    return [line for line in lines if line]


def duration(seconds: float) -> str:
    return f"{seconds / 3600:.2f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"


def write_report(
    study: Study,
    top: int = 10,
    retrained: dict[str, Any] | None = None,
    min_importance_trials: int = MIN_TRIALS_FOR_IMPORTANCE,
) -> Path:
    """Write ``analysis/report.md`` and its PNGs; returns the report's path."""
    out = study.out_dir()
    ranking = importance(study, min_importance_trials)
    parts = [
        "# Study report: best configuration",
        "",
        *summary_lines(study),
        "",
        *leaderboard_section(study, top),
        *factor_section(study),
        *importance_section(ranking, out),
        *pareto_section(study, out),
        *search_section(study, ranking, out),
        *retrain_section(study, retrained or retrain_result(study)),
    ]
    path = out / "report.md"
    path.write_text("\n".join(parts))
    return path


def leaderboard_section(study: Study, top: int) -> list[str]:
    board = leaderboard(study, top)
    return [
        f"## Leaderboard (top {len(board)} by best validation accuracy)",
        "",
        "Each row's accuracy rests on its own `epochs_run`: a trial ASHA stopped early ran fewer epochs.",
        "",
        markdown_table(shown_leaderboard(board)),
        "",
    ]


def factor_section(study: Study) -> list[str]:
    parts = [
        "## Factors",
        "",
        "Per budget and level: validation accuracy after exactly `epochs` epochs, mean ± sample standard "
        "deviation over the `trials` that ran at least that long, and the best of them. A trial counts at "
        "every budget it reached (ASHA's first rung holds every finished trial, later ones only its survivors), "
        "so no number mixes budgets; compare levels only within one budget. Trials where the factor is inactive "
        "are left out.",
        "",
    ]
    for factor in factors(study.require_finished()):
        parts += [f"### {factor}", "", markdown_table(shown_factor_table(factor_table(study, factor), factor)), ""]
    return parts


def importance_section(ranking: Importance, out: Path) -> list[str]:
    parts = ["## Hyperparameter importance", "", ranking.statement, ""]
    if ranking.scores is not None:
        save(plot_importance(ranking), out / "importance.png")
        table = pd.DataFrame(
            {"hyperparameter": ranking.scores.index, "importance": ranking.scores.map(lambda v: f"{v:.3f}").to_numpy()}
        )
        parts += ["![importance](importance.png)", "", markdown_table(table), ""]
    return parts


def pareto_section(study: Study, out: Path) -> list[str]:
    epochs, front = pareto_front(study)
    save(plot_pareto(study), out / "pareto.png")
    front_table = pd.DataFrame(
        {
            "trial_id": front["trial_id"],
            "macs": front["macs"].map(fmt),
            "params": front["params"].map(fmt),
            f"val acc after {epochs} epochs": front["val_acc"].map(pct),
        }
    )
    return [
        f"## Pareto front: validation accuracy after {epochs} epochs against MACs",
        "",
        f"Only trials that ran {epochs} epochs are on the front; ASHA-stopped trials are drawn as crosses.",
        "",
        "![pareto](pareto.png)",
        "",
        markdown_table(front_table),
        "",
    ]


def search_section(study: Study, ranking: Importance, out: Path) -> list[str]:
    save(search_views.plot_learning_curves(study, top=5), out / "learning_curves.png")
    save(search_views.plot_asha(study), out / "asha.png")
    parts = ["## The search", "", "![learning curves](learning_curves.png)", "", "![asha](asha.png)", ""]
    if len(study.varying()) >= 1:
        save(search_views.plot_parallel_coordinates(study, params=by_importance(study, ranking)), out / "parallel.png")
        parts += ["![parallel coordinates](parallel.png)", ""]
    return parts


def retrain_section(study: Study, retrained: dict[str, Any] | None) -> list[str]:
    parts = ["## Retrain on train + validation, tested once", ""]
    if not retrained:
        return [
            *parts,
            f"Not run yet: `python analysis/best_config.py {study.folder} --retrain` "
            f"(the source report reached {pct(REFERENCE_TEST_ACC)} test accuracy).",
            "",
        ]
    comparable = retrained["data"] == "cifar10" and retrained["train_images"] == CIFAR10_TRAIN_IMAGES
    return [
        *parts,
        f"Trial `{retrained['source_trial']}` ({pct(retrained['source_best_val_acc'])} validation) retrained for "
        f"{retrained['epochs']} epochs on {retrained['train_images']:,} images ({retrained['data']}):",
        "",
        f"- **test accuracy {pct(retrained['test_acc'])}** (test loss {retrained['test_loss']:.4f})",
        f"- source report: {pct(retrained['reference_test_acc'])} "
        f"({100 * retrained['difference_to_reference']:+.2f} points"
        + (
            ")"
            if comparable
            else f"; not comparable: the report trained on all {CIFAR10_TRAIN_IMAGES:,} CIFAR-10 training images)"
        ),
        "- weights and tables: `retrain/`",
        "",
    ]


def by_importance(study: Study, ranking: Importance) -> list[str]:
    varying = study.varying()
    if ranking.scores is None:
        return varying
    ranked = [key for key in ranking.scores.index if key in varying]
    return ranked + [key for key in varying if key not in ranked]


# -- command line ------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None) -> Any:
    parser = cli.ArgumentParser(prog="python analysis/best_config.py", description=__doc__.splitlines()[0])
    parser.add_argument("study_dir", help="the study folder (holds trials/, epochs/, layers/)")
    parser.add_argument("--top", type=int, default=10, help="trials in the leaderboard (default 10)")
    parser.add_argument(
        "--min-importance-trials",
        type=int,
        default=MIN_TRIALS_FOR_IMPORTANCE,
        help=f"trials one budget needs before importance is ranked (default {MIN_TRIALS_FOR_IMPORTANCE})",
    )
    parser.add_argument("--retrain", action="store_true", help="retrain the best config on train+val and test it once")
    parser.add_argument("--epochs", type=int, help="retrain epochs (default: the best trial's configured epochs)")
    parser.add_argument("--data", choices=("cifar10", "synthetic"), help="retrain data (default: the study's)")
    parser.add_argument("--data-dir", help="retrain: folder holding cifar-10-batches-py/")
    parser.add_argument("--subset", type=int, help="retrain: train+val images sampled (default: the study's)")
    parser.add_argument(
        "--val-size", type=int, help="retrain: validation images of the full pool (default: the study's)"
    )
    args = parser.parse_args(argv)
    if args.top < 1:
        raise UsageError(f"--top must be at least 1, got {args.top}")
    if args.min_importance_trials < 2:
        raise UsageError(f"--min-importance-trials must be at least 2, got {args.min_importance_trials}")
    if args.epochs is not None and args.epochs < 1:
        raise UsageError(f"--epochs must be at least 1, got {args.epochs}")
    if not args.retrain and any(
        v is not None for v in (args.epochs, args.data, args.data_dir, args.subset, args.val_size)
    ):
        raise UsageError("--epochs, --data, --data-dir, --subset and --val-size only apply with --retrain")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    study = load_study(args.study_dir)
    study.require_finished()
    study.table("epochs")  # a missing table is an error before any work
    retrained = None
    if args.retrain:
        retrained = retrain(
            study, args.epochs, data=args.data, subset=args.subset, val_size=args.val_size, data_dir=args.data_dir
        )
    path = write_report(study, top=args.top, retrained=retrained, min_importance_trials=args.min_importance_trials)
    board = leaderboard(study, min(args.top, 5))
    top = board.iloc[0]
    print(f"best: {top['trial_id']} {pct(top['best_val_acc'])} ({top['config'] or 'no hyperparameter varied'})")
    if retrained:
        print(f"retrain test accuracy {pct(retrained['test_acc'])} (source report {pct(REFERENCE_TEST_ACC)})")
    print(f"report: {path}")
    return 0


if __name__ == "__main__":
    cli.run(main)
