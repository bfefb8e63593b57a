"""Report a fair comparison (``tune_cifar.compare``) from its Parquet tables.

    python analysis/comparison.py STORAGE/NAME [--out DIR]

Writes ``NAME.md`` (the report), ``NAME.csv`` (one row per level × view: the factor table in
numbers) and ``NAME_expected_best.png`` into ``--out`` (default ``STORAGE/NAME/analysis``), and
prints the report. What it says, per level of the factor:

* the selection: the tuned values with the best final validation accuracy among the K tuning
  trials, flagged when a value is the lowest or highest tried;
* both views side by side over the confirmation seeds: at the baseline's values of the tuned keys
  (what a one-factor grid measures) and at the level's own selected values; mean ± std, median,
  a bootstrap 95% interval, and the difference to the view's best level paired by seed, with its
  interval: a level whose interval reaches zero is *tied* with the best;
* the expected best validation accuracy after k = 1 … K tuning trials (Dodge et al. 2019): which
  level is easy to tune, not only which is best;
* how well the tuning trials' ranking after each epoch predicts their final ranking.

Every number comes from the stages' ``trials`` and ``epochs`` tables; the selection is recomputed
from the tuning stage's table with the tool's own rule (:func:`tune_cifar.compare.select`).
Accuracies are validation accuracies: the confirmation never touches the test set.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from tune_cifar import cli
from tune_cifar import config as cfg
from tune_cifar.analysis._study import Study, budget, fmt, load_study, markdown_table, save
from tune_cifar.analysis.rankings import budget_rankings
from tune_cifar.analysis.stats import Spread, expected_best, paired_difference, spread
from tune_cifar.compare import SELECTION, Comparison, same_level, same_value, select
from tune_cifar.errors import UsageError
from tune_cifar.outcome import Outcome
from tune_cifar.tables import ran_every_epoch, write_atomic_text

VIEWS = ("baseline", "tuned")
CSV_COLUMNS = [
    "factor", "level", "view", "train_images", "epochs", "tuned", "seeds", "mean", "std", "median",
    "ci_low", "ci_high", "diff_to_best", "diff_ci_low", "diff_ci_high", "verdict",
]  # fmt: skip


@dataclass
class LevelView:
    """One level in one view: its values of the tuned keys and its accuracy per confirmation seed."""

    level: Any
    view: str
    values: dict[str, Any]
    by_seed: dict[int, float]

    @property
    def spread(self) -> Spread:
        return spread([self.by_seed[seed] for seed in sorted(self.by_seed)])  # in seed order: same runs, same CI


def views(comparison: Comparison, selection: dict[str, Any], confirm: Study) -> list[LevelView]:
    """Every level's runs in each view, matched in the confirmation table by their tuned values."""
    rows = confirm.trials
    done = rows[ran_every_epoch(rows)]
    found = []
    for level in comparison.levels:
        chosen = selection[str(level)]
        wanted = {"tuned": chosen["values"]}
        if comparison.views == "both":
            wanted["baseline"] = comparison.baseline_view(chosen["active"])
        for view in VIEWS:
            values = wanted.get(view)
            if values is None:
                continue
            match = done[same_level(done[comparison.factor], level)]
            for key, value in values.items():
                match = match[[same_value(stored, value) for stored in match[key]]]
            match = match[match["seed"].isin(comparison.confirm_seeds)]
            by_seed = {int(seed): float(acc) for seed, acc in zip(match["seed"], match["final_val_acc"], strict=True)}
            found.append(LevelView(level, view, values, by_seed))
    return found


def verdicts(found: list[LevelView]) -> dict[tuple[Any, str], tuple[Spread | None, str]]:
    """Per level and view: the paired difference to the view's best level and the verdict."""
    out: dict[tuple[Any, str], tuple[Spread | None, str]] = {}
    for view in VIEWS:
        members = [lv for lv in found if lv.view == view and len(lv.by_seed) >= 2]
        if not members:
            continue
        best = max(members, key=lambda lv: lv.spread.mean)
        for lv in members:
            if lv is best:
                out[(lv.level, view)] = (None, "best")
                continue
            diff = paired_difference(lv.by_seed, best.by_seed)
            if diff is None:
                out[(lv.level, view)] = (None, "too few shared seeds")
            else:
                out[(lv.level, view)] = (diff, "tied with the best" if diff.ci_high >= 0 else "below the best")
    return out


