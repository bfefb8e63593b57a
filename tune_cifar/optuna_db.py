"""The study's Optuna database (``STUDY/optuna.db``): opened in WAL mode, folded into one file
before it is copied, and written by a process of the driver's own while the study runs.

Every epoch of every trial is an intermediate value in it. Recording one through Optuna's storage
costs a few milliseconds of Python (SQLAlchemy) in whichever process does it; in the driver that
was Ray Tune's event loop, which every trial's results pass through
(``benchmarks/driver_throughput.py``: the searcher alone halved the reports per second the driver
absorbed). :class:`ReportWriter` hands them to a helper process in order instead, with the telling
of a finished trial (its attributes and ``study.tell``: about 20 ms in the loop per trial, measured
with py-spy), and the searcher waits for it (:meth:`ReportWriter.sync`) only before it asks for a
new trial (TPE must see every trial told so far) and before Ray saves its state. No Ray here: the
helper imports this module.
"""

from __future__ import annotations

import contextlib
import sqlite3
from typing import IO, Any

import optuna
from optuna.trial import TrialState

from tune_cifar import helper_process
from tune_cifar.study_folder import StudyFolder


def open_database(folder: StudyFolder) -> optuna.storages.RDBStorage:
    """The study's Optuna database as the driver writes it: a write-ahead log, no fsync per commit.

    Every epoch of every trial is one ``trial.report``, one transaction. With SQLite's defaults
    (a rollback journal, fsync on every commit) one took 13.6 ms on the development machine, which
    capped the whole driver near 70 reports a second; in WAL mode with ``synchronous=NORMAL``,
    0.7 ms. A crash of the driver loses nothing; a power loss may lose the last transactions but
    never corrupts the file, and ``--resume`` reconciles the database with Ray's state anyway
    (:meth:`tune_cifar.searcher.StudySearch.restore`). WAL mode stays with the file; :func:`checkpoint_database` folds
    the log into it before the study is copied anywhere.
    """
    path = folder.optuna_db.resolve()

    def connect() -> sqlite3.Connection:
        connection = sqlite3.connect(path, check_same_thread=False)  # SQLAlchemy's pool may hand it to any thread
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=NORMAL")
        return connection

    return optuna.storages.RDBStorage(folder.optuna_url, engine_kwargs={"creator": connect})


def checkpoint_database(folder: StudyFolder) -> None:
    """Fold the write-ahead log into ``optuna.db``, so that the one file holds the whole study (what
    remote storage copies, and what a user copies away)."""
    if folder.optuna_db.is_file():
        with contextlib.closing(sqlite3.connect(folder.optuna_db)) as connection:
            connection.execute("PRAGMA wal_checkpoint(TRUNCATE)")


def finish_study(name: str, folder: StudyFolder) -> int:
    """After a study ran to its end: tell FAIL for trials still RUNNING in the database (errored
    for good, or asked by a driver that died and never used). Returns how many."""
    optuna_study = optuna.load_study(study_name=name, storage=folder.optuna_url)
    running = optuna_study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,))
    for trial in running:
        optuna_study.tell(trial.number, state=optuna.trial.TrialState.FAIL, skip_if_finished=True)
    return len(running)


# this process's writers with a helper (held here: a searcher Ray dropped may still have writes on the way)
_started: set[ReportWriter] = set()


def sync_writers() -> None:
    """Wait until every :class:`ReportWriter` of this process has written what it was sent. The
    driver calls it after ``Tuner.fit``, before it reads, closes or copies the database: Ray's
    final save of the searcher (which syncs) is not something to rely on, it logs its errors."""
    for writer in list(_started):
        writer.sync()


class ReportWriter:
    """Intermediate values and finished trials on their way into the database, written by a helper
    process in order. The helper ends with the driver (its input closes)."""

    def __init__(self, folder: StudyFolder, study_name: str):
        self.folder = folder
        self.study_name = study_name
        self._process: helper_process.HelperProcess | None = None  # started with the first job

    def report(self, optuna_trial_id: int, epoch: int, value: float) -> None:
        """``trial.report(value, epoch)``, done by the helper; returns at once."""
        self._send(("report", optuna_trial_id, epoch, value))

    def tell(self, optuna_trial_id: int, attrs: dict[str, Any], state: TrialState | None, value: float | None) -> None:
        """Set the trial's user attributes ``attrs``, then (unless ``state`` is None) tell it
        ``state`` and ``value`` (a PRUNED trial's value is its last intermediate value, reported
        before it); done by the helper; returns at once."""
        self._send(("tell", optuna_trial_id, attrs, None if state is None else state.name, value))

    def _send(self, job: tuple[Any, ...]) -> None:
        if self._process is None:
            self._process = helper_process.HelperProcess(
                "tune_cifar.optuna_db:serve_reports", self.folder, self.study_name
            )
            _started.add(self)
        try:
            self._process.send(job)
        except BrokenPipeError:
            self._process.call(("sync",))  # raises, naming the helper that ended

    def sync(self) -> None:
        """Wait until every report so far is in the database; raise what a write raised."""
        if self._process is not None:
            self._process.call(("sync",))


def serve_reports(jobs: IO[bytes], replies: IO[bytes], folder: StudyFolder, study_name: str) -> None:
    """The helper process of :class:`ReportWriter`: record each ``("report", trial id, epoch,
    value)`` and ``("tell", trial id, attributes, state name or None, value)`` through Optuna's
    storage and study; answer each ``("sync",)`` with None, or with the first error a write
    raised since the last answer (raised in the driver, as a write in the loop would have been)."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # as in the driver: no line per tell
    storage = open_database(folder)
    study = optuna.load_study(study_name=study_name, storage=storage)
    failure: Exception | None = None
    while (job := helper_process.receive(jobs)) is not None:
        if job[0] == "sync":
            helper_process.reply(replies, failure)
            failure = None
            continue
        try:
            if job[0] == "report":
                _, trial_id, epoch, value = job
                storage.set_trial_intermediate_value(trial_id, epoch, value)
            else:
                _, trial_id, attrs, state, value = job
                for key, attr in attrs.items():
                    storage.set_trial_user_attr(trial_id, key, attr)
                if state is not None:
                    number = storage.get_trial_number_from_id(trial_id)
                    study.tell(number, value, state=TrialState[state], skip_if_finished=True)
        except Exception as exc:
            failure = failure or exc
