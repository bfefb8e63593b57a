"""RESULTS.md from the studies of ``analysis/make_results.sh``: the source reports' questions, answered.

``python analysis/results.py STUDIES_DIR [--out RESULTS.md] [--figures results]`` reads only the
Parquet tables of the folders ``make_results.sh`` writes and writes:

1. the second report's four factor tables as fair comparisons (``fair_optimizers``,
   ``fair_schedulers``, ``fair_losses``, ``fair_activations``: :mod:`analysis.comparison`), each
   level at the baseline's learning rate and at its own tuned one, beside the report's single-run
   figures; the optimizer table again at a larger budget (``fair_optimizers_large``), with whether
   its ordering holds; every table's numbers as ``results/factor_tables.csv``;
2. tuned (the TPE + ASHA study's best configuration, ``full``) against hand-tuned (``seed_best``),
   both retrained on train + validation over seeds and tested once per seed (``retrain_tuned``,
   ``retrain_hand``), with how well ASHA's rungs predicted the final ranking;
3. the BN landscape in the course's setting (Adam) and Santurkar et al.'s (plain SGD): epochs
   to 50% validation accuracy, the loss band, gradient predictiveness and β-smoothness, and
   for each of the paper's claims whether this budget reproduces it (``bn_adam``, ``bn_sgd``).

Every accuracy states the data, images × epochs, seeds and precision it rests on. The runs take
many hours on a 2-core CPU, so they are made in chunks, possibly on different machines: each
section is kept under ``results/`` when its folders are present and carried over from there when
they are not. A section never run says so.
"""

from __future__ import annotations

import itertools
import math
import os
import platform
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from tune_cifar import cli
from tune_cifar.analysis import bn_landscape, comparison, rankings, search_views
from tune_cifar.analysis._study import REFERENCE_TEST_ACC, Study, budget, fmt, load_study, markdown_table, pct, save
from tune_cifar.errors import UsageError
from tune_cifar.machine import cpu_model
from tune_cifar.outcome import count_words
from tune_cifar.tables import outcome_counts, read_table, write_atomic_text

# The second report's single runs (50-100 epochs, full CIFAR-10, test accuracy %), per factor.
REPORTED = {
    "optimizer": {"adam": 88.42, "sgd": 78.58, "sign_sgd": 82.64},
    "scheduler": {"step": 88.53, "plateau": 88.44, "cosine": 88.98},
    "loss": {"cross_entropy": 88.42, "label_smoothing": 89.61, "focal": 87.61, "mse": 90.03},
    "activation": {"leaky_relu": 89.45, "relu": 89.31, "elu": 87.45},
}
# factor -> (its comparison's folder, the make_results.sh chunk that runs it)
FAIR = {"optimizer": ("fair_optimizers", 1), "scheduler": ("fair_schedulers", 2), "loss": ("fair_losses", 3),
        "activation": ("fair_activations", 3)}  # fmt: skip
LARGE = "fair_optimizers_large"  # the optimizer comparison at 45,000 images x 10 epochs
TUNED_FOLDERS = ("full", "retrain_tuned", "retrain_hand")  # section 2
BN_FOLDERS = ("bn_adam", "bn_sgd")  # section 3
GOAL_POINTS = 1.5  # the tuned configuration should beat the hand-tuned one by this many test points
DATA_NOTE = (
    "CIFAR-10 from the offline copy in `../shared/data/cifar10` (all 60,000 images with the official labels; "
    "53,813 of them JPEG-decoded, about 30 dB PSNR, so accuracies run a little below the official files')"
)


def machine() -> str:
    """This machine in one line: CPU model, cores, Python."""
    return f"{cpu_model()}, {os.cpu_count()} cores, {platform.system()}, Python {platform.python_version()}"


def wall(study: Study) -> float:
    return float(study.trials["wall_s"].sum())


