"""Load and check a study folder, and the small helpers every analysis script shares.

All analysis starts from the same questions (is this a study folder, which trials finished,
which one is best) and writes into the same place, ``STUDY_DIR/analysis/``. Answering them
once here keeps the scripts and the notebook agreeing on what "finished" and "best" mean, and
gives bad input the same one-line :class:`UsageError` everywhere.

Accuracies in the tables are fractions (0.9153); they are shown as percentages.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from tune_cifar import config as cfg
from tune_cifar.errors import UsageError
from tune_cifar.outcome import Outcome
from tune_cifar.plan import StudyPlan
from tune_cifar.study_folder import StudyFolder
from tune_cifar.tables import finished_trials, read_table

# The second source report's best configuration reached this test accuracy (91.53%).
REFERENCE_TEST_ACC = 0.9153
HYPERPARAMETERS: tuple[str, ...] = cfg.KEYS
MAIN_FACTORS = ("optimizer", "scheduler", "loss", "activation")
# Choices rather than quantities (filters is stored as the string "64,128,256").
CATEGORICAL = tuple(key for key in cfg.KEYS if key == "filters" or cfg.field_type(key) in ("str", "bool"))


@dataclass
class Study:
    """A study folder's tables, read lazily and cached (a notebook asks for them many times)."""

    folder: Path
    trials: pd.DataFrame
    plan: StudyPlan | None = None  # what the study stored (None for a single run's folder)
    _tables: dict[str, pd.DataFrame] = field(default_factory=dict, repr=False)

    @property
    def name(self) -> str:
        names = self.trials["study"].dropna().unique() if "study" in self.trials else []
        return str(names[0]) if len(names) == 1 else self.folder.name

    @property
    def finished(self) -> pd.DataFrame:
        """Trials with a result, best first (ties: fewer epochs, then id, so the order is stable)."""
        return finished_trials(self.trials)

    def require_finished(self) -> pd.DataFrame:
        done = self.finished
        if done.empty:
            counts = ", ".join(f"{n} {status}" for status, n in self.trials["status"].value_counts().items())
            raise UsageError(f"{self.folder}: no finished trials yet ({counts or 'no trials'})")
        return done

    def table(self, name: str) -> pd.DataFrame:
        if name == "trials":
            return self.trials
        if name not in self._tables:
            self._tables[name] = read_table(self.folder, name)
        return self._tables[name]

    def has_table(self, name: str) -> bool:
        return name in self._tables or StudyFolder(self.folder).has_table(name)

    def trial(self, trial_id: str) -> pd.Series:
        rows = self.trials[self.trials["trial_id"] == trial_id]
        if rows.empty:
            known = ", ".join(self.trials["trial_id"].head(5))
            raise UsageError(f"{self.folder}: no trial {trial_id!r} (e.g. {known})")
        return rows.iloc[0]

    def best_trial_id(self) -> str:
        return str(self.require_finished().iloc[0]["trial_id"])

    def varying(self, trials: pd.DataFrame | None = None) -> list[str]:
        """Hyperparameter columns that take at least two values among ``trials`` (finished by default)."""
        trials = self.finished if trials is None else trials
        return [key for key in HYPERPARAMETERS if trials[key].dropna().astype(str).nunique() >= 2]

    @property
    def rungs(self) -> tuple[int, ...]:
        """ASHA's rungs, as the study's plan holds them (none without ASHA or a plan)."""
        return self.plan.rungs if self.plan else ()

    def budgets(self) -> list[int]:
        """The epoch counts at which finished trials can be compared, that some finished trial reached.

        For a study, its plan's budgets: ASHA's rungs and the full budget (without early stopping,
        the one budget every trial ran); every finished trial reached the first. For a folder of
        single runs, where each run ended.
        """
        reached = self.finished["epochs_run"].dropna().astype(int)
        if self.plan is None:
            return sorted(reached.unique().tolist())
        return [epochs for epochs in self.plan.budgets if (reached >= epochs).any()]

    def at_budget(self, epochs: int) -> pd.DataFrame:
        """Finished trials that ran at least ``epochs`` epochs, with ``val_acc`` after exactly that many.

        The one fair way to compare trials of an ASHA study: every number rests on the same
        training budget (all trials at the first rung, the survivors at the next, ...). Best
        first; the column ``stopped`` marks the trials ASHA stopped later on.
        """
        reached = self.finished[self.finished["epochs_run"] >= epochs]
        table = self.table("epochs")
        values = table[table["epoch"] == epochs].set_index("trial_id")["val_acc"]
        stopped = reached["status"] == Outcome.STOPPED.status
        at = reached.assign(val_acc=reached["trial_id"].map(values), stopped=stopped)
        at = at[at["val_acc"].notna()]
        return at.sort_values(["val_acc", "trial_id"], ascending=[False, True])

    def out_dir(self) -> Path:
        out = StudyFolder(self.folder).analysis
        out.mkdir(parents=True, exist_ok=True)
        return out


