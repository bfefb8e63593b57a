"""One driver per study folder: an OS file lock held for the driver's whole life.

Two drivers on one folder (a double job submit, a ``--resume`` while the study still runs)
would overwrite each other's settings and delete each other's table parts. The lock is an
``fcntl.flock`` on ``STUDY/.driver.lock``: the OS releases it when the driver exits, however it
exits (``kill -9`` included), so ``--resume`` after a crash always gets it. The file holds who
has the lock (pid, host, start time) so that the refused driver can say so.
"""

from __future__ import annotations

import fcntl
import os
import socket
import time

from tune_cifar.errors import UsageError
from tune_cifar.study_folder import StudyFolder


class DriverLock:
    """Holds the study folder's lock until :meth:`release` or the end of the process."""

    def __init__(self, folder: StudyFolder) -> None:
        self.folder = folder.path
        self.file = folder.lock
        self._fd: int | None = None

    def acquire(self) -> DriverLock:
        """Take the lock or raise a :class:`UsageError` naming the driver that has it; writes nothing else."""
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.file, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 512, 0).decode(errors="replace").strip() or "another driver"
            os.close(fd)
            raise UsageError(
                f"study {self.folder} is in use by {holder}; wait for it to end (or stop it) before starting "
                "or resuming this study"
            ) from None
        os.set_inheritable(fd, False)  # Ray's processes must not keep the study locked after the driver
        holder = f"driver pid {os.getpid()} on {socket.gethostname()} since {time.strftime('%Y-%m-%d %H:%M:%S')}"
        os.ftruncate(fd, 0)
        os.pwrite(fd, holder.encode(), 0)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None
