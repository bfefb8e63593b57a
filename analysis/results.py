"""RESULTS.md from the studies of ``analysis/make_results.sh``: the source reports' questions, answered.

``python analysis/results.py STUDIES_DIR [--out RESULTS.md] [--figures results]`` reads only the
Parquet tables of the study folders ``make_results.sh`` writes (``grid_optimizers``,
``grid_schedulers``, ``grid_losses``, ``grid_activations``, ``full``, ``retrain_tuned``,
``retrain_hand``, ``bn_adam``, ``bn_sgd``) and writes:

1. the second report's four factor tables: per level, mean ± sample standard deviation of the
   validation accuracy over the seeds at the one budget every run had, beside the report's own
   single-run test figure, with one line per table on whether the ordering agrees and which
   differences exceed the seed spread;
2. tuned (the TPE + ASHA study's best configuration) against hand-tuned (``seed_best``), both
   retrained on train + validation over seeds and tested once per seed;
3. the BN landscape in the course's setting (Adam) and Santurkar et al.'s (plain SGD): epochs
   to 50% validation accuracy, the loss band, gradient predictiveness and β-smoothness, and
   for each of the paper's claims whether this budget reproduces it.

Every accuracy states the data, images × epochs, seeds and precision it rests on. A folder
that is missing is reported as not run, not silently skipped.
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
from tune_cifar import config as cfg
from tune_cifar.analysis import bn_landscape, search_views
from tune_cifar.analysis._study import Study, budget, fmt, load_study, markdown_table, native, pct, save
from tune_cifar.analysis.best_config import factor_table, trials_cell
from tune_cifar.errors import UsageError
from tune_cifar.outcome import count_words
from tune_cifar.tables import outcome_counts, read_table

# The second report's single runs (50-100 epochs, full CIFAR-10, test accuracy %), per factor.
REPORTED = {
    "optimizer": {"adam": 88.42, "sgd": 78.58, "sign_sgd": 82.64},
    "scheduler": {"step": 88.53, "plateau": 88.44, "cosine": 88.98},
    "loss": {"cross_entropy": 88.42, "label_smoothing": 89.61, "focal": 87.61, "mse": 90.03},
    "activation": {"leaky_relu": 89.45, "relu": 89.31, "elu": 87.45},
}
GRIDS = {"optimizer": "grid_optimizers", "scheduler": "grid_schedulers", "loss": "grid_losses",
         "activation": "grid_activations"}  # fmt: skip
GOAL_POINTS = 1.5  # the tuned configuration should beat the hand-tuned one by this many test points
DATA_NOTE = (
    "CIFAR-10 from the offline copy in `../shared/data/cifar10` (all 60,000 images with the official labels; "
    "53,813 of them JPEG-decoded, about 30 dB PSNR, so accuracies run a little below the official files')"
)


def machine() -> str:
    """This machine in one line: CPU model, cores, Python."""
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores, {platform.system()}, Python {platform.python_version()}"


def wall(study: Study) -> float:
    return float(study.trials["wall_s"].sum())


def significant_pairs(table: pd.DataFrame, factor: str) -> list[str]:
    """Pairs of levels whose means differ by more than twice the standard error of the difference."""
    found = []
    for a, b in itertools.combinations(table.itertuples(), 2):
        error = math.sqrt(a.std_val_acc**2 / a.trials + b.std_val_acc**2 / b.trials)
        if abs(a.mean_val_acc - b.mean_val_acc) > 2 * error:
            high, low = (a, b) if a.mean_val_acc > b.mean_val_acc else (b, a)
            found.append(f"{getattr(high, factor)} > {getattr(low, factor)}")
    return found


def ordering_line(table: pd.DataFrame, factor: str) -> str:
    reported = REPORTED[factor]
    ours = [level for level in table[factor] if level in reported]
    theirs = sorted(ours, key=lambda level: -reported[level])
    pairs = list(itertools.combinations(ours, 2))  # ours is sorted by our mean, best first
    agree = sum(reported[a] > reported[b] for a, b in pairs)
    verdict = "the same order" if ours == theirs else f"{agree} of {len(pairs)} pairs in the same order"
    spread = significant_pairs(table, factor)
    separated = (
        f"differences beyond 2 standard errors of the seed spread: {', '.join(spread)}"
        if spread
        else "no difference exceeds 2 standard errors of the seed spread"
    )
    return (
        f"Ordering here: {' > '.join(ours)}; the report's: {' > '.join(theirs)} ({verdict}). {separated.capitalize()}."
    )


def level_settings(study: Study, factor: str) -> str:
    """`` Settings only some levels use: step: step_size=2, gamma=0.1.``: the keys a level switches on."""
    children = [key for key, (parent, _) in cfg.CONDITIONS.items() if parent == factor]
    described = []
    for level, group in study.trials.groupby(factor):
        used = [f"{key}={fmt(group[key].dropna().iloc[0])}" for key in children if group[key].notna().any()]
        if used:
            described.append(f"{level}: {', '.join(used)}")
    return f" Settings only some levels use: {'; '.join(described)}." if described else ""


def identical_levels(study: Study, factor: str, epochs: int) -> str:
    """Levels whose runs are identical seed for seed: the choice never changed training at this budget."""
    at = study.at_budget(epochs)
    runs = {level: tuple(group.sort_values("seed")["val_acc"]) for level, group in at.groupby(at[factor].map(native))}
    same = [sorted(map(str, levels)) for levels in _groups_by_value(runs) if len(levels) > 1]
    if not same:
        return ""
    listed = "; ".join(" = ".join(levels) for levels in same)
    return f" Identical runs, seed for seed: {listed} (at this budget the choice never changed training)."


def _groups_by_value(runs: dict[Any, tuple[float, ...]]) -> list[list[Any]]:
    groups: dict[tuple[float, ...], list[Any]] = {}
    for level, values in runs.items():
        groups.setdefault(values, []).append(level)
    return list(groups.values())


def factor_section(studies: Path) -> list[str]:
    parts = ["## 1. The second report's factor tables", ""]
    for factor, name in GRIDS.items():
        folder = studies / name
        if not (folder / "trials").is_dir():
            parts += [f"### {factor}", "", f"Not run (no `{folder}`).", ""]
            continue
        study = load_study(folder)
        table = factor_table(study, factor)
        table = table[table["epochs"] == table["epochs"].max()].reset_index(drop=True)
        seeds = ", ".join(fmt(s) for s in sorted(study.trials["seed"].unique()))
        shown = pd.DataFrame(
            {
                factor: table[factor],
                "seeds": [trials_cell(n, lost) for n, lost in zip(table["trials"], table["diverged"], strict=True)],
                "val acc, mean ± std": [
                    f"{100 * m:.2f} ± {100 * s:.2f}"
                    for m, s in zip(table["mean_val_acc"], table["std_val_acc"], strict=True)
                ],
                "best seed": table["best_val_acc"].map(lambda v: f"{100 * v:.2f}"),
                "report (test, single run, 50-100 epochs)": [
                    f"{REPORTED[factor][level]:.2f}" if level in REPORTED[factor] else "–" for level in table[factor]
                ],
            }
        )
        parts += [
            f"### {factor}",
            "",
            f"`{name}`: {budget(study)}; seeds {seeds}; {len(study.trials)} runs, {wall(study) / 60:.0f} min of "
            "trial time. Validation accuracy after the last epoch." + level_settings(study, factor),
            "",
            markdown_table(shown),
            "",
            ordering_line(table, factor) + identical_levels(study, factor, int(table["epochs"].max())),
            "",
        ]
    return parts


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
    parts = ["## 2. Tuned against hand-tuned, at an equal budget", ""]
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
        parts += [f"![ASHA's decisions in the tuned study]({link}/tuned_asha.png)", ""]
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


def write(studies: Path, out: Path, figures: Path) -> Path:
    """Write ``out`` and its PNGs (into ``figures``, linked relative to ``out``)."""
    figures.mkdir(parents=True, exist_ok=True)
    link = os.path.relpath(figures, out.parent)
    folders = [p for p in sorted(studies.iterdir()) if (p / "trials").is_dir()] if studies.is_dir() else []
    if not folders:
        raise UsageError(f"{studies}: no study folders (run analysis/make_results.sh DATA_DIR {studies} first)")
    total = sum(float(read_table(p, "trials")["wall_s"].sum()) for p in folders)
    parts = [
        "# Results on CIFAR-10",
        "",
        f"Regenerate: `analysis/make_results.sh DATA_DIR {studies}` (every run; `make results DATA_DIR=...`), then "
        f"`python analysis/results.py {studies}` (this file, from the Parquet tables alone).",
        "",
        f"- machine: {machine()}",
        f"- data: {DATA_NOTE}",
        "- budget: every number below states its images × epochs, validation images, seeds and precision; "
        "numbers are compared only within one budget. The report's figures are single 50-100-epoch runs on the "
        "full training set, shown for the ordering only.",
        f"- trial time, summed over runs: {total / 60:.0f} min (two trials at a time on 2 cores)",
        "- test accuracy is touched only by the retrains of section 2, once per seed.",
        "",
        "What this budget can and cannot say: a few epochs on a fifth of the images rank choices by how fast they "
        "learn, not by where they end. The report's numbers come from 10-20 times more training; choices whose "
        "benefit comes late (MSE on logits, learning-rate decay, strong regularisation) can rank lower here and "
        "higher there. Agreement in ordering is evidence; disagreement is a question for a longer run, not a "
        "refutation.",
        "",
        *factor_section(studies),
        *tuned_section(studies, figures, link),
        *bn_section(studies, figures, link),
    ]
    out.write_text("\n".join(parts))
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
