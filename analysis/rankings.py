"""Does a short run rank configurations as the full run does? ``python analysis/rankings.py STUDY``.

Early stopping (ASHA's grace period, or a cheap first screening) is only as good as the agreement
between early and final rankings. For a study whose trials all ran its full budget this compares
the trials' ranking by validation accuracy after each epoch with their ranking after the last
(Spearman's ρ, Kendall's τ) and names the earliest epoch from which ρ stays ≥ 0.7: the grace period
the space supports. For an ASHA study only the trials that reached the full budget have a final
score, and they are the ones ASHA promoted: a selected sample, whose early scores are bunched at
the top, so their ρ understates the agreement over all trials and says nothing about the stopped.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

import pandas as pd

from tune_cifar import cli
from tune_cifar.analysis._study import Study, load_study, markdown_table
from tune_cifar.analysis.stats import earliest_agreement, rank_agreement
from tune_cifar.errors import UsageError

THRESHOLD = 0.7


def budget_rankings(study: Study) -> tuple[pd.DataFrame, list[str]]:
    """The agreement table (epoch or rung, trials, ρ, τ) and the report's lines about it."""
    if study.plan is None:
        raise UsageError(f"{study.folder}: a single run's folder; rankings need a study")
    epochs = study.table("epochs")
    full = study.plan.max_epochs
    scores = epochs.pivot_table(index="trial_id", columns="epoch", values="val_acc", aggfunc="last")
    if full not in scores.columns:
        raise UsageError(f"{study.folder}: no trial has run all {full} epochs yet")
    final = scores[full].dropna()
    reached = scores.loc[final.index]
    rungs = study.plan.rungs
    compared = [e for e in (rungs or range(1, full)) if e in reached.columns]
    agreement = rank_agreement(reached[compared], final)
    # The better half alone: a wide range (diverging learning rates beside good ones) makes any ranking
    # agree; whether the early epochs also order the contenders is the harder question.
    top = final.nlargest(len(final) // 2).index
    contenders = rank_agreement(reached.loc[top, compared], final[top])
    shown = pd.DataFrame(
        {
            "rung" if rungs else "epoch": agreement["epoch"],
            "trials": agreement["trials"],
            "Spearman ρ with the final ranking": agreement["spearman"].map(lambda v: f"{v:.2f}"),
            "Kendall τ": agreement["kendall"].map(lambda v: f"{v:.2f}"),
            f"ρ among the better half ({len(top)})": contenders["spearman"].map(lambda v: f"{v:.2f}"),
        }
    )
    lines = [markdown_table(shown), ""]
    if rungs:
        lines.append(
            f"Over the {len(final)} of {len(scores)} trials ASHA let reach epoch {full}: they are the ones it "
            "promoted, a selected sample, so these coefficients understate the agreement over all trials "
            "and say nothing about the trials it stopped."
        )
    else:
        earliest = earliest_agreement(agreement, THRESHOLD)
        if earliest is not None:
            supported = f"epoch {earliest} (ρ ≥ {THRESHOLD} from there on)"
        elif agreement.empty or agreement["spearman"].isna().all():
            supported = "not measurable here (one epoch, or fewer than 3 trials)"
        else:
            supported = f"none shorter than the full {full} epochs (ρ < {THRESHOLD} at some epoch before the last)"
        lines.append(
            f"Over all {len(final)} trials, each run to epoch {full}. "
            f"The grace period this space supports: {supported}."
        )
    return agreement, lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = cli.ArgumentParser(prog="python analysis/rankings.py", description=__doc__.splitlines()[0])
    parser.add_argument("study", help="a study folder (tune_cifar.search's)")
    args = parser.parse_args(argv)
    _, lines = budget_rankings(load_study(args.study))
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    cli.run(main, sys.argv[1:])