def comparison_rows(
    studies: Path, name: str, comparisons: Path, link: str
) -> tuple[list[str], pd.DataFrame | None] | None:
    """A comparison's report and CSV rows: regenerated into ``comparisons`` from its Parquet tables when
    its folder is in ``studies``, else the ones a previous regeneration wrote there (None: never run).
    A folder whose run has not finished is said to be in progress (no rows), never shown half-done
    or replaced by an older report."""
    folder = studies / name
    if folder.is_dir():
        try:
            text, rows = comparison.report(folder, comparisons)
        except UsageError as exc:
            return [f"In progress, not reported: {exc}."], None
        write_atomic_text(comparisons / f"{name}.md", text + "\n")
        write_atomic_text(comparisons / f"{name}.csv", rows.to_csv(index=False, float_format="%.4g"))
    md, csv = comparisons / f"{name}.md", comparisons / f"{name}.csv"
    if not (md.is_file() and csv.is_file()):
        return None
    text = md.read_text().replace(f"]({name}_", f"]({link}/{comparisons.name}/{name}_")
    return text.splitlines(), pd.read_csv(csv)


def ordering(rows: pd.DataFrame, view: str) -> list[str]:
    """The levels of one view, best mean first."""
    shown = rows[rows["view"] == view].sort_values("mean", ascending=False)
    return [str(level) for level in shown["level"]]


def agreement_line(ours: list[str], theirs: list[str]) -> str:
    pairs = list(itertools.combinations([level for level in ours if level in theirs], 2))
    agree = sum(theirs.index(a) < theirs.index(b) for a, b in pairs)
    return "the same order" if agree == len(pairs) else f"{agree} of {len(pairs)} pairs in the same order"


def report_line(factor: str, rows: pd.DataFrame) -> str:
    """The report's single-run figures and whether each view orders the levels as the report did."""
    reported = REPORTED[factor]
    theirs = sorted(reported, key=lambda level: -reported[level])
    figures = ", ".join(f"{level} {reported[level]:.2f}" for level in theirs)
    views = []
    for view in ("baseline", "tuned"):
        ours = [level for level in ordering(rows, view) if level in reported]
        if ours:
            views.append(f"{view} view {' > '.join(ours)} ({agreement_line(ours, theirs)})")
    return (
        f"The report (test accuracy, single runs of 50-100 epochs on all 50,000 images, for the ordering only): "
        f"{figures}. Ordering here: {'; '.join(views)}; ties above are ties whatever the order says."
    )


def factor_section(studies: Path, figures: Path, link: str) -> tuple[list[str], list[pd.DataFrame]]:
    """Section 1 and the rows of ``factor_tables.csv``."""
    comparisons = figures / "comparisons"
    comparisons.mkdir(parents=True, exist_ok=True)
    parts = [
        "## 1. The second report's factor tables, each level at its own tuned learning rate",
        "",
        "Each factor by `python -m tune_cifar.compare` (README: Fair comparisons): every level tuned over the same "
        "8 learning rates (1e-4 … 1, a log grid) on seed 0, the best selected on validation, then each level at "
        "the baseline's lr 0.002 (the one-factor grid of the report) and at its own lr over 5 fresh seeds. "
        "The CSV of every table: `results/factor_tables.csv`.",
        "",
    ]
    tables = []
    for factor, (name, chunk) in FAIR.items():
        found = comparison_rows(studies, name, comparisons, link)
        if found is None:
            parts += [f"### {factor}", "", f"Not run yet (`make results DATA_DIR=... CHUNK={chunk}`).", ""]
            continue
        lines, rows = found
        if rows is None:
            parts += [f"### {factor}", "", *lines, ""]
            continue
        parts += [*lines, report_line(factor, rows), ""]
        tables.append(rows)
        if factor == "optimizer":
            parts += large_budget(studies, comparisons, link, rows, tables)
    return parts, tables


def large_budget(
    studies: Path, comparisons: Path, link: str, small: pd.DataFrame, tables: list[pd.DataFrame]
) -> list[str]:
    """The optimizer table again with all training images and twice the epochs: does its ordering hold?"""
    found = comparison_rows(studies, LARGE, comparisons, link)
    if found is None:
        return ["### optimizer at a larger budget", "", "Not run yet (`make results DATA_DIR=... CHUNK=4`).", ""]
    lines, rows = found
    if rows is None:
        return ["### optimizer at a larger budget", "", *lines, ""]
    tables.append(rows)
    before, after = ordering(small, "tuned"), ordering(rows, "tuned")
    order = "the same order" if before == after else agreement_line(after, before)
    return [
        *(line.replace("### optimizer", "### optimizer at a larger budget", 1) for line in lines),
        f"Ordering of the tuned view by mean: {' > '.join(after)} here, {' > '.join(before)} at the small budget "
        f"({order}). {choice_line(small, rows)}",
        "",
    ]