def _effort(study: Study) -> str:
    return f"{len(study.trials)} runs, {study.trials['wall_s'].sum() / 60:.0f} min of trial time"


def _values_text(values: dict[str, Any]) -> str:
    return ", ".join(f"{key}={fmt(value)}" for key, value in values.items()) or "–"


def _pm(s: Spread) -> str:
    return f"{100 * s.mean:.2f} ± {100 * s.std:.2f}"


def _ci(low: float, high: float, signed: bool = False) -> str:
    form = "{:+.2f}" if signed else "{:.2f}"
    return f"[{form.format(100 * low)}, {form.format(100 * high)}]"


def selection_table(comparison: Comparison, selection: dict[str, Any]) -> str:
    rows = []
    for level in comparison.levels:
        chosen = selection[str(level)]
        flags = [f"{key} at the {end} value tried: widen the range" for key, end in chosen["at_bound"].items()]
        rows.append(
            {
                comparison.factor: level,
                "selected": _values_text(chosen["values"]) if chosen["values"] is not None else "none finished",
                "tuning val acc": "–" if chosen["val_acc"] is None else f"{100 * chosen['val_acc']:.2f}",
                "tuning trials finished": f"{chosen['finished']} of {len(comparison.proposals[str(level)])}",
                "flag": "; ".join(flags) or "–",
            }
        )
    return markdown_table(pd.DataFrame(rows))


def views_table(comparison: Comparison, found: list[LevelView], judged: dict) -> str:
    rows = []
    by_level = {(lv.level, lv.view): lv for lv in found}
    for level in comparison.levels:
        row: dict[str, Any] = {comparison.factor: level}
        for view in VIEWS:
            lv = by_level.get((level, view))
            if lv is None:
                continue
            s = lv.spread
            diff, verdict = judged.get((level, view), (None, "–"))
            row[f"{view}: {'/'.join(comparison.tuned)}"] = _values_text(lv.values)
            shown = f"{_pm(s)} ({100 * s.median:.2f}), {s.n} of {len(comparison.confirm_seeds)} seeds"
            row[f"{view}: mean ± std (median), seeds"] = (
                shown if s.n > 1 else f"{s.n} of {len(comparison.confirm_seeds)}"
            )
            row[f"{view}: 95% CI"] = _ci(s.ci_low, s.ci_high) if s.n > 1 else "–"
            row[f"{view}: vs best, paired"] = (
                verdict if diff is None else f"{100 * diff.mean:+.2f} {_ci(diff.ci_low, diff.ci_high, True)} {verdict}"
            )
        rows.append(row)
    return markdown_table(pd.DataFrame(rows).fillna("–"))


def level_settings(trials: pd.DataFrame, factor: str, tuned: dict[str, Any]) -> str:
    """`` Settings only some levels use: step: step_size=2, gamma=0.1.``: the fixed keys a level switches on."""
    children = [key for key, (parent, _) in cfg.CONDITIONS.items() if parent == factor and key not in tuned]
    described = []
    for level, group in trials.groupby(factor):
        used = [f"{key}={fmt(group[key].dropna().iloc[0])}" for key in children if group[key].notna().any()]
        if used:
            described.append(f"{level}: {', '.join(used)}")
    return f" Settings only some levels use: {'; '.join(described)}." if described else ""


def identical_levels(found: list[LevelView]) -> list[str]:
    """Levels whose runs in a view are identical seed for seed: at this budget the choice never changed
    training (a plateau schedule that never fired is no schedule), so their tie is not evidence."""
    lines = []
    for view in VIEWS:
        groups: dict[tuple[tuple[int, float], ...], list[str]] = {}
        for lv in found:
            if lv.view == view and lv.by_seed:
                groups.setdefault(tuple(sorted(lv.by_seed.items())), []).append(str(lv.level))
        same = [" = ".join(levels) for levels in groups.values() if len(levels) > 1]
        if same:
            lines.append(f"Identical runs seed for seed in the {view} view: {'; '.join(same)} (at this budget the "
                         "choice never changed training).")  # fmt: skip
    return [*lines, ""] if lines else []


