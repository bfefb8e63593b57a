"""What the study's driver-side callbacks read off a Ray ``Trial``: its hyperparameter row, the
last line of its error, how many epochs it ran, and how it ended (:func:`outcome`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tune_cifar import config as cfg
from tune_cifar.errors import UsageError
from tune_cifar.outcome import Outcome, decide


def hyperparameter_row(trial: Any) -> dict[str, Any]:
    """The trial's hyperparameter columns: every vocabulary key, inactive ones null.

    A configuration the vocabulary refuses (a sampled value the trial will fail on) is recorded
    as sampled, so that the trial shows up as an ERROR row instead of ending the whole study.
    """
    try:
        return cfg.to_row(cfg.from_values(trial.config, source=f"trial {trial.trial_id}"))
    except UsageError:
        raw = {key: trial.config.get(key) for key in cfg.KEYS}
        if isinstance(raw["filters"], (list, tuple)):
            raw["filters"] = cfg.format_filters(raw["filters"])
        return raw


def error_line(trial: Any) -> str:
    """The last line of a trial's error (the exception), for the stop_reason column and the console."""
    text = ""
    path = getattr(trial, "error_file", None)
    if path and Path(path).is_file():
        text = Path(path).read_text(errors="replace")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return (lines[-1] if lines else "unknown error")[:300]


def epochs_run(trial: Any) -> int:
    """Epochs the trial has reported: its last result's ``epoch`` (a retry from an older
    checkpoint reports lower epochs again, and this follows it)."""
    return int((trial.last_result or {}).get("epoch") or 0)


def target_epochs(trial: Any) -> int:
    """The epochs the trial's configuration asks for (every study trial's config holds ``epochs``)."""
    return int(trial.config["epochs"])


def outcome(trial: Any, *, error: bool = False, ended: bool = True, interrupted: bool = False) -> Outcome:
    """:func:`tune_cifar.outcome.decide` on a Ray trial."""
    last_loss = (trial.last_result or {}).get("train_loss")
    return decide(epochs_run(trial), target_epochs(trial), error=error, ended=ended, interrupted=interrupted,
                  last_train_loss=last_loss)  # fmt: skip