def choice_line(small: pd.DataFrame, large: pd.DataFrame) -> str:
    """Whether the small budget's choice survives the larger one: what each budget calls the best
    level and which levels it cannot tell from it (paired by seed), tuned view."""

    def verdicts(rows: pd.DataFrame) -> dict[str, str]:
        tuned = rows[rows["view"] == "tuned"]
        return {str(level): str(verdict) for level, verdict in zip(tuned["level"], tuned["verdict"], strict=True)}

    before, after = verdicts(small), verdicts(large)
    chosen = next(level for level, verdict in before.items() if verdict == "best")
    best = next(level for level, verdict in after.items() if verdict == "best")
    tied = [level for level, verdict in after.items() if verdict.startswith("tied")]
    holds = after.get(chosen) in ("best", "tied with the best")
    return (
        f"The small budget's choice, {chosen}, is {after.get(chosen, 'not run')} here (best: {best}"
        f"{'; tied with it: ' + ', '.join(tied) if tied else ''}): the choice {'holds' if holds else 'does not hold'} "
        "at this budget."
    )


def retrain_summary(folder: Path) -> dict[str, Any] | None:
    if not (folder / "trials").is_dir():
        return None
    trials = read_table(folder, "trials")
    return {
        "mean": trials["test_acc"].mean(),
        "std": trials["test_acc"].std(ddof=1),
        "n": len(trials),
        "each": ", ".join(f"{100 * v:.2f}" for v in trials.sort_values("seed")["test_acc"]),
        "row": trials.iloc[0],
    }


def tuned_section(studies: Path, figures: Path, link: str) -> list[str]:
    parts = [
        "## 2. Tuned against hand-tuned, at an equal budget",
        "",
        f"For context, not comparison: the second report's hand-tuned best reached {100 * REFERENCE_TEST_ACC:.2f}% "
        "test accuracy with filters 128,256,512 over 100 epochs on all 50,000 images: about 70 times the "
        "image-epochs of the retrains below (14,000 × 5), at four times their widths.",
        "",
    ]
    full = studies / "full"
    if (full / "trials").is_dir():
        study = load_study(full)
        best = study.require_finished().iloc[0]
        counts = count_words(outcome_counts(study.trials))
        sampled = [k for k in study.varying(study.trials) if k != "seed" and not pd.isna(best[k])]
        parts += [
            f"TPE + ASHA over the full space (`full`, filters held at {best['filters']}): {len(study.trials)} trials "
            f"({counts}), {budget(study)}, {wall(study) / 60:.0f} min of trial time. "
            f"Best trial `{best['trial_id']}`: {pct(best['best_val_acc'])} validation accuracy, "
            f"{', '.join(f'{k}={fmt(best[k])}' for k in sampled)}.",
            "",
        ]
        save(search_views.plot_asha(study), figures / "tuned_asha.png")
        _, agreement = rankings.budget_rankings(study)
        parts += [
            f"![ASHA's decisions in the tuned study]({link}/tuned_asha.png)",
            "",
            "Did ASHA's rungs rank the trials as the full budget did?",
            "",
            *agreement,
            "",
        ]
    else:
        parts += [f"The study was not run (no `{full}`).", ""]
    rows = []
    results = {name: retrain_summary(studies / f"retrain_{name}") for name in ("tuned", "hand")}
    for name, result in results.items():
        if result is None:
            rows.append({"configuration": name, "test acc, mean ± std": "not run", "seeds": "–", "each seed": "–"})
            continue
        rows.append(
            {
                "configuration": {"tuned": "tuned (study's best)", "hand": "hand-tuned (seed_best)"}[name],
                "test acc, mean ± std": f"{100 * result['mean']:.2f} ± {100 * result['std']:.2f}",
                "seeds": result["n"],
                "each seed": result["each"],
            }
        )
    parts += [markdown_table(pd.DataFrame(rows)), ""]
    if all(results.values()):
        tuned, hand = results["tuned"], results["hand"]
        gap = 100 * (tuned["mean"] - hand["mean"])
        error = 100 * math.sqrt(tuned["std"] ** 2 / tuned["n"] + hand["std"] ** 2 / hand["n"])
        row = tuned["row"]
        parts += [
            f"Both retrained on train + validation ({fmt(row['train_images'])} images × {fmt(row['epochs'])} epochs, "
            f"{row['precision']}) and tested once per seed on the whole CIFAR-10 test set. Tuned minus hand-tuned: "
            f"**{gap:+.2f} points** (standard error of the difference {error:.2f}); the goal was ≥ +{GOAL_POINTS} "
            f"points: {'met' if gap >= GOAL_POINTS else 'not met'}.",
            "",
        ]
    return parts