def tuning_gain(comparison: Comparison, found: list[LevelView]) -> list[str]:
    """Tuned minus baseline per level, paired by seed: how much of a level's gap was the tuned keys."""
    if comparison.views != "both":
        return []
    by_level = {(lv.level, lv.view): lv for lv in found}
    parts = []
    for level in comparison.levels:
        tuned, base = by_level.get((level, "tuned")), by_level.get((level, "baseline"))
        diff = paired_difference(tuned.by_seed, base.by_seed) if tuned and base else None
        if diff is not None:
            parts.append(f"{level} {100 * diff.mean:+.2f} {_ci(diff.ci_low, diff.ci_high, True)}")
    if not parts:
        return []
    return [f"Tuned minus baseline view, paired by seed (points, 95% CI): {'; '.join(parts)}.", ""]


def expected_best_curves(comparison: Comparison, tuning: Study) -> dict[Any, list[float]]:
    """Per level, the expected best final validation accuracy of k = 1 … K of its tuning trials."""
    trials = tuning.trials
    curves = {}
    for level in comparison.levels:
        rows = trials[same_level(trials[comparison.factor], level)]
        # A trial that diverged or failed is a draw too: a user who tried it got nothing from it.
        scores = rows["final_val_acc"].where(ran_every_epoch(rows)).fillna(0.0).tolist()
        if scores:
            curves[level] = [expected_best(scores, k) for k in range(1, len(scores) + 1)]
    return curves


def plot_expected_best(comparison: Comparison, curves: dict[Any, list[float]], path: Path) -> Path:
    fig = Figure(figsize=(6, 4))
    ax = fig.subplots()
    for level, curve in curves.items():
        ax.plot(range(1, len(curve) + 1), [100 * v for v in curve], marker="o", label=str(level))
    keys = "/".join(comparison.tuned)
    ax.set_xlabel(f"tuning trials k (of the {comparison.trials} proposals of {keys})")
    ax.set_ylabel("expected best validation accuracy (%)")
    ax.set_title(f"{comparison.factor}: expected best after k tuning trials")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(title=comparison.factor)
    return save(fig, path)


def csv_rows(comparison: Comparison, confirm: Study, found: list[LevelView], judged: dict) -> pd.DataFrame:
    trials = confirm.trials
    images = int(trials["train_images"].dropna().max())
    epochs = int(confirm.plan.max_epochs) if confirm.plan else int(trials["epochs"].max())
    rows = []
    for lv in found:
        s = lv.spread
        diff, verdict = judged.get((lv.level, lv.view), (None, "–"))
        rows.append(
            {
                "factor": comparison.factor,
                "level": lv.level,
                "view": lv.view,
                "train_images": images,
                "epochs": epochs,
                "tuned": " ".join(
                    f"{key}={value:g}" if isinstance(value, float) else f"{key}={value}"
                    for key, value in lv.values.items()
                ),
                "seeds": s.n,
                "mean": 100 * s.mean,
                "std": 100 * s.std,
                "median": 100 * s.median,
                "ci_low": 100 * s.ci_low,
                "ci_high": 100 * s.ci_high,
                "diff_to_best": None if diff is None else 100 * diff.mean,
                "diff_ci_low": None if diff is None else 100 * diff.ci_low,
                "diff_ci_high": None if diff is None else 100 * diff.ci_high,
                "verdict": verdict,
            }
        )
    return pd.DataFrame(rows, columns=CSV_COLUMNS)


def selection_of(folder: Path, comparison: Comparison) -> tuple[dict[str, Any], Study | None]:
    """The selection recomputed from the tuning stage's table (this comparison's, or the one it was
    selected from); the recorded ``selection.json`` only where that table is not on this machine."""
    source = Path(comparison.selected_from) if comparison.selected_from else folder
    if (source / "tuning" / "trials").is_dir():
        tuning = load_study(source / "tuning")
        return select(Comparison.load(source), tuning.trials), tuning
    recorded = folder / SELECTION
    if not recorded.is_file():
        raise UsageError(f"{folder}: no tuning stage yet (run the tune_cifar.compare command to its end)")
    return json.loads(recorded.read_text()), None


