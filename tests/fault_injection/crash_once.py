"""Test-only fault injection: a trial worker that dies mid-epoch, as on a node loss.

Installed from outside the product: ``sitecustomize.py`` beside this file runs at the start of
every Python process whose ``PYTHONPATH`` holds this folder (the tests put it there, so Ray's
workers inherit it) and, when ``TUNE_CIFAR_CRASH_ONCE=MARKER:EPOCH[:DELAY_S]`` is set, wraps
``tune_cifar.engine.Trainer.train_epoch`` as the module is imported. The first trial attempt
anywhere that starts epoch EPOCH creates the file MARKER and kills its own worker process
DELAY_S seconds (default 0.2) into that epoch; the marker makes it happen once per study, so
the retry from the last checkpoint runs undisturbed.
"""

from __future__ import annotations

import functools
import os
import threading
from typing import Any

CRASH_ENV = "TUNE_CIFAR_CRASH_ONCE"


def crash_once_if_asked(epoch: int) -> None:
    """Arm the crash if ``CRASH_ENV`` names this epoch and no attempt has crashed yet."""
    marker, at_epoch, *delay = os.environ[CRASH_ENV].split(":")
    if epoch != int(at_epoch):
        return
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return
    timer = threading.Timer(float(delay[0]) if delay else 0.2, os._exit, args=(13,))
    timer.daemon = True
    timer.start()


def install(engine: Any) -> None:
    """Wrap ``engine.Trainer.train_epoch`` so that each epoch first asks :func:`crash_once_if_asked`."""
    original = engine.Trainer.train_epoch

    @functools.wraps(original)
    def train_epoch(self: Any, *args: Any, **kwargs: Any) -> Any:
        crash_once_if_asked(self.epoch + 1)
        return original(self, *args, **kwargs)

    engine.Trainer.train_epoch = train_epoch
