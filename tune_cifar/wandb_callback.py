"""W&B for a study: one run per trial, written by a process of its own (:mod:`tune_cifar.wandb_runs`).

A view of the study, not part of it: a W&B failure stops the W&B logging, never the study.
"""

from __future__ import annotations

import os
import queue
import threading
from typing import Any

from ray import tune

from tune_cifar.helper_process import HelperProcess
from tune_cifar.outcome import Outcome
from tune_cifar.ray_trial import error_line, hyperparameter_row, outcome
from tune_cifar.report import EpochReport
from tune_cifar.study_folder import StudyContext

WANDB_CLOSE_TIMEOUT_S = 300  # how long the study's end waits for W&B to close its runs


class WandbCallback(tune.Callback):
    """One W&B run per trial, grouped by study: config, per-epoch metrics, per-layer statistics and
    gradient health, and at the end gradient-flow and weight-update-flow charts (mean |g| and
    ||ΔW||/||W|| of every layer across epochs, in forward order), the first report's dashboard.
    Each run ends with the trials table's status in its summary and the outcome's tag
    (:attr:`Outcome.wandb_tag`): W&B itself calls an ASHA-stopped run "finished" like a completed one.

    W&B works in a process of its own (:func:`tune_cifar.wandb_runs.serve`), fed by a thread and
    started with the first report: opening a run takes most of a second and logging a report
    about as long as Ray Tune's own handling of it, which in Ray's event loop, or in a thread
    sharing the driver's interpreter with it, would hold up every trial
    (``benchmarks/study_overhead.py``, ``benchmarks/driver_throughput.py``). The callbacks hand
    over copies of what they saw, in order; the experiment's end waits for the process to finish
    every run.
    """

    def __init__(self, study: StudyContext, mode: str, project: str = "tune-cifar"):
        self.study = study  # restored by --resume as the resuming driver's (see tune_cifar.study_folder)
        self.mode = mode
        self.project = project
        self.open: set[str] = set()  # trials with a run, as the callbacks see it
        self.failed = False  # the W&B process ended early (it said why)
        self._jobs: queue.Queue | None = None
        self._feeder: threading.Thread | None = None
        self._process: HelperProcess | None = None

    def __getstate__(self) -> dict[str, Any]:  # open runs and the process stay with this driver
        return {**self.__dict__, "open": set(), "failed": False, "_jobs": None, "_feeder": None, "_process": None}

    def _submit(self, *job: Any) -> None:
        if self.failed:
            return
        if self._feeder is None:
            # W&B's caches and artifact staging (~/.cache/wandb, ~/.local/share/wandb) go into the
            # study folder, unless the user chose places for them.
            for variable, where in (("WANDB_CACHE_DIR", "cache"), ("WANDB_DATA_DIR", "data"),
                                    ("WANDB_ARTIFACT_DIR", "artifacts")):  # fmt: skip
                os.environ.setdefault(variable, str(self.study.folder.wandb / where))
            self._jobs = queue.Queue()
            self._feeder = threading.Thread(target=self._feed, name="wandb", daemon=True)
            self._feeder.start()
        self._jobs.put(job)

    def _feed(self) -> None:
        """Start the W&B process and pass it the jobs in order (a thread: a send waits while W&B
        opens a run, and Tune's loop must not); at the end, wait for it to close its runs."""
        where = (self.study.folder.path, self.study.name, self.mode, self.project)
        try:
            self._process = HelperProcess("tune_cifar.wandb_runs:serve", *where)
        except Exception as exc:
            self.failed = True
            print(f"warning: W&B logging stopped (its process did not start: {exc}); the study continues")
            return
        while (job := self._jobs.get()) is not None:
            try:
                self._process.send(job)
            except BrokenPipeError:  # W&B failed and said so; the study goes on without it
                self.failed = True
                break
        self._process.close()

    def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
        config = None if trial.trial_id in self.open else hyperparameter_row(trial)  # for opening its run
        self.open.add(trial.trial_id)
        report = EpochReport.from_result(result)
        self._submit("log", trial.trial_id, config, EpochReport(report.epoch, report.layers))  # W&B logs no steps

    def _close(self, trial: Any, ended: Outcome) -> None:
        """Hand the W&B process what closing ``trial``'s run needs, read now (Ray's trial changes later)."""
        if trial.trial_id not in self.open:
            return
        self.open.discard(trial.trial_id)
        summary = EpochReport.from_result(trial.last_result or {}).trial
        stop_reason = ended.columns(error_line(trial) if ended is Outcome.ERROR else None)["stop_reason"]
        self._submit("finish", trial.trial_id, ended, summary, stop_reason)

    def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._close(trial, outcome(trial))

    def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
        self._close(trial, outcome(trial, error=True))

    def on_experiment_end(self, trials: list, **info: Any) -> None:
        for trial in trials:  # runs still open: the trial did not finish, --resume continues it
            self._close(trial, outcome(trial, ended=False, interrupted=True))
        if self._feeder is not None:
            self._jobs.put(None)
            self._feeder.join(timeout=WANDB_CLOSE_TIMEOUT_S)
            if self._feeder.is_alive():  # e.g. an online W&B that stopped answering: the study is done
                print(f"warning: W&B runs still closing after {WANDB_CLOSE_TIMEOUT_S} s; not waiting any longer")
                self._process.process.kill()  # in a session of its own, nothing else would stop it
            self._feeder = None