def factors(trials: pd.DataFrame) -> list[str]:
    """Columns worth a per-level table: categorical/bool ones, and numeric grids, with two or more levels.

    The second report's factors (optimizer, scheduler, loss, activation) come first. A numeric
    column counts as a grid when it has at most 8 values and every value was tried at least
    twice (a batch-size choice, the BN study's learning rates), not when it was sampled
    continuously (a log-uniform lr), where a per-value table would have one trial a row. The
    seed is never a factor: repeats over seeds are what the tables average.
    """
    found = []
    for key in [*MAIN_FACTORS, *(k for k in HYPERPARAMETERS if k not in (*MAIN_FACTORS, "seed"))]:
        counts = trials[key].dropna().astype(str).value_counts()
        if len(counts) >= 2 and (key in CATEGORICAL or (len(counts) <= 8 and counts.min() >= 2)):
            found.append(key)
    return found


def load_study(folder: str | Path) -> Study:
    """Open a study (or single-run) folder; a one-line UsageError when it is not one."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UsageError(f"{folder}: not a study folder (no such directory)")
    if not StudyFolder(folder).table("trials").is_dir():
        raise UsageError(f"{folder}: not a study folder (no trials/ table; give the folder tune_cifar.search wrote)")
    return Study(folder, read_table(folder, "trials"), StudyPlan.load_if_any(folder))


def budget(study: Study) -> str:
    """``9,000 images x 5 epochs, validated on 5,000, bf16``: what every accuracy of a folder rests on."""
    trials = study.trials
    parts = [
        f"{'/'.join(f'{int(v):,}' for v in sorted(trials['train_images'].dropna().unique()))} images",
        f"× {'/'.join(fmt(v) for v in sorted(trials['epochs'].dropna().unique()))} epochs",
    ]
    val = sorted(trials["val_images"].dropna().unique())
    if val and val != [0]:
        parts.append(f"validated on {'/'.join(f'{int(v):,}' for v in val)}")
    parts.append(", ".join(sorted(trials["precision"].dropna().unique())))
    return " ".join(parts[:2]) + ", " + ", ".join(parts[2:])


def native(value: Any) -> Any:
    """numpy scalars to Python ones (config validation insists on real bools and ints)."""
    return value.item() if isinstance(value, np.generic) else value


def is_missing(value: Any) -> bool:
    return value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value))


def pct(value: Any, digits: int = 2) -> str:
    """A fraction as a percentage, ``–`` for a missing value."""
    return "–" if is_missing(value) else f"{100 * float(value):.{digits}f}%"


def fmt(value: Any) -> str:
    """A table cell: compact numbers (3 significant digits), ``–`` for null (inactive)."""
    value = native(value)
    if is_missing(value):
        return "–"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return f"{value:,}" if abs(value) >= 10_000 else str(value)
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def describe(row: pd.Series, keys: list[str]) -> str:
    """``optimizer=adam, lr=0.002``: the keys that set this trial apart, inactive ones left out."""
    return ", ".join(f"{key}={fmt(row[key])}" for key in keys if not is_missing(row[key]))


def markdown_table(frame: pd.DataFrame) -> str:
    """A GitHub Markdown table of already formatted cells (pandas' to_markdown needs tabulate)."""
    header = "| " + " | ".join(str(c) for c in frame.columns) + " |"
    rule = "| " + " | ".join("---" for _ in frame.columns) + " |"
    body = ["| " + " | ".join(str(v).replace("|", "\\|") for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *body])


def log_spans_decades(values: pd.Series | pd.DataFrame | np.ndarray) -> bool:
    """Whether positive data spans at least a decade, so a log axis shows it better than a linear one."""
    array = np.asarray(values, dtype=float).ravel()
    array = array[np.isfinite(array) & (array > 0)]
    return array.size > 0 and array.max() / array.min() >= 10


def save(fig: Figure, path: Path) -> Path:
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path
