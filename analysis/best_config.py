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
import os
import subprocess
import sys
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `analysis` and `tune_cifar` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import optuna
import pandas as pd
import yaml
from matplotlib.figure import Figure
from optuna.distributions import IntDistribution

from analysis import search_views
from analysis._study import (
    CATEGORICAL,
    REFERENCE_TEST_ACC,
    Study,
    config_of,
    describe,
    factors,
    fmt,
    load_study,
    markdown_table,
    native,
    pct,
    save,
)
from tune_cifar import cli
from tune_cifar import config as cfg
from tune_cifar.errors import UsageError
from tune_cifar.tables import read_table

REPO = Path(__file__).resolve().parents[1]
MIN_TRIALS_FOR_IMPORTANCE = 5
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
    """Per level of ``factor``: trials, best and median best validation accuracy, the best trial.

    Trials where the factor is inactive (null: ``activation`` of a VGG-A) are left out, not
    pooled into a fake level.
    """
    finished = study.require_finished()
    active = finished[finished[factor].notna()]
    rows = []
    for level, group in active.groupby(active[factor].map(native), sort=False):
        best = group.loc[group["best_val_acc"].idxmax()]
        rows.append(
            {
                factor: level,
                "trials": len(group),
                "best_val_acc": best["best_val_acc"],
                "median_val_acc": group["best_val_acc"].median(),
                "best_trial": best["trial_id"],
            }
        )
    return pd.DataFrame(rows).sort_values("best_val_acc", ascending=False, ignore_index=True)


def shown_leaderboard(board: pd.DataFrame) -> pd.DataFrame:
    """The leaderboard with readable cells (percentages, thousands separators)."""
    cells = {key: board[key].map(fmt) for key in ("best_epoch", "epochs_run", "macs", "params")}
    return board.assign(**cells, best_val_acc=board["best_val_acc"].map(pct))


