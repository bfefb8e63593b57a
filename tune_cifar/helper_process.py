"""A Python process of the driver's own, for work that would otherwise take turns with Ray Tune's
event loop for the driver's interpreter: W&B's SDK (:mod:`tune_cifar.wandb_runs`) and encoding
the Parquet files (:mod:`tune_cifar.parquet_callback`).

Every trial's results pass through that one loop; work done beside it in a thread of the driver
still holds the interpreter while it runs (``benchmarks/driver_throughput.py`` measured W&B's
logging and the Parquet encoding each halving the reports per second the driver absorbs). A
helper process uses a core of its own where the head node has one.

The helper runs in a session of its own: a terminal's Ctrl-C and a scheduler's SIGTERM reach the
driver's process group, and the driver's orderly stop still needs its helpers to write the last
rows and close the runs; the driver ends them by closing their input. (Processes started by
``multiprocessing`` share the driver's group and meet those signals during their start-up.) A
helper whose driver died reads the end of its input and exits.

Jobs and replies are pickled through two pipes, in order.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import pickle
import subprocess
import sys
from pathlib import Path
from typing import IO, Any


class HelperProcess:
    """``module:function`` run in a new Python process as ``function(jobs, replies, *args)``,
    where ``jobs`` and ``replies`` are the two ends of its pipes (see :func:`receive`, :func:`reply`):
    jobs without an answer (:meth:`send`), or with one (:meth:`call`)."""

    def __init__(self, target: str, *args: Any):
        self.target = target
        jobs_read, jobs_write = os.pipe()
        replies_read, replies_write = os.pipe()
        package_root = str(Path(__file__).resolve().parent.parent)  # importable however the driver found it
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [package_root, os.environ.get("PYTHONPATH")]))}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tune_cifar.helper_process", target, str(jobs_read), str(replies_write)],
            pass_fds=(jobs_read, replies_write),
            start_new_session=True,
            env=env,
        )
        os.close(jobs_read)
        os.close(replies_write)
        self._jobs = os.fdopen(jobs_write, "wb")
        self._replies = os.fdopen(replies_read, "rb")
        self.send(args)

    def send(self, job: Any) -> None:
        """Hand the helper one job; BrokenPipeError when it has ended."""
        pickle.dump(job, self._jobs, protocol=pickle.HIGHEST_PROTOCOL)
        self._jobs.flush()

    def call(self, job: Any) -> None:
        """Hand the helper one job and wait for its reply: None, or an exception it caught, raised
        here; a RuntimeError naming the helper when it has ended."""
        try:
            self.send(job)
            failure = pickle.load(self._replies)
        except (BrokenPipeError, EOFError):
            raise RuntimeError(f"the helper process {self.target} ended (exit code {self.process.poll()})") from None
        if failure is not None:
            raise failure

    def close(self) -> None:
        """End the helper's input and wait for it to finish its jobs and exit."""
        with contextlib.suppress(BrokenPipeError):  # it ended already
            self._jobs.close()
        self.process.wait()
        self._replies.close()


def receive(jobs: IO[bytes]) -> Any:
    """The helper's next job; None once the driver closed its input (or died)."""
    try:
        return pickle.load(jobs)
    except (EOFError, pickle.UnpicklingError):  # the end, or the driver died half-way through a job
        return None


def reply(replies: IO[bytes], answer: Any) -> None:
    """Answer the job :meth:`HelperProcess.call` waits on: None, or the exception to raise there
    (as a RuntimeError with its text when it does not pickle)."""
    try:
        data = pickle.dumps(answer, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception:
        cause = f" ({answer.__cause__!r})" if isinstance(answer, BaseException) and answer.__cause__ else ""
        data = pickle.dumps(RuntimeError(f"{answer!r}{cause}"), protocol=pickle.HIGHEST_PROTOCOL)
    replies.write(data)
    replies.flush()


def main() -> None:
    target, jobs_fd, replies_fd = sys.argv[1:]
    module, function = target.split(":")
    jobs, replies = os.fdopen(int(jobs_fd), "rb"), os.fdopen(int(replies_fd), "wb")
    args = pickle.load(jobs)
    getattr(importlib.import_module(module), function)(jobs, replies, *args)


if __name__ == "__main__":
    main()
