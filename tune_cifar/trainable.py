"""The Ray Tune function trainable: one study trial, one epoch per ``tune.report``.

The driver loads the data once and hands the arrays over with ``tune.with_parameters``
(Ray's object store shares them between the trials of a node without copying), so no trial
reads or decodes files. Each epoch reports the ``epochs`` row (``val_acc`` at top level, the
metric ASHA and Optuna act on), that epoch's ``layers`` and ``steps`` rows, and the trial's
summary, together with a checkpoint of the whole :class:`~tune_cifar.engine.Trainer` state,
so a retried or resumed trial continues exactly where its last report left it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from pathlib import Path
from typing import Any

import torch
from ray import tune

from tune_cifar import config as cfg
from tune_cifar.cluster import node_label
from tune_cifar.data import Splits
from tune_cifar.engine import Trainer

CHECKPOINT_FILE = "trainer.pt"
# Test-only fault injection: "MARKER:EPOCH[:DELAY_S]". The first trial attempt anywhere that
# starts epoch EPOCH creates MARKER and kills its own worker DELAY_S seconds into the epoch,
# as a node loss would; the marker makes it happen once per study.
CRASH_ENV = "TUNE_CIFAR_CRASH_ONCE"


def train_trial(config: dict[str, Any], splits: Splits, cpus: float = 1, gpus: float = 0) -> None:
    """Train ``config`` (a trial's vocabulary values) epoch by epoch, reporting to Ray Tune."""
    torch.set_num_threads(max(1, int(cpus)))
    train_config = cfg.from_dict({key: value for key, value in config.items() if key in cfg.KEYS}, source="trial")
    device = "cuda" if gpus > 0 and torch.cuda.is_available() else "cpu"
    trainer = Trainer(train_config, splits, device=device)
    prefix = f"tune-cifar-ckpt-{tune.get_context().get_trial_id()}-"
    _remove_leftovers(prefix)  # of an attempt of this trial that was killed while saving
    checkpoint = tune.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as folder:
            trainer.load_state_dict(torch.load(Path(folder) / CHECKPOINT_FILE, map_location=device, weights_only=False))
    while trainer.epoch < train_config.epochs:
        _maybe_crash(trainer.epoch + 1)
        report = trainer.train_epoch()
        last = trainer.epoch >= train_config.epochs
        summary = {**(trainer.finish() if last else trainer.summary()), "node": node_label()}
        metrics = {**report.epoch, "layers": report.layers, "steps": report.steps, "trial": summary}
        with tempfile.TemporaryDirectory(prefix=prefix) as folder:
            torch.save(trainer.state_dict(), Path(folder) / CHECKPOINT_FILE)
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(folder))


def _remove_leftovers(prefix: str) -> None:
    for folder in Path(tempfile.gettempdir()).glob(f"{prefix}*"):
        shutil.rmtree(folder, ignore_errors=True)


def trial_dirname(trial: Any) -> str:
    """Short trial folders (Ray's default name embeds every sampled value)."""
    return f"trial_{trial.trial_id}"


def _maybe_crash(epoch: int) -> None:
    spec = os.environ.get(CRASH_ENV)
    if not spec:
        return
    marker, at_epoch, *delay = spec.split(":")
    if epoch != int(at_epoch):
        return
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return
    timer = threading.Timer(float(delay[0]) if delay else 0.2, os._exit, args=(13,))
    timer.daemon = True
    timer.start()