def shown_factor_table(table: pd.DataFrame, factor: str) -> pd.DataFrame:
    return table.assign(
        **{
            factor: table[factor].map(fmt),
            "best_val_acc": table["best_val_acc"].map(pct),
            "median_val_acc": table["median_val_acc"].map(pct),
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
    if cfg.TrainConfig.__dataclass_fields__[key].type == "int" and all(float(v).is_integer() for v in present):
        return IntDistribution(int(low), int(high), log=log)
    return optuna.distributions.FloatDistribution(float(low), float(high), log=log)


def optuna_study(study: Study) -> tuple[optuna.Study, dict[str, optuna.distributions.BaseDistribution]]:
    """The finished trials as an in-memory Optuna study (value = best validation accuracy).

    An inactive parameter (null) is simply absent from that trial's params, which is how a
    define-by-run search records it and how PED-ANOVA's conditional regimes expect it.
    """
    finished = study.require_finished()
    spaces = {key: distribution(key, finished[key]) for key in study.varying()}
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    frozen = []
    for _, row in finished.iterrows():
        params = {key: native(row[key]) for key in spaces if not pd.isna(row[key])}
        # an int column with nulls reads back as float; IntDistribution wants ints
        params = {key: int(v) if isinstance(spaces[key], IntDistribution) else v for key, v in params.items()}
        frozen.append(
            optuna.trial.create_trial(
                value=float(row["best_val_acc"]),
                params=params,
                distributions={key: spaces[key] for key in params},
                user_attrs={"trial_id": row["trial_id"]},
            )
        )
    result = optuna.create_study(direction="maximize", study_name=study.name)
    result.add_trials(frozen)
    return result, spaces


def importance(study: Study) -> pd.Series | str:
    """PED-ANOVA importance of each varying hyperparameter for reaching the top trials, or why not.

    PED-ANOVA (Watanabe et al. 2023) needs no scikit-learn and handles conditional parameters
    by regime. Its default top quantile (10%) holds fewer than three trials in a small study,
    so the quantile grows to at least three trials (at most half of them).
    ASHA-stopped trials count with their best accuracy before the stop: ASHA stopped them for
    ranking low at a rung, which is the ranking PED-ANOVA looks at.
    """
    finished = study.require_finished()
    if len(finished) < MIN_TRIALS_FOR_IMPORTANCE:
        return f"skipped: {len(finished)} finished trials, importance needs at least {MIN_TRIALS_FOR_IMPORTANCE}"
    optuna_run, spaces = optuna_study(study)
    if not spaces:
        return "skipped: every hyperparameter took a single value"
    quantile = min(0.5, max(0.1, 3 / len(finished)))
    evaluator = optuna.importance.PedAnovaImportanceEvaluator(target_quantile=quantile)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scores = optuna.importance.get_param_importances(optuna_run, evaluator=evaluator, params=list(spaces))
    return pd.Series(scores, name="importance").sort_values(ascending=False)


# -- Pareto front ------------------------------------------------------------------------------
def pareto_front(study: Study) -> pd.DataFrame:
    """Finished trials no other trial beats on both validation accuracy (higher) and MACs (lower)."""
    finished = study.require_finished().dropna(subset=["macs"])
    ordered = finished.sort_values(["macs", "best_val_acc"], ascending=[True, False])
    front, best = [], -math.inf
    for index, row in ordered.iterrows():
        if row["best_val_acc"] > best:
            front.append(index)
            best = row["best_val_acc"]
    return ordered.loc[front]


def plot_pareto(study: Study) -> Figure:
    finished = study.require_finished().dropna(subset=["macs"])
    front = pareto_front(study)
    fig = Figure(figsize=(7.5, 4.8), layout="constrained")
    ax = fig.subplots()
    ax.scatter(finished["macs"], 100 * finished["best_val_acc"], color="tab:grey", alpha=0.6, label="trial")
    ax.step(front["macs"], 100 * front["best_val_acc"], where="post", color="tab:red", lw=1.5)
    ax.scatter(front["macs"], 100 * front["best_val_acc"], color="tab:red", zorder=3, label="Pareto front")
    for row in front.itertuples():
        ax.annotate(
            str(row.trial_id),
            (row.macs, 100 * row.best_val_acc),
            textcoords="offset points",
            xytext=(4, -10),
            fontsize="x-small",
        )
    ax.set_xscale("log")
    ax.set(
        title="Validation accuracy against compute (up and left is better)",
        xlabel="multiply-accumulates per 32×32 image (MACs, log scale)",
        ylabel="best validation accuracy (%)",
    )
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    return fig


def plot_importance(scores: pd.Series) -> Figure:
    fig = Figure(figsize=(6.5, 0.35 * len(scores) + 1.4), layout="constrained")
    ax = fig.subplots()
    ax.barh(scores.index[::-1], scores.to_numpy()[::-1], color="tab:blue")
    ax.set(
        title="Hyperparameter importance (PED-ANOVA, reaching the top trials)",
        xlabel="importance (normalised, sums to 1)",
        ylabel="hyperparameter",
    )
    ax.grid(alpha=0.3, axis="x")
    return fig


# -- retrain -----------------------------------------------------------------------------------
def study_data(study: Study, trial: pd.Series) -> dict[str, Any]:
    """The data flags the study trained with, so the retrain sees the same images plus validation.

    ``study.json`` (written by ``tune_cifar.search``) holds them; a folder without it (a single
    ``tune_cifar.train`` run) falls back to the trial's data source and the full split.
    """
    settings_path = study.folder / "study.json"
    settings = json.loads(settings_path.read_text()) if settings_path.is_file() else {}
    source = str(settings.get("data") or trial.get("data") or "")
    return {
        "data": "cifar10" if "cifar" in source.lower() else "synthetic",
        "subset": settings.get("subset"),
        "val_size": settings.get("val_size"),
        "data_dir": settings.get("data_dir"),
    }


def retrain(study: Study, epochs: int | None = None, **overrides: Any) -> dict[str, Any]:
    """Train the best trial's configuration on train + validation, test once, record it in ``retrain/``.

    ``overrides`` (data, subset, val_size, data_dir) replace the study's data settings.
    """
    trial = study.trial(study.best_trial_id())
    config = config_of(trial)
    config = config.replace(epochs=epochs or config.epochs)
    out = study.folder / "retrain"
    if out.exists() and any(out.iterdir()):
        raise UsageError(f"{out} already holds a retrain; move it away to retrain again")
    config_path = study.out_dir() / "best_config.yaml"
    config_path.write_text(yaml.safe_dump({**cfg.to_dict(config), "filters": list(config.filters)}, sort_keys=False))
    data = study_data(study, trial) | {key: value for key, value in overrides.items() if value is not None}
    command = [
        sys.executable,
        "-m",
        "tune_cifar.train",
        "--config",
        str(config_path),
        "--train-on-val",
        "--out",
        str(out),
        "--data",
        data["data"],
    ]
    for flag in ("subset", "val_size", "data_dir"):
        if data.get(flag) is not None:
            command += [f"--{flag.replace('_', '-')}", str(data[flag])]
    print("retraining:", " ".join(command), flush=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    started = time.perf_counter()
    code = subprocess.run(command, cwd=REPO, env=env).returncode
    if code != 0:
        raise UsageError(f"retrain failed: tune_cifar.train exited {code} (its output is above)")
    row = read_table(out, "trials").iloc[0]
    result = {
        "study": study.name,
        "source_trial": str(trial["trial_id"]),
        "source_best_val_acc": float(trial["best_val_acc"]),
        "config": {key: native(v) for key, v in cfg.to_row(config).items() if v is not None},
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
    path = study.folder / "retrain" / "result.json"
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
        f"- best trial `{finished.iloc[0]['trial_id']}`: {pct(finished.iloc[0]['best_val_acc'])} validation accuracy",
        f"- trial wall time: {duration(trials['wall_s'].sum())} in all (summed over trials)",
    ]
    return [line for line in lines if line]


def duration(seconds: float) -> str:
    return f"{seconds / 3600:.2f} h" if seconds >= 3600 else f"{seconds / 60:.1f} min"


def write_report(study: Study, top: int = 10, retrained: dict[str, Any] | None = None) -> Path:
    """Write ``analysis/report.md`` and its PNGs; returns the report's path."""
    out = study.out_dir()
    parts = ["# Study report: best configuration", "", *summary_lines(study), ""]

    board = leaderboard(study, top)
    parts += [
        f"## Leaderboard (top {len(board)} by best validation accuracy)",
        "",
        markdown_table(shown_leaderboard(board)),
        "",
    ]

    parts += [
        "## Factors",
        "",
        "Per level: finished trials, best and median best validation accuracy "
        "(trials where the factor is inactive are left out).",
        "",
    ]
    for factor in factors(study.require_finished()):
        parts += [f"### {factor}", "", markdown_table(shown_factor_table(factor_table(study, factor), factor)), ""]

    parts += ["## Hyperparameter importance", ""]
    scores = importance(study)
    if isinstance(scores, str):
        parts += [f"Importance {scores}.", ""]
    else:
        save(plot_importance(scores), out / "importance.png")
        table = pd.DataFrame(
            {"hyperparameter": scores.index, "importance": scores.map(lambda v: f"{v:.3f}").to_numpy()}
        )
        parts += [
            "PED-ANOVA over the finished trials (how much each parameter's distribution differs "
            "between the top trials and all trials).",
            "",
            "![importance](importance.png)",
            "",
            markdown_table(table),
            "",
        ]

    front = pareto_front(study)
    save(plot_pareto(study), out / "pareto.png")
    front_table = pd.DataFrame(
        {
            "trial_id": front["trial_id"],
            "macs": front["macs"].map(fmt),
            "params": front["params"].map(fmt),
            "best_val_acc": front["best_val_acc"].map(pct),
        }
    )
    parts += [
        "## Pareto front: validation accuracy against MACs",
        "",
        "![pareto](pareto.png)",
        "",
        markdown_table(front_table),
        "",
    ]

    save(search_views.plot_learning_curves(study, top=5), out / "learning_curves.png")
    save(search_views.plot_asha(study), out / "asha.png")
    parts += ["## The search", "", "![learning curves](learning_curves.png)", "", "![asha](asha.png)", ""]
    if len(study.varying()) >= 1:
        save(search_views.plot_parallel_coordinates(study, params=by_importance(study, scores)), out / "parallel.png")
        parts += ["![parallel coordinates](parallel.png)", ""]

    retrained = retrained or retrain_result(study)
    parts += ["## Retrain on train + validation, tested once", ""]
    if retrained:
        parts += [
            f"Trial `{retrained['source_trial']}` ({pct(retrained['source_best_val_acc'])} validation) retrained for "
            f"{retrained['epochs']} epochs on {retrained['train_images']:,} images ({retrained['data']}):",
            "",
            f"- **test accuracy {pct(retrained['test_acc'])}** (test loss {retrained['test_loss']:.4f})",
            f"- source report: {pct(retrained['reference_test_acc'])} "
            f"({100 * retrained['difference_to_reference']:+.2f} points"
            + (
                ")"
                if retrained["data"] == "cifar10" and retrained["train_images"] == CIFAR10_TRAIN_IMAGES
                else f"; not comparable: the report trained on all {CIFAR10_TRAIN_IMAGES:,} CIFAR-10 training images)"
            ),
            "- weights and tables: `retrain/`",
            "",
        ]
    else:
        parts += [
            f"Not run yet: `python analysis/best_config.py {study.folder} --retrain` "
            f"(the source report reached {pct(REFERENCE_TEST_ACC)} test accuracy).",
            "",
        ]
    path = out / "report.md"
    path.write_text("\n".join(parts))
    return path


def by_importance(study: Study, scores: pd.Series | str) -> list[str]:
    varying = study.varying()
    if isinstance(scores, str):
        return varying
    return [key for key in scores.index if key in varying] + [key for key in varying if key not in scores.index]


# -- command line ------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None) -> Any:
    parser = cli.ArgumentParser(prog="python analysis/best_config.py", description=__doc__.splitlines()[0])
    parser.add_argument("study_dir", help="the study folder (holds trials/, epochs/, layers/)")
    parser.add_argument("--top", type=int, default=10, help="trials in the leaderboard (default 10)")
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
    path = write_report(study, top=args.top, retrained=retrained)
    board = leaderboard(study, min(args.top, 5))
    top = board.iloc[0]
    print(f"best: {top['trial_id']} {pct(top['best_val_acc'])} ({top['config'] or 'no hyperparameter varied'})")
    if retrained:
        print(f"retrain test accuracy {pct(retrained['test_acc'])} (source report {pct(REFERENCE_TEST_ACC)})")
    print(f"report: {path}")
    return 0


if __name__ == "__main__":
    cli.run(main)