def bn_section(studies: Path, figures: Path, link: str) -> list[str]:
    parts = ["## 3. Batch norm and the loss landscape (VGG-A)", ""]
    settings = {"bn_adam": "the course's setting: Adam at 1e-4, 5e-4, 1e-3, 2e-3",
                "bn_sgd": "Santurkar et al.'s setting: plain SGD at 0.1 and 0.5"}  # fmt: skip
    for name, title in settings.items():
        folder = studies / name
        parts += [f"### {title}", ""]
        if not (folder / "steps").is_dir():
            parts += [f"Not run (no `{folder}`).", ""]
            continue
        study = load_study(folder)
        steps = bn_landscape.landscape_steps(study)
        reach = bn_landscape.first_reach(study)
        table = bn_landscape.summary(steps, reach)
        save(bn_landscape.plot_loss_band(steps), figures / f"{name}_band.png")
        save(bn_landscape.plot_smoothness(steps), figures / f"{name}_smoothness.png")
        save(bn_landscape.plot_val_acc(study), figures / f"{name}_val_acc.png")
        shown = reach.assign(
            lr=reach["lr"].map(fmt),
            best_val_acc=reach["best_val_acc"].map(pct),
            first_epoch=reach["first_epoch"].map(lambda v: "never" if pd.isna(v) else str(v)),
        ).rename(columns={"first_epoch": "first epoch ≥ 50%"})
        parts += [
            f"`{name}`: {budget(study)}, one seed per run, probe every {fmt(study.trials['probe_every'].iloc[0])} "
            f"steps; {wall(study) / 60:.0f} min of trial time.",
            "",
            markdown_table(shown.drop(columns=["trial_id"])),
            "",
            markdown_table(table.map(lambda v: fmt(v) if not isinstance(v, str) else v)),
            "",
            bn_landscape.conclusion(table),
            "",
            *claims(table),
            "",
            f"![loss band]({link}/{name}_band.png)",
            "",
            f"![smoothness]({link}/{name}_smoothness.png)",
            "",
            f"![validation accuracy]({link}/{name}_val_acc.png)",
            "",
        ]
    return parts


def claims(table: pd.DataFrame) -> list[str]:
    """Santurkar et al.'s claims, each marked reproduced or not by this table's numbers."""
    rows = {row["variant"]: row for _, row in table.iterrows()}
    if not {"BN", "no BN"} <= set(rows):
        return ["The claims cannot be checked: one variant is missing."]
    bn, plain = rows["BN"], rows["no BN"]
    stuck = [name for name, row in rows.items() if row["runs at chance"] == row["runs"]]

    def smaller(column: str) -> str:
        if stuck:  # a run that never learned sits on a flat plateau: its band and β say nothing
            return f"not testable here (every {' and every '.join(stuck)} run stayed at chance accuracy)"
        a, b = bn[column], plain[column]
        return "reproduced" if a < b else "not reproduced"

    bn_epoch, plain_epoch = (
        None if pd.isna(v) else int(v) for v in (bn["earliest 50% epoch"], plain["earliest 50% epoch"])
    )
    if bn_epoch is None:
        faster = "not reproduced (BN never reached 50%)"
    elif plain_epoch is None:
        faster = f"reproduced (BN at epoch {bn_epoch}; no BN never within the budget)"
    else:
        faster = f"{'reproduced' if bn_epoch < plain_epoch else 'not reproduced'} (epoch {bn_epoch} vs {plain_epoch})"
    return [
        f"- BN trains faster (first epoch at 50% validation accuracy): {faster}.",
        f"- BN narrows the loss band along the gradient (median probe-loss band): {smaller('median probe-loss band')}.",
        f"- BN makes gradients more predictive (median gradient change): {smaller('median grad change')}.",
        f"- BN lowers the effective β-smoothness (median β): {smaller('median β')}.",
    ]


