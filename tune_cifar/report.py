"""The message a trial sends after each epoch (:class:`EpochReport`), and the epoch row's columns.

The trainer fills the rows, the trainable adds the trial's summary and hands it to
``tune.report``; the driver's searcher and callbacks read it back. It lives apart from the
Parquet tables so that the training path (engine, trainable, a single run) imports neither
pandas nor pyarrow: :mod:`tune_cifar.tables` builds the ``epochs`` schema from
:data:`EPOCH_COLUMNS`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# A tensor's ``health`` is flagged when its epoch-averaged gradient L2 norm leaves this band:
# below it a weight has all but stopped learning, above it (or non-finite) updates blow up.
VANISHING_GRAD_L2 = 1e-7
EXPLODING_GRAD_L2 = 1e3
HEALTH_ORDER = ("ok", "vanishing", "exploding")  # worst last

# The ``epochs`` row of one epoch: column -> (value type, meaning).
EPOCH_COLUMNS: dict[str, tuple[str, str]] = {
    "epoch": ("int", "1-based"),
    "train_loss": ("float", "the objective minimised, averaged over the epoch's images"),
    "train_acc": ("float", ""),
    "val_loss": ("float", "cross-entropy whatever the training loss"),
    "val_acc": ("float", ""),
    "lr": ("float", "the rate of the epoch's first optimizer step"),
    "lr_last": ("float", "the rate of its last step (differs from lr under warm-up)"),
    "seconds": ("float", "training + validation wall time"),
    "images_per_s": ("float", "training images per second of training time"),
}


@dataclass
class EpochReport:
    """What a trial reports after each epoch, in one ``tune.report``: its ``epochs`` row, that
    epoch's ``layers`` and ``steps`` rows, and the trial's ``trials`` summary so far.

    Ray carries it as a plain dict (:meth:`to_result`: the epoch's columns at the top, where
    ASHA and Optuna read ``val_acc``) and hands it back nested to callbacks, flattened
    (``trial/best_val_acc``) to searchers; :meth:`from_result` reads either.
    """

    epoch: dict[str, Any]
    layers: list[dict[str, Any]]
    steps: list[dict[str, Any]] = field(default_factory=list)
    trial: dict[str, Any] = field(default_factory=dict)

    def to_result(self) -> dict[str, Any]:
        return {**self.epoch, "layers": self.layers, "steps": self.steps, "trial": self.trial}

    @classmethod
    def from_result(cls, result: dict[str, Any]) -> EpochReport:
        summary = result.get("trial")
        if not isinstance(summary, dict):
            summary = {key.removeprefix("trial/"): value for key, value in result.items() if key.startswith("trial/")}
        return cls(
            epoch={key: result.get(key) for key in EPOCH_COLUMNS},
            layers=list(result.get("layers") or []),
            steps=list(result.get("steps") or []),
            trial=dict(summary),
        )
