"""The Ray Tune function trainable: one study trial, one epoch per ``tune.report``.

The driver loads the data once and hands the arrays over with ``tune.with_parameters``
(Ray's object store shares them between the trials of a node without copying), so no trial
reads or decodes files. Each epoch reports the ``epochs`` row (``val_acc`` at top level, the
metric ASHA and Optuna act on), that epoch's ``layers`` and ``steps`` rows, and the trial's
summary. Epochs that :class:`CheckpointPolicy` names also carry a checkpoint of the whole
:class:`~tune_cifar.engine.Trainer` state, so a retried or resumed trial continues exactly
where that checkpoint left it, redoing at most the epochs after it.
"""

from __future__ import annotations

import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from ray import tune

from tune_cifar import config as cfg
from tune_cifar.cluster import node_label
from tune_cifar.data import Splits
from tune_cifar.engine import Trainer

CHECKPOINT_FILE = "trainer.pt"


@dataclass(frozen=True)
class CheckpointPolicy:
    """Which epochs end with a checkpoint: every ``every``-th, each ASHA rung, and the last.

    A checkpoint (model, optimizer, telemetry, RNG; serialised, then persisted by Ray) costs a
    noticeable share of a one-second GPU epoch. Skipping some bounds what a retry redoes: a
    worker lost in epoch e restarts after the last checkpoint, at most ``every - 1`` finished
    epochs earlier. Rungs are always saved, so the trial ASHA judges there can be continued
    from exactly that state, and the last epoch, whose weights a finished study keeps.
    """

    every: int = 1
    rungs: tuple[int, ...] = ()  # the study plan's (tune_cifar.plan.StudyPlan.rungs)

    def due(self, epoch: int, epochs: int) -> bool:
        return epoch % self.every == 0 or epoch in self.rungs or epoch >= epochs


def train_trial(
    config: dict[str, Any],
    splits: Splits,
    cpus: float = 1,
    gpus: float = 0,
    checkpoints: CheckpointPolicy = CheckpointPolicy(),
) -> None:
    """Train ``config`` (a trial's vocabulary values) epoch by epoch, reporting to Ray Tune."""
    torch.set_num_threads(max(1, int(cpus)))
    train_config = cfg.from_values(config, source="trial")
    device = "cuda" if gpus > 0 and torch.cuda.is_available() else "cpu"
    trainer = Trainer(train_config, splits, device=device)
    prefix = f"tune-cifar-ckpt-{tune.get_context().get_trial_id()}-"
    _remove_leftovers(prefix)  # of an attempt of this trial that was killed while saving
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            trainer.load_state_dict(torch.load(Path(folder) / CHECKPOINT_FILE, map_location=device, weights_only=False))
    while trainer.epoch < train_config.epochs and not trainer.diverged:
        report = trainer.train_epoch()
        last = trainer.epoch >= train_config.epochs
        report.trial = {**(trainer.finish() if last else trainer.summary()), "node": node_label()}
        if trainer.diverged:  # the last report: the trial ends here, and the driver calls it diverged
            tune.report(report.to_result())
            return
        if not checkpoints.due(trainer.epoch, train_config.epochs):
            tune.report(report.to_result())
            continue
        with tempfile.TemporaryDirectory(prefix=prefix) as folder:
            torch.save(trainer.state_dict(), Path(folder) / CHECKPOINT_FILE)
            tune.report(report.to_result(), checkpoint=tune.Checkpoint.from_directory(folder))


def _remove_leftovers(prefix: str) -> None:
    for folder in Path(tempfile.gettempdir()).glob(f"{prefix}*"):
        shutil.rmtree(folder, ignore_errors=True)