def carried(name: str, present: bool, build: Any, figures: Path) -> list[str]:
    """A section built from its studies when they are here (and kept as ``figures/sections/NAME.md``),
    else the one kept by the regeneration that had them, so that RESULTS.md can be regenerated chunk
    by chunk on machines that hold only some of the study folders."""
    kept = figures / "sections" / f"{name}.md"
    if present or not kept.is_file():
        lines = build()
        if present:
            kept.parent.mkdir(parents=True, exist_ok=True)
            write_atomic_text(kept, "\n".join(lines) + "\n")
        return lines
    return kept.read_text().splitlines()


def write(studies: Path, out: Path, figures: Path) -> Path:
    """Write ``out``, ``figures/factor_tables.csv`` and the PNGs (into ``figures``, linked relative to ``out``)."""
    figures.mkdir(parents=True, exist_ok=True)
    link = os.path.relpath(figures, out.parent)
    factors, tables = factor_section(studies, figures, link)
    # a section is rebuilt only from all of its folders: a partial rebuild would replace kept results with "not run"
    tuned_here = all((studies / name / "trials").is_dir() for name in TUNED_FOLDERS)
    bn_here = all((studies / name / "steps").is_dir() for name in BN_FOLDERS)
    known = [*(name for name, _ in FAIR.values()), LARGE, *TUNED_FOLDERS, *BN_FOLDERS]
    kept = [figures / "sections", figures / "comparisons"]
    if not any((studies / name).is_dir() for name in known) and not any(any(k.glob("*.md")) for k in kept):
        raise UsageError(f"{studies}: no study folders (run analysis/make_results.sh DATA_DIR {studies} first)")
    if tables:
        csv = pd.concat(tables, ignore_index=True)
        write_atomic_text(figures / "factor_tables.csv", csv.to_csv(index=False, float_format="%.4g"))
    parts = [
        "# Results on CIFAR-10",
        "",
        f"Regenerate: `make results DATA_DIR=... [CHUNK=1..5]` (the runs, in chunks of at most about 2.5 hours, "
        f"`analysis/make_results.sh`), then `python analysis/results.py {studies}` (this file, from the Parquet "
        "tables alone; a section whose studies are not on the machine is carried over from the last "
        "regeneration that had them, `results/sections/` and `results/comparisons/`).",
        "",
        f"- machine of this regeneration: {machine()}",
        f"- data: {DATA_NOTE}",
        "- budget: every number below states its images × epochs, validation images, seeds and precision; "
        "numbers are compared only within one budget. The report's figures are single 50-100-epoch runs on the "
        "full training set, shown for the ordering only.",
        "- selection happens on validation; test accuracy is touched only by the retrains of section 2, once per seed.",
        "",
        "What this budget can and cannot say: a few epochs on a fifth of the images rank choices by how fast they "
        "learn, not by where they end. The report's numbers come from 10-20 times more training; choices whose "
        "benefit comes late (MSE on logits, learning-rate decay, strong regularisation) can rank lower here and "
        "higher there. Agreement in ordering is evidence; disagreement is a question for a longer run, not a "
        "refutation.",
        "",
        *factors,
        *carried("tuned", tuned_here, lambda: tuned_section(studies, figures, link), figures),
        *carried("bn", bn_here, lambda: bn_section(studies, figures, link), figures),
    ]
    write_atomic_text(out, "\n".join(parts) + "\n")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = cli.ArgumentParser(prog="python analysis/results.py", description=__doc__.splitlines()[0])
    parser.add_argument("studies_dir", help="the folder make_results.sh filled (default studies/results)")
    parser.add_argument("--out", default="RESULTS.md", help="the Markdown file to write (default RESULTS.md)")
    parser.add_argument("--figures", default="results", help="folder for the PNGs (default results/)")
    args = parser.parse_args(argv)
    path = write(Path(args.studies_dir), Path(args.out), Path(args.figures))
    print(f"wrote {path} and its figures in {args.figures}/")
    return 0


if __name__ == "__main__":
    cli.run(main)
