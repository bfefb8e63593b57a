"""Test-only fault injection: a trial worker that dies mid-epoch, as on a node loss.

The fault-tolerance tests set ``TUNE_CIFAR_CRASH_ONCE=MARKER:EPOCH[:DELAY_S]`` in the study's
environment. The first trial attempt anywhere that starts epoch EPOCH creates the file MARKER
and kills its own worker process DELAY_S seconds (default 0.2) into that epoch; the marker
makes it happen once per study, so the retry from the last checkpoint runs undisturbed.
Unset (every real run), :func:`crash_once_if_asked` reads one environment variable and returns.
"""

from __future__ import annotations

import os
import threading

CRASH_ENV = "TUNE_CIFAR_CRASH_ONCE"


def crash_once_if_asked(epoch: int) -> None:
    """Arm the crash if ``CRASH_ENV`` names this epoch and no attempt has crashed yet."""
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
