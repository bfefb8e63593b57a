"""The driver's helper processes (tune_cifar.helper_process), with the Parquet writer's real one:
work done in order, errors raised in the driver as the helper caught them, a helper that died
named, and a session of its own so that a signal to the driver's process group leaves it alone."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from tune_cifar.helper_process import HelperProcess
from tune_cifar.tables import Write


def _epoch_rows(epoch: int) -> list[dict]:
    return [{"trial_id": "t", "epoch": epoch, "val_acc": epoch / 10}]


def test_the_writer_helper_writes_in_order_and_raises_the_disks_error_in_the_driver(tmp_path: Path) -> None:
    writer = HelperProcess("tune_cifar.tables:serve_writes")
    try:
        writer.call((tmp_path, [Write(Path("epochs/round-00000001.parquet"), "epochs", _epoch_rows(1))]))
        writer.call((tmp_path, [Write(Path("epochs/round-00000002.parquet"), "epochs", _epoch_rows(2))]))
        assert pd.read_parquet(tmp_path / "epochs")["epoch"].tolist() == [1, 2]  # on disk once call returned
        blocked = tmp_path / "a-file"
        blocked.write_text("not a folder")
        with pytest.raises(OSError):  # as the write raised it in the helper: the study stops on a disk error
            writer.call((blocked, [Write(Path("epochs/round-00000003.parquet"), "epochs", _epoch_rows(3))]))
        writer.call((tmp_path, []))  # and the helper goes on
    finally:
        writer.close()
    assert writer.process.returncode == 0


def test_a_helper_that_died_is_named(tmp_path: Path) -> None:
    writer = HelperProcess("tune_cifar.tables:serve_writes")
    writer.process.kill()
    writer.process.wait()
    with pytest.raises(RuntimeError, match=r"helper process tune_cifar\.tables:serve_writes ended \(exit code -9\)"):
        writer.call((tmp_path, []))


def test_a_signal_to_the_drivers_process_group_leaves_the_helper_alone(tmp_path: Path) -> None:
    """A driver in a process group of its own (as a shell starts a job) starts a helper, and the
    group gets SIGTERM (a scheduler stopping the job): the driver dies, the helper finishes the
    driver's last job and then exits by itself, its input closed."""
    marker = tmp_path / "helper-pid"
    driver = f"""
import os, signal, sys, time
from pathlib import Path
from tune_cifar.helper_process import HelperProcess
writer = HelperProcess("tune_cifar.tables:serve_writes")
Path({str(marker)!r}).write_text(str(writer.process.pid))
assert os.getsid(writer.process.pid) != os.getsid(0)
time.sleep(60)
"""
    process = subprocess.Popen([sys.executable, "-c", driver], start_new_session=True)
    try:
        for _ in range(300):
            if marker.is_file() and marker.read_text():
                break
            assert process.poll() is None, "the driver died before starting its helper"
            time.sleep(0.05)
        helper = int(marker.read_text())
        os.killpg(process.pid, signal.SIGTERM)
        assert process.wait(timeout=30) == -signal.SIGTERM
        for _ in range(200):  # the helper reads the end of its input and exits
            try:
                os.kill(helper, 0)
            except ProcessLookupError:
                break
            time.sleep(0.05)
        else:
            os.kill(helper, signal.SIGKILL)
            pytest.fail("the helper outlived its driver")
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