def report(folder: Path, out: Path) -> tuple[str, pd.DataFrame]:
    """The report's Markdown and its CSV rows; the figure is written into ``out``."""
    comparison = Comparison.load(folder)
    selection, tuning = selection_of(folder, comparison)
    if not (folder / "confirm" / "trials").is_dir():
        raise UsageError(f"{folder}: no confirmation stage yet (run the tune_cifar.compare command to its end)")
    confirm = load_study(folder / "confirm")
    ended = len(confirm.trials) - int((confirm.trials["status"] == Outcome.RUNNING.status).sum())
    planned = confirm.plan.num_samples if confirm.plan else ended
    if ended < planned:
        raise UsageError(f"{folder}: the confirmation stage has ended {ended} of its {planned} trials "
                         "(run the tune_cifar.compare command again to finish it)")  # fmt: skip
    found = views(comparison, selection, confirm)
    judged = verdicts(found)
    name = folder.name
    tuned_keys = ", ".join(
        f"{key} ({spec['kind']} {spec['values'][0]:g} … {spec['values'][-1]:g})"
        if spec["kind"] != "choice" else f"{key} ({'/'.join(map(str, spec['values']))})"
        for key, spec in comparison.tuned.items()
    )  # fmt: skip
    seeds = ", ".join(map(str, comparison.confirm_seeds))
    lines = [f"### {comparison.factor}", ""]
    if tuning is not None and not comparison.selected_from:
        lines += [
            f"`{name}`: tuning, {budget(tuning)}: each level × the same {comparison.trials} values of {tuned_keys}, "
            f"seed {comparison.tuning_seed}, selected by final validation accuracy; {_effort(tuning)}.",
            "",
            selection_table(comparison, selection),
            "",
        ]
    elif comparison.selected_from:
        lines += [f"`{name}`: the selection of `{Path(comparison.selected_from).name}`, confirmed at this budget.", ""]
    lines += [
        f"Confirmation, {budget(confirm)}: seeds {seeds} (none of them the tuning seed; {_effort(confirm)}), "
        "validation accuracy "
        "after the last epoch, in percent. The baseline view holds "
        f"{_values_text(comparison.baseline)} for every level (as a one-factor grid does); the tuned view uses "
        'each level\'s selection. Intervals: bootstrap 95% of the mean; "vs best": the difference to the '
        "view's best level, paired by seed, with Student's t 95% interval (over 5 seeds a percentile bootstrap "
        "of a difference covers only about 85-90% and would call too few ties); an interval that reaches zero is a "
        "tie. A seed that diverged or failed is left out of its level's figures (the seeds column counts them)."
        + level_settings(confirm.trials, comparison.factor, comparison.tuned),
        "",
        views_table(comparison, found, judged),
        "",
        *identical_levels(found),
        *tuning_gain(comparison, found),
    ]
    if tuning is not None and not comparison.selected_from:
        curves = expected_best_curves(comparison, tuning)
        figure = plot_expected_best(comparison, curves, out / f"{name}_expected_best.png")
        at = sorted({1, max(1, comparison.trials // 2), comparison.trials})
        cells = "; ".join(
            f"{level}: " + ", ".join(f"k={k} {100 * curve[k - 1]:.2f}" for k in at if k <= len(curve))
            for level, curve in curves.items()
        )
        _, ranking_lines = budget_rankings(tuning)
        lines += [
            "Expected best validation accuracy after k of the tuning trials (Dodge et al. 2019; a trial that "
            f"diverged counts as 0): {cells}.",
            "",
            f"![expected best after k tuning trials]({figure.name})",
            "",
            "Does the ranking after a few epochs predict the ranking after the last? (the tuning trials)",
            "",
            *ranking_lines,
            "",
        ]
    return "\n".join(lines), csv_rows(comparison, confirm, found, judged)


def main(argv: Sequence[str] | None = None) -> int:
    parser = cli.ArgumentParser(prog="python analysis/comparison.py", description=__doc__.splitlines()[0])
    parser.add_argument("folder", help="a comparison folder (STORAGE/NAME of tune_cifar.compare)")
    parser.add_argument("--out", help="where to write NAME.md, NAME.csv and the figure (default FOLDER/analysis)")
    args = parser.parse_args(argv)
    folder = Path(args.folder)
    if not (folder / "comparison.json").is_file():
        raise UsageError(f"{folder}: not a comparison folder (no comparison.json; give tune_cifar.compare's folder)")
    out = Path(args.out) if args.out else folder / "analysis"
    out.mkdir(parents=True, exist_ok=True)
    text, rows = report(folder, out)
    write_atomic_text(out / f"{folder.name}.md", text + "\n")
    write_atomic_text(out / f"{folder.name}.csv", rows.to_csv(index=False, float_format="%.4g"))
    print(text)
    return 0


if __name__ == "__main__":
    cli.run(main, sys.argv[1:])
