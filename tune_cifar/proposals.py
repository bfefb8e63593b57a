"""Paired tuning proposals: the same K values of the tuned keys for every level of a factor.

Comparing levels that were each tuned is fair only if each got the same tuning effort; it is
also sharper when they got the *same* proposals, because then a level's tuned score differs
from another's by the level alone, not by the luck of its draws (common random numbers).
So the proposals are a fixed design, not a sampler's adaptive choice:

* one tuned key: a grid of K values from the low bound to the high bound (evenly spaced on a
  log scale for ``loguniform``). The bounds are proposals, so a level whose best value is a
  bound says plainly that its optimum may lie outside the range ("widen the range");
* several keys: the first K points of a scrambled Halton sequence seeded by the study's seed.
  A grid would give each key only K^(1/d) distinct values; a low-discrepancy sequence gives
  every key K distinct values and covers the box evenly (Bergstra & Bengio 2012 on why grids
  waste trials on unimportant keys).

Values are rounded to three significant figures, so tables show ``lr=0.0464`` and every level
sees bit-identical values.
"""

from __future__ import annotations

import math
from typing import Any

from tune_cifar import config as cfg
from tune_cifar.spaces import Distribution


def unit_points(dimensions: int, trials: int, seed: int) -> list[list[float]]:
    """K points in the unit cube: an even grid with both ends for one key, scrambled Halton for more."""
    if dimensions == 1:
        return [[i / (trials - 1) if trials > 1 else 0.5] for i in range(trials)]
    from scipy.stats import qmc

    return qmc.Halton(d=dimensions, scramble=True, seed=seed).random(trials).tolist()


def value_at(dist: Distribution, unit: float) -> Any:
    """The value of ``dist`` at a position in [0, 1] (log scale for the log distributions)."""
    if dist.kind == "choice":
        return dist.values[min(int(unit * len(dist.values)), len(dist.values) - 1)]
    low, high = dist.values
    if dist.kind in ("loguniform", "logint"):
        value = math.exp(math.log(low) + unit * (math.log(high) - math.log(low)))
    else:
        value = low + unit * (high - low)
    rounded = round(value) if dist.kind in ("int", "logint") else float(f"{value:.3g}")
    return min(max(rounded, low), high)  # rounding never leaves the range


def proposals(tuned: dict[str, Distribution], trials: int, seed: int) -> list[dict[str, Any]]:
    """The K proposals every level is tuned over, in order."""
    keys = list(tuned)
    return [
        {key: value_at(tuned[key], unit) for key, unit in zip(keys, point, strict=True)}
        for point in unit_points(len(keys), trials, seed)
    ]


def for_level(proposed: list[dict[str, Any]], values: dict[str, Any]) -> list[dict[str, Any]]:
    """The proposals as one level runs them: keys inactive under ``values`` (the fixed keys and the
    level) dropped, so momentum is not tuned for Adam; proposals that then coincide run once."""
    seen: list[dict[str, Any]] = []
    for proposal in proposed:
        active = cfg.active_keys({**values, **proposal})
        kept = {key: value for key, value in proposal.items() if key in active}
        if kept not in seen:
            seen.append(kept)
    return seen
