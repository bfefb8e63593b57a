"""The statistics a fair comparison reports: seed spreads with bootstrap intervals, differences paired
by seed, the expected best of k tuning trials, and how well an early ranking predicts the final one.

A level's interval is a percentile bootstrap of its mean with a fixed resampling seed (the same
table twice gives the same interval); it makes no normality assumption but, over 5 seeds, is
narrower than nominal. Differences between levels are paired by seed (the same seed draws the
same initialisation, batches and augmentations for every level, so pairing removes that shared
noise) and get Student's t interval, the conservative choice at a handful of pairs: a difference
whose interval reaches zero is called a tie, and a too-narrow interval would call too few.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

RESAMPLES = 10_000
CONFIDENCE = 0.95


@dataclass(frozen=True)
class Spread:
    """Mean ± standard deviation, median and a bootstrap interval of the mean, over n values."""

    n: int
    mean: float
    std: float
    median: float
    ci_low: float
    ci_high: float


def bootstrap_ci(values: Sequence[float], resamples: int = RESAMPLES, seed: int = 0) -> tuple[float, float]:
    """The percentile bootstrap 95% interval of the mean (resampling seed fixed: reproducible)."""
    data = np.asarray(values, dtype=float)
    if len(data) < 2:
        return (float("nan"), float("nan"))
    rng = np.random.default_rng(seed)
    means = data[rng.integers(0, len(data), size=(resamples, len(data)))].mean(axis=1)
    tail = (1 - CONFIDENCE) / 2
    return float(np.quantile(means, tail)), float(np.quantile(means, 1 - tail))


def spread(values: Sequence[float]) -> Spread:
    data = np.asarray(values, dtype=float)
    low, high = bootstrap_ci(data)
    std = float(data.std(ddof=1)) if len(data) > 1 else float("nan")
    return Spread(len(data), float(data.mean()), std, float(np.median(data)), low, high)


def paired_difference(values: Mapping[int, float], reference: Mapping[int, float]) -> Spread | None:
    """``values - reference`` over the seeds both have, with Student's t 95% interval of its mean;
    None when they share fewer than two seeds."""
    from scipy.stats import t

    seeds = sorted(values.keys() & reference.keys())
    if len(seeds) < 2:
        return None
    diffs = np.array([values[seed] - reference[seed] for seed in seeds])
    mean, std = float(diffs.mean()), float(diffs.std(ddof=1))
    half = float(t.ppf(0.5 + CONFIDENCE / 2, len(diffs) - 1)) * std / np.sqrt(len(diffs))
    return Spread(len(diffs), mean, std, float(np.median(diffs)), mean - half, mean + half)


def expected_best(values: Sequence[float], k: int) -> float:
    """The expected maximum of k draws with replacement from the observed values: Dodge et al. (2019,
    "Show Your Work"), exactly: sum over the sorted values v_(i) of v_(i) [(i/n)^k - ((i-1)/n)^k]."""
    data = np.sort(np.asarray(values, dtype=float))
    n = len(data)
    ranks = np.arange(1, n + 1)
    weights = (ranks / n) ** k - ((ranks - 1) / n) ** k
    return float((weights * data).sum())


def rank_agreement(scores: pd.DataFrame, final: pd.Series) -> pd.DataFrame:
    """Spearman's ρ and Kendall's τ between each column of ``scores`` (one row per trial, one column per
    epoch or rung) and ``final`` (indexed like the rows), over the trials that have both."""
    from scipy.stats import kendalltau, spearmanr

    rows = []
    for column in scores.columns:
        both = pd.concat([scores[column], final], axis=1, keys=["early", "final"]).dropna()
        rho = spearmanr(both["early"], both["final"]).statistic if len(both) >= 3 else float("nan")
        tau = kendalltau(both["early"], both["final"]).statistic if len(both) >= 3 else float("nan")
        rows.append({"epoch": column, "trials": len(both), "spearman": float(rho), "kendall": float(tau)})
    return pd.DataFrame(rows, columns=["epoch", "trials", "spearman", "kendall"])


def earliest_agreement(agreement: pd.DataFrame, threshold: float = 0.7) -> int | None:
    """The first epoch from which on ρ stays at or above ``threshold`` (None: not before the last)."""
    earliest = None
    for epoch, rho in zip(agreement["epoch"], agreement["spearman"], strict=True):
        below = not rho >= threshold  # a NaN ρ (too few trials) counts as below
        earliest = None if below else (epoch if earliest is None else earliest)
    return None if earliest is None else int(earliest)
